"""The training loop end to end on the real Bible data, with tiny settings.

One tokenizer is trained for the module and copied into every workdir. The
preemption test runs the real command line (``python -m mt_flax train``) in
subprocesses, kills it with SIGTERM or SIGKILL after a checkpoint, resumes it
and compares the per-step losses with an uninterrupted run.
"""
import json
import math
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from mt_flax import checkpoint, train
from mt_flax.commands import train as train_command
from mt_flax.config import load_config
from mt_flax.metrics import read_metrics
from mt_flax.model import Transformer, TransformerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "bible_en_es_tiny.py")
VOCAB = 256   # the tiny_training fixture's vocabulary


@pytest.mark.slow
def test_train_end_to_end(tmp_path, tiny_training):
  workdir = tiny_training.new_workdir(tmp_path, "run")
  config = load_config(CONFIG, tiny_training.overrides(num_train_steps=24, eval_every_steps=12,
                                         checkpoint_every_steps=12, eval_bleu_examples=4))
  summary = train.train_and_evaluate(config, workdir)
  assert summary["step"] == 24 and summary["train_steps_run"] == 24
  assert summary["tokens_per_s"] > 0

  rows = read_metrics(workdir)
  train_rows = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train_rows] == list(range(1, 25))
  for r in train_rows:
    for key in ("loss", "nll", "learning_rate", "grad_norm", "tokens_per_s",
                "padding_efficiency", "steps_per_s", "accuracy"):
      assert math.isfinite(r[key]), (key, r)
    assert 0 < r["padding_efficiency"] <= 1
  assert train_rows[7]["learning_rate"] == pytest.approx(3e-3)       # peak after 8 warmup steps
  val = [r for r in rows if r.get("split") == "validation"]
  assert [r["step"] for r in val] == [12, 24]
  for r in val:
    assert r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"]), rel=1e-6)
    assert 0 <= r["bleu"] <= 100 and 0 <= r["chrf"] <= 100     # decoded validation subset
  # learns: below the uniform baseline and falling
  assert val[1]["eval_loss"] < val[0]["eval_loss"] < math.log(VOCAB)
  assert summary["eval_loss"] == pytest.approx(val[1]["eval_loss"])

  files = set(os.listdir(workdir))
  assert {"config.json", "git_commit.txt", "metrics.jsonl", "tensorboard", "checkpoints",
          "tokenizer", "DONE"} <= files
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  saved = json.loads(open(os.path.join(workdir, "config.json")).read())
  assert saved["model"]["d_model"] == 32 and saved["best_metric"] == "eval_loss"

  # the best checkpoint for inference, usable on one device
  config2, params, step = checkpoint.restore_for_inference(workdir, "best")
  assert step == 24
  model = Transformer(TransformerConfig.from_config(config2.model, VOCAB, VOCAB))
  logits = jax.jit(model.apply)({"params": params}, np.array([[5, 6, 3]], np.int32),
                                np.array([[2, 7]], np.int32))
  assert logits.shape == (1, 2, VOCAB) and np.isfinite(np.asarray(logits)).all()

  # re-running a finished run does nothing and changes no log
  before = open(os.path.join(workdir, "metrics.jsonl")).read()
  again = train.train_and_evaluate(config, workdir)
  assert again["train_steps_run"] == 0 and again["step"] == 24
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == before


def run_cli(workdir: str, args: list[str], env: dict) -> subprocess.Popen:
  """``python -m mt_flax train`` of the default experiment in a subprocess."""
  return subprocess.Popen([sys.executable, "-m", "mt_flax", "train", "--config", CONFIG,
                           "--workdir", workdir, *args], env=env, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_preempted_runs_resume_exactly(tmp_path, tiny_training):
  """SIGTERM after checkpoint 20, resume, SIGKILL after checkpoint 140, resume: same losses."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"))
  args = tiny_training.overrides(num_train_steps=300, checkpoint_every_steps=20, eval_every_steps=1000,
                   progress_bar=False)
  reference = tiny_training.new_workdir(tmp_path, "uninterrupted")
  code, err = tiny_training.finish(run_cli(reference, args, env))
  assert code == 0, err[-2000:]
  want = tiny_training.losses(reference)
  assert sorted(want) == list(range(1, 301))

  workdir = tiny_training.new_workdir(tmp_path, "interrupted")
  proc = run_cli(workdir, args, env)
  tiny_training.wait(tiny_training.has_checkpoint(workdir, 20), proc, "checkpoint 20", 240)
  proc.send_signal(signal.SIGTERM)
  code, err = tiny_training.finish(proc)
  assert code == train.PREEMPTED_EXIT, err[-2000:]        # saved and stopped, not finished
  assert "SIGTERM: saved checkpoint step" in err

  proc = run_cli(workdir, args, env)
  tiny_training.wait(tiny_training.has_checkpoint(workdir, 140), proc, "checkpoint 140", 240)
  proc.send_signal(signal.SIGKILL)
  code, err = tiny_training.finish(proc)
  assert code == -signal.SIGKILL, err[-2000:]
  assert "resumed from checkpoint step" in err
  assert not os.path.exists(os.path.join(workdir, "DONE"))

  code, err = tiny_training.finish(run_cli(workdir, args, env))
  assert code == 0, err[-2000:]
  assert "resumed from checkpoint step" in err
  got = tiny_training.losses(workdir)
  assert got == want                                      # every step, bit for bit
  rows = read_metrics(workdir)
  assert len([r for r in rows if "loss" in r]) == 300     # each step logged once
  assert [r["eval_loss"] for r in rows if "eval_loss" in r] == [
      r["eval_loss"] for r in read_metrics(reference) if "eval_loss" in r]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_training, capsys):
  workdir = tiny_training.new_workdir(tmp_path, "diverges")
  code = train_command.main(["--config", CONFIG, "--workdir", workdir, *tiny_training.overrides(
      num_train_steps=20, learning_rate=1e30, warmup_steps=1, grad_clip_norm=0.0,
      checkpoint_every_steps=1, eval_every_steps=1000)])
  err = capsys.readouterr().err
  assert code == 1
  line = [l for l in err.splitlines() if "not finite" in l]
  assert line and "last good checkpoint (step 1)" in line[0], err[-2000:]
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["1"]
  assert not os.path.exists(os.path.join(workdir, "DONE"))


def test_command_line_errors_are_one_line(tmp_path, tiny_training, capsys):
  def error(argv):
    code = train_command.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("mt_flax train: error:"), err
    return err[0]

  workdir = tiny_training.new_workdir(tmp_path, "errors")
  assert "did you mean learning_rate" in error(
      ["--config", CONFIG, "--workdir", workdir, "--config.learning_rat=1e-3"])
  assert "arguments are required: --workdir" in error(["--config", CONFIG])
  assert "arguments are required: --config" in error(["--workdir", workdir])
  assert "unrecognized arguments: --wrkdir" in error(
      ["--config", CONFIG, "--workdir", workdir, "--wrkdir", workdir])
  assert "not found" in error(["--config", "experiments/nope.py", "--workdir", workdir])
  assert "parallelism='pjit'" in error(
      ["--config", CONFIG, "--workdir", workdir, "--config.parallelism=pjit"])
  # a workdir made with another model refuses to resume with this one
  (tmp_path / "errors" / "config.json").write_text(json.dumps(
      {**load_config(CONFIG, tiny_training.overrides()).to_dict(), "model": {"d_model": 64}}))
  assert "different settings" in error(["--config", CONFIG, "--workdir", workdir])

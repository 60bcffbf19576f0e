"""The training loop end to end on the real Bible data, with the ``:test`` variant.

One tokenizer is trained for the session and copied into every workdir; the trained
run is the session's (``trained``), made in this process. Preemption with real signals
is in ``tests/e2e/test_preemption.py``.
"""
import json
import math
import os
import shutil
import threading

import jax
import numpy as np
import pytest

from mt_flax import checkpoint, train
from mt_flax.commands import train as train_command
from mt_flax.config import load_config
from mt_flax.metrics import read_metrics
from mt_flax.model import Transformer, TransformerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "experiments", "bible_en_es_tiny.py") + ":test"
VOCAB = 256   # the :test variant's vocabulary


def test_train_end_to_end(trained, tiny_training):
  """The session's trained run (the ``:test`` variant, 24 steps, trained in this process)."""
  workdir, summary = trained
  config = load_config(tiny_training.config)
  assert (config.num_train_steps, config.eval_every_steps, config.checkpoint_every_steps,
          config.eval_bleu_examples, config.log_every_steps) == (24, 12, 12, 4, 1)
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


def test_restart_from_scratch_logs_each_step_once(tmp_path, trained_run, tiny_training):
  """Checkpoints removed, the run starts again from step 0: metrics.jsonl and TensorBoard
  hold each step once."""
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_run, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints"))
  os.remove(os.path.join(workdir, "DONE"))
  summary = train.train_and_evaluate(load_config(CONFIG), workdir)
  assert summary["train_steps_run"] == 24
  assert sorted(tiny_training.losses(workdir)) == list(range(1, 25))
  assert [r["step"] for r in read_metrics(workdir) if "loss" in r] == list(range(1, 25))
  assert tiny_training.tensorboard_steps(workdir) == list(range(1, 25))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_training, capsys):
  """Before the first save there is nothing to resume from, and the line says so; after it,
  the last good checkpoint is kept. Also: with stderr not a terminal, the progress bar is a
  plain line per logged step."""
  workdir = tiny_training.new_workdir(tmp_path, "diverges")
  argv = ["--config", CONFIG, "--workdir", workdir, *tiny_training.overrides(
      num_train_steps=20, learning_rate=1e30, warmup_steps=1, grad_clip_norm=0.0,
      eval_every_steps=1000, progress_bar=True)]
  assert train_command.main([*argv, "--config.checkpoint_every_steps=1000"]) == 1
  line = [l for l in capsys.readouterr().err.splitlines() if "not finite" in l]
  assert "No checkpoint was saved: the run diverged at step 2;" in line[0]
  assert "re-run to resume" not in line[0] and not os.listdir(os.path.join(workdir, "checkpoints"))
  code = train_command.main([*argv, "--config.checkpoint_every_steps=1"])
  err = capsys.readouterr().err
  assert "\r" not in err and "[train] step 1/20: loss=" in err, err[-2000:]
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


def test_preempted_with_prefetch_saves_the_consumed_batch_state_and_resumes_exactly(
    tmp_path, trained_run, tiny_training, monkeypatch):
  """A run whose thread builds 3 batches ahead, stopped as by SIGTERM after step 7, saves the
  data state right after batch 7 (a fresh iterator's after 7 batches), and resumed goes on
  with the losses of the session's uninterrupted run, bit for bit."""
  from mt_flax import data, sharding
  config = load_config(CONFIG, tiny_training.overrides(data__prefetch=3))
  saved = {}
  save = checkpoint.Checkpointer.save
  monkeypatch.setattr(checkpoint.Checkpointer, "save", lambda self, step, state, data_state,
                      *a, **kw: (saved.setdefault(step, data_state),
                                 save(self, step, state, data_state, *a, **kw))[1])
  interrupted = train._interrupted
  monkeypatch.setattr(train, "_interrupted", lambda run, preemption, step:
                      step == 7 or interrupted(run, preemption, step))
  workdir = tiny_training.new_workdir(tmp_path, "prefetch")
  summary = train.train_and_evaluate(config, workdir)
  assert summary["preempted"] == "SIGTERM" and summary["step"] == 7 and list(saved) == [7]
  assert not [t for t in threading.enumerate() if t.name == "mt_flax-prefetch"]

  tokenizer = data.load_or_train_tokenizer(config, workdir)
  fresh = data.train_iterator(config, tokenizer, rows=sharding.make_partitioner(config).rows)
  for _ in range(7):
    next(fresh)
  assert saved[7] == fresh.get_state()

  monkeypatch.setattr(train, "_interrupted", interrupted)
  summary = train.train_and_evaluate(config, workdir)
  assert summary["step"] == 24 and summary["train_steps_run"] == 17
  assert tiny_training.losses(workdir) == tiny_training.losses(trained_run)

"""Preemption of the real command line: ``python -m mt_flax train`` in subprocesses is
stopped with SIGTERM and killed with SIGKILL after checkpoints, resumed, and compared
step by step with an uninterrupted run of the same settings; metrics.jsonl and
TensorBoard hold each step once."""
import os
import signal
import subprocess
import sys

from mt_flax import train
from mt_flax.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "experiments", "bible_en_es_tiny.py") + ":test"


def run_cli(workdir: str, args: list[str], env: dict) -> subprocess.Popen:
  """``python -m mt_flax train`` of the default experiment in a subprocess."""
  return subprocess.Popen([sys.executable, "-m", "mt_flax", "train", "--config", CONFIG,
                           "--workdir", workdir, *args], env=env, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_preempted_runs_resume_exactly(tmp_path, tiny_training):
  """SIGTERM after checkpoint 50, resume, SIGKILL after checkpoint 150 with steps logged
  past it, resume: same losses, and each step logged once."""
  # 750 steps in all: LLVM's optimisations back on (the tests' flags turn them off, which
  # halves compile times and triples step times)
  flags = os.environ["MT_FLAX_TEST_XLA_FLAGS"].replace("--xla_backend_optimization_level=0", "")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2 " + flags,
             JAX_PLATFORMS="cpu")
  args = tiny_training.overrides(num_train_steps=300, checkpoint_every_steps=50,
                                 eval_every_steps=1000)
  reference = tiny_training.new_workdir(tmp_path, "uninterrupted")
  code, err = tiny_training.finish(run_cli(reference, args, env))
  assert code == 0, err[-2000:]
  want = tiny_training.losses(reference)
  assert sorted(want) == list(range(1, 301))

  workdir = tiny_training.new_workdir(tmp_path, "interrupted")
  proc = run_cli(workdir, args, env)
  tiny_training.wait(tiny_training.has_checkpoint(workdir, 50), proc, "checkpoint 50", 240)
  proc.send_signal(signal.SIGTERM)
  code, err = tiny_training.finish(proc)
  assert code == train.PREEMPTED_EXIT, err[-2000:]        # saved and stopped, not finished
  assert "SIGTERM: saved checkpoint step" in err

  proc = run_cli(workdir, args, env)
  checkpointed = tiny_training.has_checkpoint(workdir, 150)
  tiny_training.wait(lambda: checkpointed() and max(tiny_training.losses(workdir)) >= 155, proc,
                     "checkpoint 150 and step 155", 240)
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
  assert tiny_training.tensorboard_steps(workdir) == list(range(1, 301))
  assert [r["eval_loss"] for r in rows if "eval_loss" in r] == [
      r["eval_loss"] for r in read_metrics(reference) if "eval_loss" in r]



"""``mt_flax slurm`` without a cluster: the sbatch script it submits (``sbatch`` stands in)
runs its ``srun`` line through tools/srun_loopback.py, 2 nodes x 1 task of 4 CPU devices on
loopback with the environment SLURM gives the tasks (JAX's SLURM detection finds the
coordinator). The job trains like one process of 8 devices; SLURM's time-limit signal (USR1
to the script) makes every task save and exit 143 and the script requeue the job; the
script run again, as the requeued job, resumes with the same per-step losses."""
import os
import random
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from mt_flax import slurm, train
from mt_flax.commands import slurm as slurm_command

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 8
# the :test variant without dropout, one validation (of one pair) at the end; several
# processes agree on a signal after every step. The job saves every 2 steps (the first save
# says it is training); the reference saves once, which changes no loss.
TRAIN = dict(num_train_steps=STEPS, warmup_steps=2, eval_every_steps=STEPS, sync_every_steps=1,
             eval_bleu_examples=0, batch_tokens=768, model__dropout_rate=0.0,
             data__eval_max_examples=1)


def free_job_id() -> int:
  """A job id whose coordinator port (JAX: SLURM_JOB_ID % 4096 + 61440) is free now."""
  for port in random.sample(range(61440, 65536), 100):
    with socket.socket(socket.AF_INET6) as s:
      try:
        s.bind(("::", port))
      except OSError:
        continue
      return 4096 * 10 + port - 61440
  raise AssertionError("no free port in 61440-65535")


def fake_slurm(folder, job: int) -> str:
  """A folder of ``srun`` (the loopback stand-in), ``sbatch`` (answers ``job``) and
  ``scontrol``; the last two record their arguments in ``folder``."""
  bin_dir = folder / "bin"
  bin_dir.mkdir()
  scripts = {
      "srun": f'exec {sys.executable} {ROOT}/tools/srun_loopback.py "$@"',
      "sbatch": f'echo "$@" > {folder}/sbatch.args; echo "{job};cluster"',
      "scontrol": f'echo "$@" >> {folder}/scontrol.args'}
  for name, line in scripts.items():
    (bin_dir / name).write_text(f"#!/bin/sh\n{line}\n")
    (bin_dir / name).chmod(0o755)
  return str(bin_dir)


def cpu_env(devices: int) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
              + os.environ["MT_FLAX_TEST_XLA_FLAGS"])


@pytest.fixture
def start():
  """``start(argv, env)``: a process in its own group (the job's tasks join it), its output in
  ``stderr``; groups still running at the end are killed."""
  procs = []

  def run(argv: list[str], env: dict) -> subprocess.Popen:
    procs.append(subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True))
    return procs[-1]
  yield run
  for proc in procs:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()


def test_slurm_job_trains_like_one_process_and_requeues_at_the_time_limit(
    tmp_path, tiny_training, monkeypatch, start):
  flags = ["--config", tiny_training.config, *tiny_training.overrides(**TRAIN)]
  reference = tiny_training.new_workdir(tmp_path, "one_process")
  ref = start([sys.executable, "-m", "mt_flax", "train", "--workdir", reference, *flags,
               f"--config.checkpoint_every_steps={STEPS}"], cpu_env(8))

  workdir = tiny_training.new_workdir(tmp_path, "slurm")
  job = free_job_id()
  monkeypatch.setenv("PATH", fake_slurm(tmp_path, job) + ":" + os.environ["PATH"])
  argv = ["--nodes", "2", "--gpus-per-node", "1", "--", "train", "--workdir", workdir, *flags,
          "--config.checkpoint_every_steps=2"]
  assert slurm_command.main(argv) == 0
  script = os.path.join(workdir, slurm.SCRIPT)
  assert (tmp_path / "sbatch.args").read_text().split() == ["--parsable", script]
  assert slurm.job_id(workdir) == str(job)
  # what sbatch gives the script on 2 nodes with 1 GPU each; srun adds the rest
  env = dict(cpu_env(4), SLURM_JOB_ID=str(job), SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2",
             SLURM_GPUS_ON_NODE="1")

  proc = start(["bash", script], env)
  tiny_training.wait(tiny_training.has_checkpoint(workdir, 2), proc, "checkpoint 2", 240)
  os.kill(proc.pid, signal.SIGUSR1)                 # --signal=B:USR1@300 to the batch shell
  code, out = tiny_training.finish(proc)
  assert code == train.PREEMPTED_EXIT, out[-3000:]
  assert "task 0 exited 143" in out and "task 1 exited 143" in out, out[-3000:]
  assert "SIGTERM: saved checkpoint step" in out
  assert (tmp_path / "scontrol.args").read_text() == f"requeue {job}\n"
  stopped = max(tiny_training.losses(workdir))
  assert 2 <= stopped < STEPS

  proc = start(["bash", script], env)                # the requeued job: the same script
  code, out = tiny_training.finish(proc)
  assert code == 0, out[-3000:]
  assert f"resumed from checkpoint step {stopped}" in out
  assert "jit over 8 device(s), 2 process(es)" in out   # CPU tasks keep all 4 of their devices
  assert (tmp_path / "scontrol.args").read_text() == f"requeue {job}\n"   # not again

  code, out = tiny_training.finish(ref)
  assert code == 0, out[-3000:]
  got, want = tiny_training.losses(workdir), tiny_training.losses(reference)
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=1e-4)
  from mt_flax.metrics import read_metrics
  assert len([r for r in read_metrics(workdir) if "loss" in r]) == STEPS   # each step once

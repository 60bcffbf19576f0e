"""SLURM: the sbatch script of ``mt_flax slurm --dry-run``, its one-line refusals, and the
check each task makes of the GPUs it uses against the layout."""
import os
import sys

import pytest

from mt_flax import sharding, slurm
from mt_flax.commands import slurm as slurm_command
from mt_flax.errors import IdleGpus

TRAIN = ["train", "--config", "experiments/wmt14_en_de.py:big", "--workdir", "/shared/run",
         "--config.mesh.fsdp=8"]


def dry_run(capsys, *argv: str) -> tuple[int, str, str]:
  rc = slurm_command.main(["--dry-run", *argv])
  out = capsys.readouterr()
  return rc, out.out, out.err


def test_one_task_per_gpu_script(capsys):
  rc, out, err = dry_run(capsys, "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu",
                         "--time", "24:00:00", "--account", "mt", "--", *TRAIN)
  assert rc == 0, err
  lines = out.splitlines()
  assert lines[0] == "#!/bin/bash"
  assert [l for l in lines if l.startswith("#SBATCH")] == [
      "#SBATCH --job-name=mt_flax-run", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8",
      "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu", "#SBATCH --time=24:00:00",
      "#SBATCH --account=mt", "#SBATCH --output=/shared/run/slurm.log",
      "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@300", "#SBATCH --requeue"]
  assert f"cd {os.getcwd()}" in lines
  flags = " ".join(slurm.XLA_GPU_FLAGS)
  assert f'export XLA_FLAGS="{flags} ${{XLA_FLAGS:-}}"' in lines
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
  assert ("export NCCL_DEBUG=${NCCL_DEBUG:-WARN}    # NCCL's warnings and errors, in the log"
          in lines)
  # every task runs the same command; every GPU of a node is visible to its tasks
  assert (f"srun --ntasks-per-node=8 --kill-on-bad-exit=0 {sys.executable} -m mt_flax train "
          "--config experiments/wmt14_en_de.py:big --workdir /shared/run "
          "--config.mesh.fsdp=8 &") in lines
  assert "--gpus-per-task" not in out
  assert lines[-3:] == [
      'if [ "$stopping" = 1 ]; then wait "$step"; status=$?; fi   # the trap ended the wait',
      'if [ "$stopping" = 1 ] && [ "$status" = 143 ]; then scontrol requeue "$SLURM_JOB_ID"; fi',
      'exit "$status"']
  assert "trap 'stopping=1; kill -TERM \"$step\"' USR1" in lines


def test_the_tasks_run_the_given_interpreter(capsys):
  """``./launch.sh slurm`` passes its GPU venv's python (the tasks need CUDA JAX, this
  process need not have it)."""
  rc, out, err = dry_run(capsys, "--gpus-per-node", "2", "--python", "/shared/.venv-gpu/bin/python",
                         "--", *TRAIN)
  assert rc == 0, err
  assert ("srun --ntasks-per-node=2 --kill-on-bad-exit=0 /shared/.venv-gpu/bin/python -m "
          "mt_flax train") in out


def test_one_task_per_node_is_refused_in_one_line(capsys):
  rc, out, err = dry_run(capsys, "--nodes", "2", "--gpus-per-node", "8", "--tasks-per-node",
                         "1", "--", *TRAIN)
  assert (rc, out) == (2, "")
  assert err == ("mt_flax slurm: error: 7 of the 8 GPUs of each node would sit idle: 1 task(s) "
                 "per node using 1 GPU(s) each (JAX gives a SLURM task the one GPU numbered "
                 "SLURM_LOCALID); start one task per GPU, srun --ntasks-per-node=8 (as "
                 "mt_flax slurm does)\n")


def test_one_task_alone_uses_every_gpu(capsys):
  """A single task is not distributed: JAX pins no GPU and it uses all of its node's."""
  rc, out, err = dry_run(capsys, "--gpus-per-node", "4", "--tasks-per-node", "1", "--", *TRAIN)
  assert rc == 0, err
  assert "srun --ntasks-per-node=1 " in out and "#SBATCH --gpus-per-node=4" in out.splitlines()


@pytest.mark.parametrize("argv, message", [
    (["--gpus-per-node", "8", "--", "eval", "--workdir", "/shared/run"], "expected the train command"),
    (["--gpus-per-node", "8"], "expected the train command"),
    (["--gpus-per-node", "8", "--", "train", "--config", "c.py", "--workdir", "gs://b/r"],
     "a file system every node mounts"),
    (["--", *TRAIN], "submit needs --gpus-per-node"),
    (["--nodes", "0", "--gpus-per-node", "8", "--", *TRAIN], "expected positive numbers"),
    (["--gpus-per-node", "8", "--tasks-per-node", "16", "--", *TRAIN],
     "at most one task per GPU"),
    (["logs"], "takes --workdir DIR"),
    (["cancel", "--workdir", "/nonexistent/run"], "no slurm_job in /nonexistent/run"),
])
def test_bad_command_lines_are_one_line_errors(capsys, argv, message):
  rc, out, err = dry_run(capsys, *argv)
  assert (rc, out) == (2, "")
  assert message in err and len(err.strip().splitlines()) == 1, err


def test_logs_and_cancel(capsys, tmp_path):
  (tmp_path / slurm.JOB_FILE).write_text("4242\n")
  assert dry_run(capsys, "logs", "--workdir", str(tmp_path), "--follow")[:2] == (
      0, f"tail -n 100 -f {tmp_path}/slurm.log\n")
  assert dry_run(capsys, "cancel", "--workdir", str(tmp_path))[:2] == (0, "scancel 4242\n")


@pytest.mark.parametrize("gpus, tasks, per_task, idle", [
    (8, 8, 1, 0), (8, 1, 8, 0), (4, 2, 2, 0), (8, 1, 1, 7), (8, 4, 1, 4), (8, 8, 0, 8)])
def test_gpu_layout(gpus, tasks, per_task, idle):
  if not idle:
    sharding.check_gpu_layout(gpus, tasks, per_task)
    return
  with pytest.raises(IdleGpus) as e:
    sharding.check_gpu_layout(gpus, tasks, per_task)
  message = str(e.value)
  assert "\n" not in message
  assert ("JAX found no GPU" in message if per_task == 0 else
          message.startswith(f"{idle} of the {gpus} GPUs of each node would sit idle"))


def test_each_task_checks_its_gpus(monkeypatch):
  """What a task compares: its GPUs (none on the CPU backend) x SLURM_NTASKS / the step's
  nodes against SLURM_GPUS_ON_NODE; nothing outside a SLURM step with GPUs, or on a CPU
  run asked for with JAX_PLATFORMS."""
  step = dict(SLURM_PROCID="3", SLURM_NTASKS="16", SLURM_STEP_NUM_NODES="2",
              SLURM_GPUS_ON_NODE="8")
  seen = []
  monkeypatch.setattr(sharding, "check_gpu_layout", lambda *a: seen.append(a))
  sharding.check_slurm_gpus(step)
  sharding.check_slurm_gpus({**step, "SLURM_NTASKS": "2"})
  sharding.check_slurm_gpus({**step, "JAX_PLATFORMS": "cpu"})
  sharding.check_slurm_gpus({k: v for k, v in step.items() if k != "SLURM_GPUS_ON_NODE"})
  assert seen == [(8, 8, 0), (8, 1, 0)]       # the tests' CPU backend: no GPU in use

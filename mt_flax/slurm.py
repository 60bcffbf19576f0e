r"""SLURM GPU clusters: an sbatch script that trains with one task per GPU; submit, logs, cancel.

``submit`` writes ``WORKDIR/slurm.sbatch`` (WORKDIR: the ``--workdir`` of the train command
after ``--``, a folder every node mounts) and submits it with ``sbatch``; the job id goes to
``WORKDIR/slurm_job`` and the output of every task, across requeues, to ``WORKDIR/slurm.log``.
``--dry-run`` prints the script and writes nothing. ``logs`` shows that log, ``cancel`` runs
``scancel`` on the job.

One task per GPU: ``jax.distributed.initialize()`` recognises a SLURM step and gives each
task only the GPU numbered ``SLURM_LOCALID``, so the script starts ``srun
--ntasks-per-node=G`` and leaves every GPU of a node visible to its tasks (no
``--gpus-per-task``). Every task runs the same ``python -m mt_flax train`` command; process 0
writes checkpoints, metrics and the lock, as on a TPU pod. A layout that would leave GPUs idle
(one task per node: 7 of 8 GPUs unused) is refused in one line, here and by every task at
start (:func:`mt_flax.sharding.check_gpu_layout`).

Time limit: SLURM sends USR1 to the script 300 s before it (``--signal=B:USR1@300``); the
script passes SIGTERM to the tasks through ``srun``, they agree on it at their next sync
point, save a checkpoint and exit with status 143, and the script requeues the job
(``--requeue``, ``scontrol requeue``), which resumes from that checkpoint when it starts
again. ``scancel`` or a preemption sends SIGTERM to the tasks themselves: they save and stop,
and the script does not requeue.

Settings the script exports (``XLA_FLAGS`` and ``NCCL_DEBUG`` already set are kept, after
these): XLA's latency-hiding scheduler, which overlaps the gradient all-reduce (and FSDP's
all-gathers and reduce-scatters) with computation, and thresholds that combine those
collectives into transfers of up to 128 MiB (64 MiB for reduce-scatter) instead of one per
parameter, as MaxText and NVIDIA's JAX-Toolbox run on GPUs; ``NCCL_DEBUG=WARN`` puts NCCL's
warnings and errors in the log.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from typing import Sequence

from mt_flax import cli, sharding
from mt_flax.errors import UserError

ACTIONS = ("submit", "logs", "cancel")
SCRIPT, JOB_FILE, LOG_FILE = "slurm.sbatch", "slurm_job", "slurm.log"
STOP_MARGIN_S = 300    # seconds before the time limit at which the tasks save and stop
XLA_GPU_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864",
)


class SlurmError(UserError, ValueError):
  """A bad slurm command line; the message is one line for the user."""


@dataclasses.dataclass(frozen=True)
class Job:
  """The allocation of one run: ``nodes`` x ``gpus_per_node``, ``tasks_per_node`` (0: one
  per GPU) and the optional ``#SBATCH`` settings."""
  nodes: int
  gpus_per_node: int
  tasks_per_node: int = 0
  partition: str = ""
  time: str = ""
  account: str = ""

  @property
  def tasks(self) -> int:
    return self.tasks_per_node or self.gpus_per_node


def run_workdir(mt_args: Sequence[str]) -> str:
  """The absolute workdir of the train command ``mt_args``; refuses what the job cannot run."""
  if not mt_args or mt_args[0] != "train":
    got = f"; got {mt_args[0]!r}" if mt_args else ""
    raise SlurmError("expected the train command after --, e.g. -- train --config "
                     f"experiments/wmt14_en_de.py --workdir /shared/runs/x{got}")
  workdir = cli.flag_value(mt_args, "--workdir")
  if not workdir or "://" in workdir:
    raise SlurmError("slurm needs the train command's --workdir on a file system every node "
                     f"mounts (it holds the script and the log); got {workdir!r}")
  return os.path.abspath(workdir)


def check_job(job: Job) -> None:
  """Positive sizes, and no GPU left idle: with several tasks, each uses one GPU."""
  if job.nodes < 1 or job.gpus_per_node < 1 or job.tasks_per_node < 0:
    raise SlurmError(f"--nodes {job.nodes} --gpus-per-node {job.gpus_per_node}: expected "
                     "positive numbers")
  if job.tasks > job.gpus_per_node:
    raise SlurmError(f"--tasks-per-node {job.tasks}: expected at most one task per GPU "
                     f"({job.gpus_per_node})")
  alone = job.nodes * job.tasks == 1      # one task, not distributed: it sees every GPU
  sharding.check_gpu_layout(job.gpus_per_node, job.tasks, job.gpus_per_node if alone else 1)


def sbatch_script(job: Job, mt_args: Sequence[str], *, python: str = sys.executable,
                  cwd: str = "") -> str:
  """The sbatch script that runs ``python -m mt_flax <mt_args>`` (a train command) on every
  task of ``job`` from ``cwd`` (default: this folder), stopping and requeueing before the
  time limit."""
  check_job(job)
  workdir = run_workdir(mt_args)
  options = [f"--job-name=mt_flax-{os.path.basename(workdir)}", f"--nodes={job.nodes}",
             f"--ntasks-per-node={job.tasks}", f"--gpus-per-node={job.gpus_per_node}",
             *(f"--{k}={v}" for k, v in (("partition", job.partition), ("time", job.time),
                                          ("account", job.account)) if v),
             f"--output={os.path.join(workdir, LOG_FILE)}", "--open-mode=append",
             f"--signal=B:USR1@{STOP_MARGIN_S}", "--requeue"]
  srun = shlex.join(["srun", f"--ntasks-per-node={job.tasks}", "--kill-on-bad-exit=0",
                     python, "-m", "mt_flax", *mt_args])
  return "\n".join([
      "#!/bin/bash",
      *(f"#SBATCH {option}" for option in options),
      f"# mt_flax {mt_args[0]} on {job.nodes} node(s) x {job.gpus_per_node} GPU(s), one task "
      "per GPU; written by mt_flax slurm (see its --help).",
      f"cd {shlex.quote(cwd or os.getcwd())}",
      "# XLA: overlap collectives with computation, combine them into large transfers.",
      f'export XLA_FLAGS="{" ".join(XLA_GPU_FLAGS)} ${{XLA_FLAGS:-}}"',
      "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}    # NCCL's warnings and errors, in the log",
      f"# {STOP_MARGIN_S} s before the time limit: SIGTERM to every task (they save a "
      "checkpoint and exit 143), then requeue to resume.",
      "stopping=0",
      "trap 'stopping=1; kill -TERM \"$step\"' USR1",
      "# not killed when another task exits first: a task that stops may still be saving",
      f"{srun} &",
      "step=$!",
      'wait "$step"; status=$?',
      'if [ "$stopping" = 1 ]; then wait "$step"; status=$?; fi   # the trap ended the wait',
      'if [ "$stopping" = 1 ] && [ "$status" = 143 ]; then scontrol requeue "$SLURM_JOB_ID"; fi',
      'exit "$status"',
      ""])


def job_id(workdir: str) -> str:
  """The id of the job submitted for ``workdir`` (``WORKDIR/slurm_job``)."""
  try:
    with open(os.path.join(workdir, JOB_FILE)) as f:
      return f.read().strip()
  except FileNotFoundError:
    raise SlurmError(f"no {JOB_FILE} in {workdir}: no job was submitted for it with "
                     "mt_flax slurm") from None


def logs_command(workdir: str, *, follow: bool = False, lines: int = 100) -> list[str]:
  return ["tail", "-n", str(lines), *(["-f"] if follow else []), os.path.join(workdir, LOG_FILE)]


def cancel_command(workdir: str) -> list[str]:
  return ["scancel", job_id(workdir)]

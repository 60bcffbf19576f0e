"""A stand-in for SLURM's ``srun`` inside a job, for tests: all tasks on this machine.

    srun_loopback.py --ntasks-per-node=G [--other-option=value ...] PROGRAM [ARGS...]

Starts ``SLURM_JOB_NUM_NODES`` (from the job's environment, default 1) x G copies of PROGRAM
with the environment SLURM gives the tasks of a step: ``SLURM_STEP_NODELIST=localhost``
(so JAX's coordinator is on loopback, on port ``SLURM_JOB_ID % 4096 + 61440``),
``SLURM_STEP_NUM_NODES``, ``SLURM_NTASKS``, ``SLURM_NTASKS_PER_NODE``, ``SLURM_PROCID``,
``SLURM_LOCALID`` and ``SLURM_NODEID``; ``SLURM_JOB_ID`` and ``SLURM_GPUS_ON_NODE`` come from
the job. SIGTERM and SIGINT are passed on to every task, as srun does. Other options are
ignored; no task is killed when another ends. Prints each task's exit status and exits with
the largest (128 + N for a task ended by signal N).
"""
import os
import signal
import subprocess
import sys


def main(argv: list[str]) -> int:
  options = {}
  while argv and argv[0].startswith("--"):
    key, _, value = argv.pop(0)[2:].partition("=")
    options[key] = value
  per_node = int(options.get("ntasks-per-node", "1"))
  nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", "1"))
  step = dict(SLURM_STEP_NODELIST="localhost", SLURM_STEP_NUM_NODES=str(nodes),
              SLURM_NTASKS=str(nodes * per_node), SLURM_NTASKS_PER_NODE=str(per_node))
  tasks = [subprocess.Popen(argv, env={**os.environ, **step, "SLURM_PROCID": str(i),
                                       "SLURM_LOCALID": str(i % per_node),
                                       "SLURM_NODEID": str(i // per_node)})
           for i in range(nodes * per_node)]

  def forward(signum, frame):
    del frame
    for task in tasks:
      if task.poll() is None:
        task.send_signal(signum)
  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  codes = [task.wait() for task in tasks]
  codes = [128 - c if c < 0 else c for c in codes]
  for i, code in enumerate(codes):
    print(f"srun_loopback: task {i} exited {code}", file=sys.stderr)
  return max(codes)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))

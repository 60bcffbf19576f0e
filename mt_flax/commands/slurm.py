r"""``python -m mt_flax slurm``: the command line of :mod:`mt_flax.slurm`.

    ./launch.sh slurm [submit] --nodes N --gpus-per-node G [--partition P] [--time T] \
        [--account A] [--dry-run] -- train --config FILE --workdir DIR [--config.key=value ...]
    ./launch.sh slurm logs|cancel --workdir DIR [--follow] [--dry-run]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from mt_flax import cli, slurm


def build_parser() -> argparse.ArgumentParser:
  p = cli.new_parser("slurm", slurm.__doc__, __doc__)
  p.add_argument("action", nargs="?", default="submit", choices=slurm.ACTIONS,
                 help="submit (default): write the script and sbatch it; logs; cancel")
  p.add_argument("--dry-run", action="store_true", help="print the script or command, "
                 "write and run nothing")
  p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
  p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs of each node (submit)")
  p.add_argument("--tasks-per-node", type=int, default=0,
                 help="default: one per GPU, what JAX needs (it gives each task one GPU); "
                      "a layout leaving GPUs idle is refused")
  p.add_argument("--partition", default="", help="#SBATCH --partition")
  p.add_argument("--time", default="", help="#SBATCH --time, the time limit, e.g. 24:00:00; "
                 "the run saves and is requeued before it")
  p.add_argument("--account", default="", help="#SBATCH --account")
  p.add_argument("--python", default=sys.executable,
                 help="the interpreter every task runs (default: this one; ./launch.sh "
                      "passes its GPU venv's)")
  p.add_argument("--workdir", default="", help="logs, cancel: the run's workdir")
  p.add_argument("--follow", action="store_true", help="logs: keep printing new lines")
  return p


def submit(args: argparse.Namespace) -> int:
  if not args.gpus_per_node:
    raise slurm.SlurmError("submit needs --gpus-per-node, e.g. 8")
  job = slurm.Job(args.nodes, args.gpus_per_node, args.tasks_per_node, args.partition,
                  args.time, args.account)
  script = slurm.sbatch_script(job, args.mt_args, python=args.python)
  if args.dry_run:
    print(script, end="")
    return 0
  workdir = slurm.run_workdir(args.mt_args)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, slurm.SCRIPT)
  with open(path, "w") as f:
    f.write(script)
  done = call(["sbatch", "--parsable", path], stdout=subprocess.PIPE)
  if done.returncode:
    return done.returncode
  job_id = done.stdout.strip().split(";")[0]
  with open(os.path.join(workdir, slurm.JOB_FILE), "w") as f:
    f.write(job_id + "\n")
  print(f"mt_flax slurm: submitted job {job_id} ({path}); its output goes to "
        f"{os.path.join(workdir, slurm.LOG_FILE)}", file=sys.stderr)
  return 0


def call(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
  try:
    return subprocess.run(cmd, text=True, **kwargs)
  except FileNotFoundError:
    raise slurm.SlurmError(f"{cmd[0]} not found: run this on a SLURM login node, or use "
                           "--dry-run") from None


def run(args: argparse.Namespace) -> int:
  if args.action == "submit":
    return submit(args)
  if args.mt_args or not args.workdir:
    raise slurm.SlurmError(f"slurm {args.action} takes --workdir DIR and no command after --")
  cmd = (slurm.logs_command(args.workdir, follow=args.follow) if args.action == "logs"
         else slurm.cancel_command(args.workdir))
  print(" ".join(cmd), file=sys.stdout if args.dry_run else sys.stderr)
  return 0 if args.dry_run else call(cmd).returncode


main = cli.entry("slurm", build_parser, run, parse_with=cli.parse_passthrough)

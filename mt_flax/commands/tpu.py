r"""``python -m mt_flax tpu``: the command line of :mod:`mt_flax.tpu`.

    ./launch.sh tpu create|setup|run|sweep|logs|delete [--dry-run] --name NAME[,NAME...] \
        --zone ZONE --accelerator TYPE [--project P] [--data-dir gs://...] [-- <mt_flax args>]
"""
from __future__ import annotations

import argparse
import subprocess
import sys

from mt_flax import cli, sweep, tpu
from mt_flax.commands import sweep as sweep_command


def build_parser() -> argparse.ArgumentParser:
  p = cli.new_parser("tpu", tpu.__doc__, __doc__)
  p.add_argument("action", choices=tpu.ACTIONS)
  p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  p.add_argument("--name", required=True, help="TPU VM name; several, comma-separated, for sweep")
  p.add_argument("--zone", required=True, help="e.g. us-central2-b")
  p.add_argument("--accelerator", default="", help="TPU type, e.g. v4-8 or v4-32 (a pod)")
  p.add_argument("--project", default="", help="GCP project (default: gcloud's configured one)")
  p.add_argument("--version", default="", help="TPU software version (default: by accelerator)")
  p.add_argument("--spot", action="store_true", help="create spot (preemptible) VMs")
  p.add_argument("--data-dir", default="", help="gs:// folder of prepared TFDS data (TFDS_DATA_DIR)")
  p.add_argument("--detach", action="store_true", help="run: keep running after disconnecting")
  p.add_argument("--compile-first", action="store_true",
                 help="run train: first compile its config for this slice (longest batch "
                      "shape; mt_flax compile) and stop if it does not compile")
  p.add_argument("--worker", default="0", help="logs: which host's log")
  p.add_argument("--follow", action="store_true", help="logs: keep printing new lines")
  return p


def commands(args: argparse.Namespace) -> list[list[str]]:
  """The command lines of this invocation; a sweep's plan (comment lines) comes first."""
  tpus = tpu.make_tpus(args.action, args.name, args.zone, args.accelerator, args.project)
  cmds = tpu.build(args.action, tpus, args.mt_args, version=args.version, spot=args.spot,
                   data_dir=args.data_dir, detach=args.detach, worker=args.worker,
                   follow=args.follow, compile_first=args.compile_first)
  if args.action == "sweep":    # the sweep file is read here, to name each VM's trials
    sweep_args = sweep_command.parse_args(sweep_command.build_parser(), args.mt_args)
    cmds = tpu.sweep_plan(tpus, sweep.load_sweep(sweep_args.sweep)) + cmds
  return cmds


def run(args: argparse.Namespace) -> int:
  cmds = commands(args)
  if args.dry_run:
    for cmd in cmds:
      print(tpu.format_command(cmd))
    return 0
  for cmd in cmds:
    print(tpu.format_command(cmd), file=sys.stderr, flush=True)
    if cmd[0] == "#":
      continue
    try:
      rc = subprocess.call(cmd)
    except FileNotFoundError:
      print(f"mt_flax tpu: error: {cmd[0]!r} not found; install the Google Cloud CLI "
            "(https://cloud.google.com/sdk) or use --dry-run", file=sys.stderr)
      return 127
    if rc != 0:
      print(f"mt_flax tpu: command failed with exit code {rc}: {tpu.format_command(cmd)}",
            file=sys.stderr)
      return rc
  return 0


main = cli.entry("tpu", build_parser, run, parse_with=cli.parse_passthrough)

r"""``python -m mt_flax average``: the command line of :mod:`mt_flax.averaging`.

    python -m mt_flax average --workdir DIR [--last 5]
    python -m mt_flax eval --workdir DIR --checkpoint averaged

Keep enough checkpoints while training (``keep_checkpoints`` >= N, with
``checkpoint_every_steps`` setting their spacing).
"""
from __future__ import annotations

import argparse

from mt_flax import averaging, cli, sharding


def build_parser() -> argparse.ArgumentParser:
  parser = cli.new_parser("average", averaging.__doc__, __doc__)
  parser.add_argument("--workdir", required=True, help="workdir of a training run (local or gs://)")
  parser.add_argument("--last", type=int, default=5,
                      help="average the last N checkpoints (default 5)")
  return parser


def run(args: argparse.Namespace) -> int:
  sharding.maybe_initialize_distributed()
  info = averaging.average_last(args.workdir, args.last)
  if sharding.is_primary():
    print(f"averaged steps {', '.join(map(str, info['steps']))} into {info['path']}; use "
          f"--checkpoint averaged with eval, translate or audit")
  return 0


main = cli.entry("average", build_parser, run)

r"""``python -m mt_flax sweep``: the command line of :func:`mt_flax.sweep.run_sweep`.

    python -m mt_flax sweep experiments/bible_en_es_tiny.py experiments/sweeps/bible_tiny_lr.py \
        [--workdir runs/sweeps/NAME] [--shard I/N] [--table-only] [--rank-by bleu|loss] \
        [--rank-examples N] [--config.key=value ...]

``--config.x=y`` flags apply to every trial (trial overrides win). ``--shard I/N``
runs trials ``I, I+N, I+2N, ...`` only.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from mt_flax import cli, sweep


def build_parser() -> argparse.ArgumentParser:
  parser = cli.new_parser("sweep", sweep.__doc__, __doc__, config="optional")
  parser.add_argument("positional", nargs="+", metavar="FILE",
                      help="experiment config file (or --config FILE) and the sweep file "
                           "defining get_sweep(), e.g. experiments/sweeps/bible_tiny_lr.py")
  parser.add_argument("--workdir", help="sweep directory (default runs/sweeps/<config>-<sweep>; "
                      "local or gs://)")
  parser.add_argument("--shard", default="0/1", help="run trials I, I+N, ... only (I/N)")
  parser.add_argument("--table-only", action="store_true", help="write and print the table, run nothing")
  parser.add_argument("--rank-by", choices=sorted(sweep.RANK_BY), default="bleu",
                      help="bleu: eval --split validation of each finished trial's best "
                           "checkpoint (default); loss: best validation loss during training")
  parser.add_argument("--rank-examples", type=int, default=0,
                      help="validation pairs scored for --rank-by bleu (default 0: all)")
  return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
  """Parses the sweep command line; ``args.overrides`` apply to every trial."""
  args = cli.parse(parser, argv)
  given = ([args.config] if args.config else []) + args.positional
  if len(given) != 2:
    parser.error("expected a config file and a sweep file (the config positionally or with --config)")
  args.config, args.sweep = given
  return args


def run(args: argparse.Namespace) -> int:
  writer = os.environ.get("MT_FLAX_WORKER", "0") in ("", "0")  # on a TPU pod host 0 keeps the books
  shard = sweep.parse_shard(args.shard)
  try:
    failed = sweep.run_sweep(args.config, args.sweep, sweep_dir=args.workdir, base=args.overrides,
                             shard=shard, table_only=args.table_only, writer=writer,
                             rank_by=args.rank_by, rank_examples=args.rank_examples)
  except KeyboardInterrupt:
    print("[sweep] interrupted; re-run the same command to resume", file=sys.stderr)
    return 130
  if failed:
    print(f"[sweep] {len(failed)} trial(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1
  return 0


main = cli.entry("sweep", build_parser, run, parse_with=parse_args)

"""``python -m mt_flax data-stats``: the command line of :mod:`mt_flax.data.stats`.

    python -m mt_flax data-stats --config experiments/<x>.py [--json] [--workdir DIR]

Prints the report; with ``--json`` the last line of stdout is the dict of figures.
"""
from __future__ import annotations

import argparse
import json

from mt_flax import cli
from mt_flax.config import load_config
from mt_flax.data import stats


def build_parser() -> argparse.ArgumentParser:
  parser = cli.new_parser("data-stats", stats.__doc__, __doc__, config="required")
  parser.add_argument("--workdir", default=None,
                      help="use (or train) the tokenizer of this workdir; default: a temporary one")
  parser.add_argument("--json", action="store_true", help="also print one JSON line at the end")
  return parser


def run(args: argparse.Namespace) -> int:
  figures = stats.collect(load_config(args.config, args.overrides), args.workdir)
  print(stats.render(figures))
  if args.json:
    print(json.dumps(figures))
  return 0


main = cli.entry("data-stats", build_parser, run)

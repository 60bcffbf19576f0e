"""``python -m mt_flax compile``: the command line of :mod:`mt_flax.compile`.

    python -m mt_flax compile --config experiments/wmt14_en_de.py:base --topology v5e-8 \\
        [--shapes max_len|data] [--max-shapes N] [--out DIR] [--top-instructions N]

Needs libtpu (``pip install -c constraints.txt -e '.[tpu]'``), no TPU. Prints a few
lines per batch shape; ``--out DIR`` also writes ``DIR/compile-TOPOLOGY.json``, a list
of one dict per shape. Exit status 1 when a shape does not fit in the chips' HBM.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax

from mt_flax import cli
from mt_flax import compile as aot
from mt_flax.config import load_config
from mt_flax.paths import as_path


def build_parser() -> argparse.ArgumentParser:
  parser = cli.new_parser("compile", aot.__doc__, __doc__, config="required")
  parser.add_argument("--topology", required=True,
                      help="TPU slice, e.g. v5e-8, v6e-8, v4-8, v4-16 (2 hosts), v5p-32 (4 hosts)")
  parser.add_argument("--shapes", choices=("max_len", "data"), default="max_len",
                      help="max_len (default): data.num_buckets lengths evenly spaced up to "
                           "data.max_len, no data needed; data: the buckets of the training "
                           "data, as train compiles them")
  parser.add_argument("--max-shapes", type=int, default=0,
                      help="compile only the N longest shapes (default: all)")
  parser.add_argument("--workdir", default=None,
                      help="with --shapes data: use this run's tokenizer (default: train one "
                           "in a temporary folder)")
  parser.add_argument("--out", default=None, help="write compile-TOPOLOGY.json into this folder")
  parser.add_argument("--top-instructions", type=int, default=0, metavar="N",
                      help="also list the N instructions with the largest results")
  return parser


def run(args: argparse.Namespace) -> int:
  if not os.environ.get("JAX_PLATFORMS"):   # the host computes nothing; libtpu compiles
    jax.config.update("jax_platforms", "cpu")
  config = load_config(args.config, args.overrides)
  reports = aot.run(config, args.topology, shapes=args.shapes, max_shapes=args.max_shapes,
                    workdir=args.workdir, top=args.top_instructions)
  if args.out:
    out = as_path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"compile-{args.topology}.json"
    path.write_text(json.dumps(reports, indent=1))
    print(f"wrote {path}")
  too_big = [r["shape"] for r in reports
             if not (r["train"]["hbm"]["fits"] and r["eval"]["hbm"]["fits"])]
  if too_big:
    print(f"mt_flax compile: {len(too_big)} batch shape(s) do not fit in HBM on {args.topology}, "
          f"e.g. {too_big[0]}", file=sys.stderr)
    return 1
  return 0


main = cli.entry("compile", build_parser, run)

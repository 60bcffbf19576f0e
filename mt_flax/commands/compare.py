r"""Compare runs with significance: ``python -m mt_flax compare DIR_A DIR_B [...] [--split test]
[--samples 1000] [--json FILE]``.

Each DIR is a workdir that ``python -m mt_flax eval`` has evaluated on the
split (or the folder given to ``eval --out``). Prints BLEU and chrF of every
run with the bootstrap mean and 95% confidence interval, and the p-value of
sacrebleu's paired bootstrap test against the first run (``*``: p < 0.05).
Runs evaluated on different references are refused.
"""
from __future__ import annotations

import json

from mt_flax import cli, compare, paths
from mt_flax.errors import UserError


def build_parser():
  parser = cli.new_parser("compare", __doc__)
  parser.add_argument("dirs", nargs="+", metavar="DIR",
                      help="workdirs (or eval output folders); the first is the baseline")
  parser.add_argument("--split", default="test", help="the evaluated split (default test)")
  parser.add_argument("--samples", type=int, default=compare.SAMPLES,
                      help=f"bootstrap resamples (default {compare.SAMPLES})")
  parser.add_argument("--json", default=None, help="also write the result as JSON to this file")
  return parser


def run(args) -> int:
  if len(args.dirs) < 2:
    raise UserError("compare needs at least two runs (DIR_A DIR_B ...)")
  if args.samples < 1:
    raise UserError(f"--samples {args.samples}: expected an integer >= 1")
  names = _names(args.dirs)
  runs = [compare.read_outputs(d, args.split, name) for d, name in zip(args.dirs, names)]
  result = compare.compare(runs, samples=args.samples)
  print(compare.format_table(result))
  for metric, signature in result["signatures"].items():
    print(f"{metric} signature: {signature}")
  if args.json:
    paths.write_text(args.json, json.dumps(result, indent=2))
  return 0


def _names(dirs: list[str]) -> list[str]:
  """Short distinct names: the last path part, or the whole path where those repeat."""
  last = [d.rstrip("/").split("/")[-1] or d for d in dirs]
  return last if len(set(last)) == len(last) else list(dirs)


main = cli.entry("compare", build_parser, run)

r"""``python -m mt_flax eval``: the command line of :func:`mt_flax.evaluate.evaluate_run`.

    python -m mt_flax eval --workdir DIR [--split test] [--beam 4]
        [--checkpoint best|latest|averaged] [--max-examples N] [--long-examples N]
        [--out DIR] [--config.key=value ...]

On a pod every process runs it and decodes its rows of each batch; process 0 writes the
report and prints the summary.
"""
from __future__ import annotations

import argparse
import os

from mt_flax import cli, evaluate, paths, sharding
from mt_flax.config import ConfigError
from mt_flax.inference import load_trained


def build_parser() -> argparse.ArgumentParser:
  parser = cli.new_parser("eval", evaluate.__doc__, __doc__, config="optional")
  cli.add_workdir_args(parser)
  parser.add_argument("--split", default="test", help="validation or test (default test)")
  parser.add_argument("--beam", type=int, default=None,
                      help="beam size (default decode.beam_size; 1 = greedy)")
  parser.add_argument("--max-examples", type=int, default=0,
                      help="evaluate the first N examples of the split (default 0: all)")
  parser.add_argument("--long-examples", type=int, default=None,
                      help="size of the long stress set (0: none; default: data.eval_long_examples)")
  parser.add_argument("--out", default=None, help="output folder (default WORKDIR/eval/SPLIT, "
                      "or WORKDIR/eval/SPLIT-CHECKPOINT for --checkpoint latest|averaged)")
  parser.add_argument("--full-recompute", action="store_true",
                      help="decode without the key/value cache (slow; for comparison)")
  return parser


def check_counts(args: argparse.Namespace) -> None:
  """--beam >= 1, --max-examples and --long-examples >= 0."""
  for flag, value in (("--max-examples", args.max_examples), ("--long-examples", args.long_examples),
                      ("--beam", 1 if args.beam is None else args.beam)):
    if value is not None and value < (1 if flag == "--beam" else 0):
      raise ConfigError(f"{flag} {value}: expected an integer >= {1 if flag == '--beam' else 0}")


def print_summary(report: dict, out_dir: str) -> None:
  """The score table of the report and its signatures, on stdout."""
  print(f"parameters: {report['params']}")
  print(f"{'':>16}  {'pairs':>6} {'BLEU':>6} {'chrF':>6}   {'sources':>7} "
        f"{'BLEU':>6} {'chrF':>6} (multi-reference)")
  for row in report["table"]:
    print(f"{row['name']:>16}  {row['examples']:>6} {row['bleu']:6.2f} {row['chrf']:6.2f}   "
          f"{row['sources']:>7} {row['bleu_multi']:6.2f} {row['chrf_multi']:6.2f}")
  main = report["split_result"]
  print(f"BLEU signature: {main['scores'].get('bleu_signature', '')}")
  print(f"chrF signature: {main['scores'].get('chrf_signature', '')}")
  print(f"multi-reference BLEU signature: {main['multi_scores'].get('bleu_signature', '')}")
  if "tokenized_bleu" in main:
    print(f"tokenized BLEU with compound splitting (compare with papers): "
          f"{main['tokenized_bleu']['bleu']:.2f}")
  print(f"report: {paths.as_path(out_dir) / paths.REPORT_MD}")


def run(args: argparse.Namespace) -> int:
  check_counts(args)
  trained = load_trained(args.workdir, which=args.checkpoint, config_path=args.config,
                         overrides=args.overrides)
  folder = args.split if args.checkpoint == "best" else f"{args.split}-{args.checkpoint}"
  out_dir = os.fspath(paths.as_path(
      args.out or paths.as_path(args.workdir) / paths.EVAL_DIR / folder))
  report = evaluate.evaluate_run(trained, args.split, out_dir=out_dir, beam_size=args.beam,
                                 max_examples=args.max_examples,
                                 long_examples=args.long_examples,
                                 cached=not args.full_recompute)
  if sharding.is_primary():
    print_summary(report, out_dir)
  return 0


main = cli.entry("eval", build_parser, run)

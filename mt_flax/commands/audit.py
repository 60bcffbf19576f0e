r"""Mask audit of a trained run on real validation batches.

    python -m mt_flax audit --workdir DIR [--split validation] [--batches 3] [--rows 16]
        [--checkpoint best|latest|averaged]

Runs the invariance checks of ``mt_flax.invariance`` (causality,
padding-content, padding-length, batch-independence, cross-length and
cached-decoding) on the checkpoint, each on several real batches of different
shapes (shortest, longest and in between), and prints one PASS/FAIL line per
check. Exit status 1 when any check fails, 2 on bad input. On a pod every process runs the
checks on its copy of the params and process 0 prints them.
"""
from __future__ import annotations

import argparse

from mt_flax import cli, data, invariance, sharding
from mt_flax.config import ConfigError
from mt_flax.inference import load_trained


def build_parser() -> argparse.ArgumentParser:
  parser = cli.new_parser("audit", __doc__, config="optional")
  cli.add_workdir_args(parser)
  parser.add_argument("--split", default="validation", help="split whose batches are probed")
  parser.add_argument("--batches", type=int, default=3, help="batches of different shapes")
  parser.add_argument("--rows", type=int, default=16, help="rows per batch (at least 2)")
  return parser


def run(args: argparse.Namespace) -> int:
  if args.rows < 2 or args.batches < 1:
    raise ConfigError(f"--rows {args.rows} --batches {args.batches}: expected rows >= 2 "
                      "and batches >= 1")
  trained = load_trained(args.workdir, which=args.checkpoint, config_path=args.config,
                         overrides=args.overrides)
  say = print if sharding.is_primary() else lambda *_: None
  examples = data.eval_examples(trained.config, trained.tokenizer, args.split)
  batches = [b for b, _ in data.eval_batches(examples, int(trained.config.batch_tokens))]
  chosen = invariance.pick_batches(batches, args.batches, args.rows)
  if not chosen:
    raise data.DataError(f"split {args.split!r} has no batch of 2 or more examples to audit")
  shapes = ", ".join(f"{b['src'].shape[0]}x{b['src'].shape[1]}->{b['tgt_in'].shape[1]}"
                     for b in chosen)
  say(f"audit of {args.workdir} (step {trained.step}) on {len(chosen)} {args.split} batch(es) "
        f"[rows x source -> target: {shapes}]")
  results = invariance.check_batches(trained.model, trained.params, chosen)
  for r in results:
    say(r.line())
  failed = [r.name for r in results if not r.passed]
  say(f"FAILED: {', '.join(failed)}" if failed else "all checks passed")
  return 1 if failed else 0


main = cli.entry("audit", build_parser, run)

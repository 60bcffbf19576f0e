r"""Mask audit of a trained run on real validation batches.

    python -m mt_flax audit --workdir DIR [--split validation] [--batches 3] [--rows 16]
        [--checkpoint best|latest|averaged]

Runs the invariance checks of ``mt_flax.invariance`` (causality,
padding-content, padding-length, batch-independence, cross-length and
cached-decoding) on the checkpoint, each on several real batches of different
shapes (shortest, longest and in between), and prints one PASS/FAIL line per
check. Exit status 1 when any check fails, 2 on bad input.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from mt_flax import cli, invariance
from mt_flax.config import ConfigError
from mt_flax.special_ids import PAD_ID
from mt_flax.inference import load_trained


def pick_batches(batches: Sequence[dict], count: int, rows: int) -> list[dict]:
  """``count`` batches spread over the shapes (shortest to longest), each cut to ``rows`` real rows.

  Only batches with at least two real rows qualify (batch independence needs two).
  """
  real_rows = lambda b: int((b["src"] != PAD_ID).any(1).sum())
  ordered = sorted((b for b in batches if real_rows(b) >= 2),
                   key=lambda b: (b["src"].shape[1] + b["tgt_in"].shape[1], -real_rows(b)))
  if not ordered:
    return []
  picks = sorted(set(np.linspace(0, len(ordered) - 1, max(count, 1)).round().astype(int)))
  out = []
  for i in picks:
    b = ordered[i]
    real = np.flatnonzero((b["src"] != PAD_ID).any(1))[:rows]
    out.append({"src": b["src"][real], "tgt_in": b["tgt_in"][real]})
  return out


def combine(results: Sequence[invariance.CheckResult]) -> invariance.CheckResult:
  """One verdict from the results of one check on several batches."""
  worst = max(results, key=lambda r: (not r.passed, r.max_change / max(r.tolerance, 1e-30)))
  details = "; ".join(sorted({r.detail for r in results if r.detail}))
  return invariance.CheckResult(worst.name, all(r.passed for r in results), worst.max_change,
                                worst.tolerance, details)


def audit(model, params, batches: Sequence[dict]) -> list[invariance.CheckResult]:
  """Every check on every batch, combined per check."""
  per_batch = [invariance.run_checks(model, params, b["src"], b["tgt_in"]) for b in batches]
  return [combine([results[i] for results in per_batch]) for i in range(len(invariance.CHECKS))]


def build_parser():
  parser = cli.new_parser("audit", __doc__, config="optional")
  cli.add_workdir_args(parser)
  parser.add_argument("--split", default="validation", help="split whose batches are probed")
  parser.add_argument("--batches", type=int, default=3, help="batches of different shapes")
  parser.add_argument("--rows", type=int, default=16, help="rows per batch (at least 2)")
  return parser


def run(args) -> int:
  from mt_flax import data
  if args.rows < 2 or args.batches < 1:
    raise ConfigError(f"--rows {args.rows} --batches {args.batches}: expected rows >= 2 "
                      "and batches >= 1")
  trained = load_trained(args.workdir, which=args.checkpoint, config_path=args.config,
                         overrides=args.overrides)
  examples = data.eval_examples(trained.config, trained.tokenizer, args.split)
  batches = [b for b, _ in data.eval_batches(examples, int(trained.config.batch_tokens))]
  chosen = pick_batches(batches, args.batches, args.rows)
  if not chosen:
    raise data.DataError(f"split {args.split!r} has no batch of 2 or more examples to audit")
  shapes = ", ".join(f"{b['src'].shape[0]}x{b['src'].shape[1]}->{b['tgt_in'].shape[1]}"
                     for b in chosen)
  print(f"audit of {args.workdir} (step {trained.step}) on {len(chosen)} {args.split} batch(es) "
        f"[rows x source -> target: {shapes}]")
  results = audit(trained.model, trained.params, chosen)
  for r in results:
    print(r.line())
  failed = [r.name for r in results if not r.passed]
  print(f"FAILED: {', '.join(failed)}" if failed else "all checks passed")
  return 1 if failed else 0


main = cli.entry("audit", build_parser, run)

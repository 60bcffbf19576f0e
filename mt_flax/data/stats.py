"""Figures of a configured dataset: split sizes, leaks, lengths, batching efficiency.

Prepares the dataset if needed, then reports: pairs per split, how many pairs of
each held-out split have a source sentence that is also a training source
(compared case-folded with whitespace collapsed; 0 when the splits do not
leak in the configured direction), malformed lines
and skipped pairs recorded by the builder, pairs dropped or truncated by
`data.max_len`, token-length histograms of the training split, and one epoch
of training batches for each batching mode (bucketing, packing, pad-to-max):
padding efficiency = real tokens / padded slots (every slot of every batch,
empty rows included) per side, distinct batch shapes, batches and pairs out.

The tokenizer is the workdir's (trained there if missing) or, without a
workdir, one trained in a temporary folder. `collect` returns the figures as one
JSON-serialisable dict:

    {"dataset": …, "splits": {"train": N, …},
     "held_out": {"validation": {"pairs": n, "sources": n, "sources_in_train": n}, …},
     "malformed": n, "dropped": n,
     "truncated": n, "histograms": {"src": [count per length], "tgt": […]},
     "batching": {"bucketing": {"src_efficiency": x, "tgt_efficiency": x,
                                "shapes": n, …}, "packing": {…}, "pad_to_max": {…}}}
"""
from __future__ import annotations

import tempfile
from typing import Any

import ml_collections
import numpy as np

from mt_flax.data import bucketing, pipeline, sources
from mt_flax.data.overlap import sentence_key
from mt_flax.data.tokenizer import Tokenizer, load_or_train_tokenizer
from mt_flax.special_ids import PAD_ID

MODES = (("bucket", "bucketing"), ("pack", "packing"), ("pad", "pad_to_max"))


def _pairs_in(batch: pipeline.Batch) -> int:
  if "src_segments" in batch:
    return int(batch["src_segments"].max(axis=1).sum())
  return int((batch["src"][:, 0] != PAD_ID).sum())


def batching_stats(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                   data: pipeline.TrainingSet) -> dict[str, dict[str, Any]]:
  """One epoch of training batches per batching mode, measured."""
  out = {}
  for mode, name in MODES:
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.data.batching = mode
    batches = list(pipeline.train_iterator(cfg, tokenizer, num_epochs=1))
    stats = pipeline.batch_efficiency(batches)
    stats["pairs"] = sum(_pairs_in(b) for b in batches)
    if mode == "bucket":
      boundaries = bucketing.optimal_boundaries(data.src_lens, data.tgt_lens,
                                                int(cfg.data.num_buckets),
                                                int(cfg.data.length_multiple))
      src_eff, tgt_eff = bucketing.padded_slots(data.src_lens, data.tgt_lens, boundaries)
      stats["boundaries"] = [list(b) for b in boundaries]
      stats["assignment_efficiency"] = {"src": src_eff, "tgt": tgt_eff}
      stats["bound"] = {
          "src": bucketing.efficiency_bound(data.src_lens, int(cfg.data.num_buckets)),
          "tgt": bucketing.efficiency_bound(data.tgt_lens, int(cfg.data.num_buckets))}
    out[name] = stats
  return out


def held_out_overlap(config: ml_collections.ConfigDict) -> dict[str, dict[str, int]]:
  """Per held-out split: pairs, distinct sources and pairs whose source is a source of the
  training pairs used (the pipeline leaves out training pairs with a held-out source).

  Sources are compared by :func:`mt_flax.data.overlap.sentence_key`.
  """
  sizes = sources.split_sizes(config)
  if not sizes.get("train"):
    return {}
  left_out = sources.train_sources_held_out(config, sources.data_source(config, "train"))
  train = {sentence_key(src) for (src, _), out in zip(sources.load_pairs(config, "train"),
                                                      left_out) if not out}
  out = {}
  for split in (s for s in ("validation", "test") if sizes.get(s)):
    keys = [sentence_key(src) for src, _ in sources.load_pairs(config, split)]
    out[split] = {"pairs": len(keys), "sources": len(set(keys)),
                  "sources_in_train": sum(1 for k in keys if k in train)}
  return out


def collect(config: ml_collections.ConfigDict, workdir: str | None) -> dict[str, Any]:
  """All figures of the report as a JSON-serialisable dict."""
  sizes = sources.split_sizes(config)
  built = sources.report(config)
  with tempfile.TemporaryDirectory(prefix="mt_flax_data_stats_") as scratch:
    tokenizer = load_or_train_tokenizer(config, workdir or scratch)
    data = pipeline.training_set(config, tokenizer)
    batching = batching_stats(config, tokenizer, data)
  return {
      "dataset": config.data.name,
      "direction": f"{config.data.src_lang}-{config.data.tgt_lang}",
      "splits": sizes,
      "held_out": held_out_overlap(config),
      "malformed": int(built.get("num_malformed", 0)),
      "skipped": built.get("skipped", {}),
      "max_len": data.max_len,
      "dropped": data.dropped,
      "train_left_out_as_held_out": data.held_out,
      "truncated": data.truncated,
      "vocab": {"src": tokenizer.src_vocab_size, "tgt": tokenizer.tgt_vocab_size},
      "histograms": {"src": np.bincount(data.src_lens).tolist(),
                     "tgt": np.bincount(data.tgt_lens).tolist()},
      "batching": batching,
  }


def _histogram_text(counts: list[int], width: int = 40) -> list[str]:
  counts_arr = np.asarray(counts)
  top = len(counts_arr) - 1
  step = max(1, int(np.ceil(top / 16)))
  bins = [(lo, min(lo + step - 1, top)) for lo in range(1, top + 1, step)]
  totals = [int(counts_arr[lo:hi + 1].sum()) for lo, hi in bins]
  peak = max(totals) or 1
  return [f"    {lo:>4}-{hi:<4} {'#' * max(int(round(width * n / peak)), 1 if n else 0):<{width}} "
          f"{n:,}" for (lo, hi), n in zip(bins, totals)]


def render(stats: dict[str, Any]) -> str:
  """The human-readable report."""
  lines = [f"{stats['dataset']} ({stats['direction']}): "
           + "  ".join(f"{k} {v:,}" for k, v in stats["splits"].items())]
  for split, h in stats["held_out"].items():
    lines.append(f"  {split}: {h['pairs']:,} pairs, {h['sources']:,} distinct sources, "
                 f"{h['sources_in_train']:,} pairs whose source is also a training source")
  skipped = ", ".join(f"{k} {v}" for k, v in stats["skipped"].items() if v)
  lines.append(f"malformed lines: {stats['malformed']}"
               + (f"   skipped by the builder: {skipped}" if skipped else "")
               + f"   train pairs dropped (> max_len {stats['max_len']}): {stats['dropped']}"
               + f"   left out (source held out): {stats['train_left_out_as_held_out']}"
               + f"   truncated: {stats['truncated']}")
  lines.append(f"vocabulary: src {stats['vocab']['src']}, tgt {stats['vocab']['tgt']}")
  for side in ("src", "tgt"):
    counts = np.asarray(stats["histograms"][side])
    lengths = np.repeat(np.arange(len(counts)), counts)
    lines.append(f"  train {side} length (tokens incl. EOS/BOS): mean {lengths.mean():.1f}, "
                 f"median {np.median(lengths):.0f}, p99 {np.percentile(lengths, 99):.0f}, "
                 f"max {lengths.max()}")
    lines.extend(_histogram_text(stats["histograms"][side]))
  lines.append("  batching     src_eff  tgt_eff  shapes  batches  pairs")
  for name, b in stats["batching"].items():
    lines.append(f"  {name:<11} {b['src_efficiency']:>8.4f} {b['tgt_efficiency']:>8.4f} "
                 f"{b['shapes']:>7} {b['batches']:>8} {b['pairs']:>6}")
  bucket = stats["batching"]["bucketing"]
  lines.append(f"  bucketing shapes (rows, src, tgt): {bucket['shape_list']}")
  lines.append(
      f"  bucketing without part-filled batches: src {bucket['assignment_efficiency']['src']:.4f}"
      f", tgt {bucket['assignment_efficiency']['tgt']:.4f}; upper bound for any "
      f"{bucket['shapes']} shapes: src {bucket['bound']['src']:.4f}, "
      f"tgt {bucket['bound']['tgt']:.4f}")
  lines.append(f"  packing shape (rows, src, tgt): {stats['batching']['packing']['shape_list']}")
  return "\n".join(lines)

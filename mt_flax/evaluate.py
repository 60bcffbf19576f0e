r"""BLEU and chrF of a trained run: the whole split, length slices, the long stress set.

    python -m mt_flax eval --workdir DIR [--split test] [--beam 4] [--checkpoint best|latest]
        [--max-examples N] [--long-examples N] [--out DIR] [--config.key=value ...]

Scores are sacrebleu's corpus BLEU and chrF on detokenized text, with their
signatures. Slices: source length buckets (``src_len:…``) and reference/source
length ratio buckets (``ratio:…``) of the split's examples, and ``long``, the
stress set of joined pairs longer than any training pair (see
``mt_flax.data.eval_examples``). Written into ``--out`` (default
``DIR/eval/<split>``): ``report.md``, ``report.json``, ``bleu_by_slice.png``,
and the detokenized ``<split>.hyp.txt`` / ``<split>.ref.txt`` (and
``<split>.long.*.txt``), one line per example, so that
``sacrebleu <split>.ref.txt -i <split>.hyp.txt -m bleu chrf`` recomputes the score.

Decoding and scoring live in :mod:`mt_flax.inference`, shared with the training loop.
"""
from __future__ import annotations

import io
import json
import os
import re
import sys
import time
from typing import Optional, Sequence

from mt_flax import checkpoint, files
from mt_flax.config import ConfigError
from mt_flax.inference import (Trained, corpus_scores, decode_settings, load_trained, one_line,
                               translate_examples)
from mt_flax.translate import inference_arguments, parse

CHART = "bleu_by_slice.png"


def _slice_key(name: str) -> tuple:
  kind, _, rest = name.partition(":")
  order = {"src_len": 0, "ratio": 1, "long": 3}.get(kind, 2)
  number = re.search(r"\d+(\.\d+)?", rest)
  value = float(number.group()) if number else 0.0
  side = -1 if rest.startswith("<") else (1 if rest.startswith(">") or rest.endswith("+") else 0)
  return order, value, side, name


def slice_scores(examples: Sequence[dict], hypotheses: Sequence[str]) -> list[dict]:
  """Scores of every slice named in the examples' ``slices``, in a stable order."""
  members: dict[str, list[int]] = {}
  for i, ex in enumerate(examples):
    for name in ex["slices"]:
      members.setdefault(name, []).append(i)
  out = []
  for name in sorted(members, key=_slice_key):
    idx = members[name]
    scores = corpus_scores([hypotheses[i] for i in idx],
                           [one_line(examples[i]["ref_text"]) for i in idx])
    out.append({"name": name, "bleu": scores["bleu"], "chrf": scores["chrf"],
                "examples": len(idx)})
  return out


def _write_lines(path: str, lines: Sequence[str]) -> None:
  files.write_text(path, "".join(line + "\n" for line in lines))


def evaluate_set(config, trained: Trained, examples: Sequence[dict], *, beam_size: int,
                 out_dir: str, stem: str, cached: bool = True) -> dict:
  """Decodes and scores one set of examples, writing ``<stem>.hyp.txt`` / ``<stem>.ref.txt``."""
  t0 = time.time()
  hyps = translate_examples(config, trained.model, trained.params, trained.tokenizer, examples,
                            beam_size=beam_size, cached=cached)
  seconds = time.time() - t0
  refs = [one_line(ex["ref_text"]) for ex in examples]
  _write_lines(os.path.join(out_dir, f"{stem}.hyp.txt"), hyps)
  _write_lines(os.path.join(out_dir, f"{stem}.ref.txt"), refs)
  tokens = sum(len(trained.tokenizer.encode_tgt(h)) for h in hyps)
  return {"scores": corpus_scores(hyps, refs), "slices": slice_scores(examples, hyps),
          "files": {"hyp": f"{stem}.hyp.txt", "ref": f"{stem}.ref.txt"},
          "decode": {"seconds": seconds, "sentences_per_s": len(hyps) / max(seconds, 1e-9),
                     "tokens_per_s": tokens / max(seconds, 1e-9)}}


def plot_slices(path: str, rows: Sequence[dict], title: str) -> None:
  """Horizontal bar chart of BLEU per slice (``rows``: name, bleu, examples)."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.4))
  labels = [f"{r['name']} (n={r['examples']})" for r in rows]
  colors = ["#444444" if r["name"] == "all" else "#ff7f0e" if r["name"] == "long" else "#1f77b4"
            for r in rows]
  ax.barh(range(len(rows)), [r["bleu"] for r in rows], color=colors)
  ax.set_yticks(range(len(rows)), labels)
  ax.invert_yaxis()
  for i, r in enumerate(rows):
    ax.text(r["bleu"], i, f" {r['bleu']:.1f}", va="center", fontsize=8)
  ax.set_xlim(0, max([1.0] + [r["bleu"] for r in rows]) * 1.15)
  ax.set_xlabel("BLEU (sacrebleu)")
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  image = io.BytesIO()
  fig.savefig(image, format="png", dpi=100)
  plt.close(fig)
  files.write_bytes(path, image.getvalue())


def search_name(beam_size: int) -> str:
  return "greedy" if beam_size == 1 else f"beam {beam_size}"


def _markdown(report: dict) -> str:
  d, main = report["decoding"], report["split_result"]
  lines = [f"# Evaluation of `{report['workdir']}` (step {report['step']}, "
           f"{report['checkpoint']} checkpoint) on `{report['split']}`", "",
           f"Decoding: {search_name(d['beam_size'])}, alpha {d['alpha']}, "
           f"max length {d['max_len_a']} * source + {d['max_len_b']}.", "",
           "| slice | examples | BLEU | chrF |", "|---|---:|---:|---:|"]
  for r in report["table"]:
    lines.append(f"| {r['name']} | {r['examples']} | {r['bleu']:.2f} | {r['chrf']:.2f} |")
  s = main["scores"]
  lines += ["", f"- {s.get('bleu_detail', '')}",
            f"- BLEU signature: `{s.get('bleu_signature', '')}`",
            f"- chrF signature: `{s.get('chrf_signature', '')}`",
            f"- decode speed: {main['decode']['sentences_per_s']:.1f} sentences/s, "
            f"{main['decode']['tokens_per_s']:.0f} tokens/s (compilation included)",
            "", "Recompute the scores:", ""]
  lines += [f"    {c}" for c in report["commands"]]
  lines += ["", f"![BLEU per slice]({CHART})", ""]
  return "\n".join(lines)


def evaluate_run(trained: Trained, split: str, *, out_dir: str, beam_size: Optional[int] = None,
                 max_examples: Optional[int] = None, long_examples: Optional[int] = None,
                 which: str = "best", cached: bool = True) -> dict:
  """The full ``eval`` command on a loaded run; writes the files and returns the report.

  ``max_examples``: the first N examples of the split (0 = all; None = the
  config's ``data.eval_max_examples``). ``long_examples``: size of the long
  stress set (0 = none; None = the data default).
  """
  from mt_flax import data

  config = trained.config
  with config.data.ignore_type():
    if max_examples is not None:
      config.data.eval_max_examples = int(max_examples)
    if long_examples is not None:
      config.data.eval_long_examples = int(long_examples)
  long_stress = long_examples is None or long_examples > 0
  settings = decode_settings(config, beam_size)
  examples = data.eval_examples(config, trained.tokenizer, split)
  if not examples:
    raise data.DataError(f"split {split!r} of {config.data.name} has no examples")
  os.makedirs(out_dir, exist_ok=True)
  main = evaluate_set(config, trained, examples, beam_size=settings["beam_size"],
                      out_dir=out_dir, stem=split, cached=cached)
  table = [{"name": "all", **{k: main["scores"][k] for k in ("bleu", "chrf", "examples")}}]
  table += main["slices"]
  commands = [f"sacrebleu {split}.ref.txt -i {split}.hyp.txt -m bleu chrf"]
  long_result = None
  if long_stress:
    long_examples = data.eval_examples(config, trained.tokenizer, split, long_stress=True)
    long_result = evaluate_set(config, trained, long_examples, beam_size=settings["beam_size"],
                               out_dir=out_dir, stem=f"{split}.long", cached=cached)
    table.append({"name": "long",
                  **{k: long_result["scores"][k] for k in ("bleu", "chrf", "examples")}})
    commands.append(f"sacrebleu {split}.long.ref.txt -i {split}.long.hyp.txt -m bleu chrf")
  report = {"workdir": trained.workdir, "step": trained.step, "checkpoint": which,
            "split": split, "dataset": config.data.name,
            "direction": f"{config.data.src_lang}-{config.data.tgt_lang}",
            "decoding": {**settings, "cached": cached},
            "bleu": main["scores"]["bleu"], "chrf": main["scores"]["chrf"],
            "table": table, "split_result": main, "long_result": long_result,
            "commands": commands}
  files.write_text(os.path.join(out_dir, "report.json"), json.dumps(report, indent=2))
  files.write_text(os.path.join(out_dir, "report.md"), _markdown(report))
  plot_slices(os.path.join(out_dir, CHART), table,
              f"{config.data.name} {report['direction']} {split}, step {trained.step}, "
              f"{search_name(settings['beam_size'])}")
  return report


def main(argv: Sequence[str]) -> int:
  parser = inference_arguments("eval", __doc__.split("\n\n")[1])
  parser.add_argument("--split", default="test", help="validation or test (default test)")
  parser.add_argument("--beam", type=int, default=None,
                      help="beam size (default decode.beam_size; 1 = greedy)")
  parser.add_argument("--max-examples", type=int, default=0,
                      help="evaluate the first N examples of the split (default 0: all)")
  parser.add_argument("--long-examples", type=int, default=None,
                      help="size of the long stress set (0: none; default: the data default)")
  parser.add_argument("--out", default=None, help="output folder (default WORKDIR/eval/SPLIT)")
  parser.add_argument("--full-recompute", action="store_true",
                      help="decode without the key/value cache (slow; for comparison)")
  from mt_flax.data import DataError
  try:
    args, config_path, overrides = parse(parser, argv)
    for flag, value in (("--max-examples", args.max_examples),
                        ("--long-examples", args.long_examples)):
      if value is not None and value < 0:
        raise ConfigError(f"{flag} {value}: expected an integer >= 0")
    trained = load_trained(args.workdir, which=args.checkpoint, config_path=config_path,
                           overrides=overrides)
    out_dir = args.out or os.path.join(args.workdir, "eval", args.split)
    report = evaluate_run(trained, args.split, out_dir=out_dir, beam_size=args.beam,
                          max_examples=args.max_examples, long_examples=args.long_examples,
                          which=args.checkpoint, cached=not args.full_recompute)
  except (ConfigError, checkpoint.CheckpointError, DataError) as e:
    print(f"mt_flax eval: error: {e}", file=sys.stderr)
    return 2
  for row in report["table"]:
    print(f"{row['name']:>16}  n={row['examples']:<5} BLEU {row['bleu']:6.2f}  "
          f"chrF {row['chrf']:6.2f}")
  print(f"BLEU signature: {report['split_result']['scores'].get('bleu_signature', '')}")
  print(f"chrF signature: {report['split_result']['scores'].get('chrf_signature', '')}")
  print(f"report: {os.path.join(out_dir, 'report.md')}")
  return 0

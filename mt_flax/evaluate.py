r"""BLEU and chrF of a trained run: the whole split, length slices, the long stress set.

Scores are sacrebleu's corpus BLEU and chrF on detokenized text, with their
signatures, two ways:

- single-reference: every held-out pair is a segment with its one reference;
- multi-reference: pairs with the same source text (whitespace runs made one
  space) are one segment, the source translated once, with all its references.

Slices: source length buckets (``src_len:…``) and reference/source length
ratio buckets (``ratio:…``) of the split's examples (multi-reference within a
slice: each source once, with its references in that slice), and ``long``, the
stress set of joined pairs longer than any training pair (see
``mt_flax.data.eval_examples``). On ``wmt14_translate`` data the report also
gives tokenized BLEU with compound splitting, the metric of Vaswani et al.
(2017) (see :func:`tokenized_bleu`).

:func:`evaluate_run` writes into its ``out_dir`` (the command's default:
``DIR/eval/<split>``): ``report.md``, ``report.json``, ``bleu_by_slice.png``,
and one line per segment:
``<split>.src.txt`` / ``<split>.hyp.txt`` / ``<split>.ref.txt`` (every pair) and
``<split>.multi.hyp.txt`` / ``<split>.multi.ref.<j>.txt`` (each source once;
file j holds each source's j-th reference, or its first one again where it has
fewer, which changes neither BLEU nor chrF). ``report.md`` lists the
``sacrebleu`` commands that recompute both from these files; ``report.json`` holds the
SHA-256 of each text file it scores. A local report folder is written beside ``out_dir``
and renamed into place when complete, so evals of one run at once never mix their files
(the last to finish wins). On a pod every process decodes its rows of each batch (see
:func:`mt_flax.inference.load_trained`) and process 0 alone writes the report.

Decoding and scoring live in :mod:`mt_flax.inference`, shared with the training loop.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
from typing import Optional, Sequence

from etils import epath
from sacrebleu.metrics import BLEU

from mt_flax import paths, sharding
from mt_flax.errors import ConfigError
from mt_flax.inference import (Trained, corpus_scores, decode_settings, one_line, stream_scores,
                               translate_examples)
from mt_flax.paths import REPORT_JSON, REPORT_MD, SLICE_CHART


def _slice_key(name: str) -> tuple:
  kind, _, rest = name.partition(":")
  order = {"src_len": 0, "ratio": 1, "long": 3}.get(kind, 2)
  number = re.search(r"\d+(\.\d+)?", rest)
  value = float(number.group()) if number else 0.0
  side = -1 if rest.startswith("<") else (1 if rest.startswith(">") or rest.endswith("+") else 0)
  return order, value, side, name


def group_by_source(examples: Sequence[dict]) -> list[list[int]]:
  """Indices of ``examples`` grouped by source text (whitespace runs made one space),
  groups in order of first appearance."""
  groups: dict[str, list[int]] = {}
  for i, ex in enumerate(examples):
    groups.setdefault(one_line(ex["src_text"]), []).append(i)
  return list(groups.values())


def reference_streams(references: Sequence[Sequence[str]]) -> list[list[str]]:
  """References per segment -> sacrebleu's reference streams (``streams[j][i]``).

  A segment with fewer references than the widest repeats its first one: clipped
  n-gram counts take the maximum over references, the closest reference length
  and chrF's best reference do not change, so scores equal those with the
  missing references left out, and files of the streams reproduce them.
  """
  width = max((len(refs) for refs in references), default=1)
  return [[refs[j] if j < len(refs) else refs[0] for refs in references] for j in range(width)]


def multi_reference(examples: Sequence[dict], hypotheses: Sequence[str],
                    members: Optional[Sequence[int]] = None) -> tuple[list[str], list[list[str]]]:
  """One hypothesis per distinct source among ``members`` (default all) and the
  reference streams of their references."""
  members = list(range(len(examples)) if members is None else members)
  chosen = [examples[i] for i in members]
  groups = group_by_source(chosen)
  hyps = [hypotheses[members[g[0]]] for g in groups]
  refs = [[one_line(chosen[i]["ref_text"]) for i in g] for g in groups]
  return hyps, reference_streams(refs)


def scores_of(examples: Sequence[dict], hypotheses: Sequence[str],
              members: Optional[Sequence[int]] = None) -> dict:
  """Single- and multi-reference scores of ``members`` (default all) as one table row."""
  members = list(range(len(examples)) if members is None else members)
  single = corpus_scores([hypotheses[i] for i in members],
                         [one_line(examples[i]["ref_text"]) for i in members])
  hyps, streams = multi_reference(examples, hypotheses, members)
  multi = stream_scores(hyps, streams)
  return {"examples": len(members), "bleu": single["bleu"], "chrf": single["chrf"],
          "sources": len(hyps), "references": len(streams), "bleu_multi": multi["bleu"],
          "chrf_multi": multi["chrf"]}


def slice_scores(examples: Sequence[dict], hypotheses: Sequence[str]) -> list[dict]:
  """Scores of every slice named in the examples' ``slices``, in a stable order."""
  members: dict[str, list[int]] = {}
  for i, ex in enumerate(examples):
    for name in ex["slices"]:
      members.setdefault(name, []).append(i)
  return [{"name": name, **scores_of(examples, hypotheses, members[name])}
          for name in sorted(members, key=_slice_key)]


def _write_lines(path: str, lines: Sequence[str]) -> None:
  paths.write_text(path, "".join(line + "\n" for line in lines))


def evaluate_set(config, trained: Trained, examples: Sequence[dict], *, beam_size: int,
                 out_dir: Optional[str], stem: str, cached: bool = True) -> dict:
  """Decodes each distinct source of ``examples`` once, scores and writes the files (none
  when ``out_dir`` is None)."""
  groups = group_by_source(examples)
  t0 = time.time()
  unique = translate_examples(config, trained.model, trained.params, trained.tokenizer,
                              [examples[g[0]] for g in groups], beam_size=beam_size,
                              cached=cached, partitioner=trained.partitioner)
  seconds = time.time() - t0
  hyps = [""] * len(examples)
  for group, hyp in zip(groups, unique):
    for i in group:
      hyps[i] = hyp
  refs = [one_line(ex["ref_text"]) for ex in examples]
  multi_hyps, streams = multi_reference(examples, hyps)
  files = {"src": f"{stem}.src.txt", "hyp": f"{stem}.hyp.txt", "ref": f"{stem}.ref.txt",
           "multi_hyp": f"{stem}.multi.hyp.txt",
           "multi_refs": [f"{stem}.multi.ref.{j}.txt" for j in range(len(streams))]}
  texts = {files["src"]: [one_line(ex["src_text"]) for ex in examples], files["hyp"]: hyps,
           files["ref"]: refs, files["multi_hyp"]: multi_hyps,
           **dict(zip(files["multi_refs"], streams))}
  if out_dir is not None:
    for name, lines in texts.items():
      _write_lines(paths.as_path(out_dir) / name, lines)
  tokens = sum(len(trained.tokenizer.encode_tgt(h)) for h in unique)
  result = {"scores": corpus_scores(hyps, refs), "multi_scores": stream_scores(multi_hyps, streams),
            "slices": slice_scores(examples, hyps), "files": files,
            "decode": {"seconds": seconds, "sentences": len(unique),
                       "sentences_per_s": len(unique) / max(seconds, 1e-9),
                       "tokens_per_s": tokens / max(seconds, 1e-9)}}
  if str(config.data.name).startswith("wmt14_translate"):
    result["tokenized_bleu"] = tokenized_bleu(hyps, refs, str(config.data.tgt_lang))
  return result


_COMPOUND = re.compile(r"(\S)-(\S)")


@functools.lru_cache(maxsize=None)
def _moses(lang: str):
  from sacremoses import MosesTokenizer
  return MosesTokenizer(lang=lang)


def wmt_tokenize(text: str, lang: str) -> str:
  r"""Text as the WMT papers score it: Moses-tokenized, hyphenated compounds split.

  The tokenizer is sacremoses' port of Moses' ``tokenizer.perl -l LANG`` (no
  aggressive hyphen splitting, no HTML escaping: escaping maps one token to
  one token on both sides, so BLEU is the same). Then, as in the evaluation of
  Vaswani et al. (2017) (tensor2tensor's ``get_ende_bleu.sh``), every
  ``x-y`` between two non-space characters becomes ``x ##AT##-##AT## y``, left
  to right without overlaps (so ``a-b-c`` -> ``a ##AT##-##AT## b-c``, as Perl's
  ``s{(\S)-(\S)}{...}g`` does).
  """
  tokens = _moses(lang).tokenize(text, return_str=True, escape=False)
  return _COMPOUND.sub(r"\1 ##AT##-##AT## \2", tokens)


def tokenized_bleu(hypotheses: Sequence[str], references: Sequence[str],
                   lang: str = "de") -> dict:
  """BLEU on :func:`wmt_tokenize`-d text, as ``multi-bleu.perl`` computes it.

  Case-sensitive, no further tokenization, no smoothing (sacrebleu with
  ``tokenize="none"``, ``smooth_method="none"``). This is the number the WMT14
  en-de results of Vaswani et al. (2017) report (27.3 base, 28.4 big); it is
  not comparable with sacreBLEU on detokenized text.
  """
  bleu = BLEU(tokenize="none", smooth_method="none", force=True)
  hyps = [wmt_tokenize(h, lang) for h in hypotheses]
  refs = [wmt_tokenize(r, lang) for r in references]
  score = bleu.corpus_score(hyps, [refs])
  return {"bleu": float(score.score), "detail": str(score), "signature": str(bleu.get_signature()),
          "method": f"sacremoses tokenizer -l {lang}, compound splitting, multi-bleu style"}


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
  paths.write_bytes(path, image.getvalue())


def search_name(beam_size: int) -> str:
  return "greedy" if beam_size == 1 else f"beam {beam_size}"


def _markdown(report: dict) -> str:
  d, main = report["decoding"], report["split_result"]
  lines = [f"# Evaluation of `{report['workdir']}` on `{report['split']}`", "",
           f"Parameters: {report['params']}.", "",
           f"Decoding: {search_name(d['beam_size'])}, alpha {d['alpha']}, "
           f"max length {d['max_len_a']} * source + {d['max_len_b']}"
           + (f", {d['beam_rule']} beam rule" if d["beam_size"] > 1 else "") + ".", "",
           "Single-reference: every pair is a segment. Multi-reference: each distinct source "
           "once, with all its references.", "",
           "| slice | pairs | BLEU | chrF | sources | multi-ref BLEU | multi-ref chrF |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for r in report["table"]:
    lines.append(f"| {r['name']} | {r['examples']} | {r['bleu']:.2f} | {r['chrf']:.2f} | "
                 f"{r['sources']} | {r['bleu_multi']:.2f} | {r['chrf_multi']:.2f} |")
  s, m = main["scores"], main["multi_scores"]
  lines += ["", f"- single-reference {s.get('bleu_detail', '')}",
            f"- single-reference BLEU signature: `{s.get('bleu_signature', '')}`",
            f"- single-reference chrF signature: `{s.get('chrf_signature', '')}`",
            f"- multi-reference {m.get('bleu_detail', '')}",
            f"- multi-reference BLEU signature: `{m.get('bleu_signature', '')}`",
            f"- multi-reference chrF signature: `{m.get('chrf_signature', '')}`"]
  if "tokenized_bleu" in main:
    t = main["tokenized_bleu"]
    lines += [f"- tokenized BLEU with compound splitting (the metric of Vaswani et al. 2017; "
              f"compare with the paper's numbers): {t['bleu']:.2f} ({t['method']}; "
              f"`{t['signature']}`)"]
  lines += [f"- decode speed: {main['decode']['sentences_per_s']:.1f} sentences/s, "
            f"{main['decode']['tokens_per_s']:.0f} tokens/s (compilation included)",
            "", "Recompute the scores from the files in this folder:", ""]
  lines += [f"    {c}" for c in report["commands"]]
  lines += ["", f"![BLEU per slice]({SLICE_CHART})", ""]
  return "\n".join(lines)


def _row(name: str, result: dict) -> dict:
  """The table row of a whole set from :func:`evaluate_set`'s result."""
  s, m = result["scores"], result["multi_scores"]
  return {"name": name, "examples": s["examples"], "bleu": s["bleu"], "chrf": s["chrf"],
          "sources": m["examples"], "references": len(result["files"]["multi_refs"]),
          "bleu_multi": m["bleu"], "chrf_multi": m["chrf"]}


def _commands(stem: str) -> list[str]:
  return [f"sacrebleu {stem}.ref.txt -i {stem}.hyp.txt -m bleu chrf",
          f"sacrebleu {stem}.multi.ref.*.txt -i {stem}.multi.hyp.txt -m bleu chrf"]


def evaluate_run(trained: Trained, split: str, *, out_dir: str, beam_size: Optional[int] = None,
                 max_examples: Optional[int] = None, long_examples: Optional[int] = None,
                 cached: bool = True) -> dict:
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
  out, staged, refused = paths.as_path(out_dir), None, None
  if sharding.is_primary():       # the one process that writes; the others decode their rows
    try:
      staged = _staging_folder(out)
    except ConfigError as e:
      refused = e
  if sharding.any_process(refused is not None):
    raise refused or ConfigError(f"process 0 cannot write the report into {out}")
  try:
    report = _evaluate_into(trained, split, examples, settings, staged, long_stress, cached)
    if staged is not None:
      _install(staged, out)
  except BaseException:
    if staged not in (None, out):
      shutil.rmtree(staged, ignore_errors=True)
    raise
  return report


def _staging_folder(out) -> epath.Path:
  """A new empty folder beside ``out`` that replaces it whole when the eval is done (local
  folders); ``out`` itself on gs://, where folders cannot be renamed."""
  if paths.is_remote(out):
    out.mkdir(parents=True, exist_ok=True)
    return out
  if out.is_dir() and any(out.iterdir()) and not (out / REPORT_JSON).exists():
    raise ConfigError(f"{out} holds files that are not an eval report; expected a new or empty "
                      "folder, or one an earlier eval wrote (it is replaced)")
  out.parent.mkdir(parents=True, exist_ok=True)
  staged = epath.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  os.chmod(staged, 0o755)
  return staged


def _install(staged, out) -> None:
  """Renames ``staged`` to ``out``, moving an older ``out`` aside first: readers see one eval's
  files, whole; of evals that finish together, the last to rename wins."""
  while staged != out:
    try:
      os.rename(staged, out)
      return
    except OSError as e:
      if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
        raise
    old = tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent)
    with contextlib.suppress(FileNotFoundError):    # another eval moved it first
      os.rename(out, os.path.join(old, out.name))
    shutil.rmtree(old, ignore_errors=True)


def _evaluate_into(trained: Trained, split: str, examples: Sequence[dict], settings: dict,
                   out_dir, long_stress: bool, cached: bool) -> dict:
  """Decodes, scores and writes every file of the report into ``out_dir`` (none when it is
  None: a process other than 0)."""
  from mt_flax import data

  config = trained.config
  main = evaluate_set(config, trained, examples, beam_size=settings["beam_size"],
                      out_dir=out_dir, stem=split, cached=cached)
  table = [_row("all", main)] + main["slices"]
  commands = _commands(split)
  long_result = None
  if long_stress:
    long_examples = data.eval_examples(config, trained.tokenizer, split, long_stress=True)
    long_result = evaluate_set(config, trained, long_examples, beam_size=settings["beam_size"],
                               out_dir=out_dir, stem=f"{split}.long", cached=cached)
    table.append(_row("long", long_result))
    commands += _commands(f"{split}.long")[:1]
  report = {"workdir": trained.workdir, "step": trained.step, "checkpoint": trained.which,
            "params": trained.params_source, "split": split, "dataset": config.data.name,
            "direction": f"{config.data.src_lang}-{config.data.tgt_lang}",
            "decoding": {**settings, "cached": cached},
            "bleu": main["scores"]["bleu"], "chrf": main["scores"]["chrf"],
            "bleu_multi": main["multi_scores"]["bleu"], "chrf_multi": main["multi_scores"]["chrf"],
            "sources": main["multi_scores"]["examples"],
            "table": table, "split_result": main, "long_result": long_result,
            "commands": commands}
  if "tokenized_bleu" in main:
    report["tokenized_bleu"] = main["tokenized_bleu"]["bleu"]
  if out_dir is None:
    return report
  out = paths.as_path(out_dir)
  report["sha256"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                      for p in sorted(out.glob("*.txt"))}
  paths.write_text(out / REPORT_JSON, json.dumps(report, indent=2))
  paths.write_text(out / REPORT_MD, _markdown(report))
  plot_slices(out / SLICE_CHART, table,
              f"{config.data.name} {report['direction']} {split}, {trained.which} params, "
              f"step {trained.step}, {search_name(settings['beam_size'])}")
  return report

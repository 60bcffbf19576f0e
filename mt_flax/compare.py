"""Runs compared with significance: paired bootstrap resampling of BLEU and chrF.

Reads what ``python -m mt_flax eval`` wrote (``<workdir>/eval/<split>/<split>.hyp.txt``
and ``.ref.txt``; a folder given to ``eval --out`` works too) and scores every
run on the same references with sacrebleu's paired bootstrap test
(``sacrebleu.significance.PairedTest``, Koehn 2004): the first run is the
baseline, each other run gets a p-value against it, and every run a mean and
95% confidence interval over the resampled test sets. Resampling is seeded
(sacrebleu's ``SACREBLEU_SEED``, default 12345), so a table is reproducible.

:func:`tie_marks` serves ranked tables (the sweep's): which runs are not
significantly different from the best one.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

from mt_flax import paths
from mt_flax.errors import UserError

SAMPLES = 1000        # bootstrap resamples (sacrebleu's default for the paired bootstrap)
SIGNIFICANCE = 0.05
METRICS = ("BLEU", "chrF2")


class CompareError(UserError):
  """Runs that cannot be compared (no eval outputs, different references)."""


@dataclasses.dataclass(frozen=True)
class Outputs:
  """One run's hypotheses and references on a split, one line per segment."""
  name: str
  folder: str
  hypotheses: list[str]
  references: list[str]


def _lines(path) -> list[str]:
  return paths.as_path(path).read_text(encoding="utf-8").splitlines()


def eval_folder(directory: str, split: str) -> str:
  """The folder holding ``<split>.hyp.txt``: ``directory`` itself or ``directory/eval/<split>``."""
  here = paths.as_path(directory)
  for folder in (here, here / "eval" / split):
    if (folder / f"{split}.hyp.txt").exists() and (folder / f"{split}.ref.txt").exists():
      return os.fspath(folder)
  raise CompareError(f"{directory}: no {split}.hyp.txt and {split}.ref.txt there or in "
                     f"eval/{split}/; run `python -m mt_flax eval --workdir {directory} "
                     f"--split {split}` first")


def read_outputs(directory: str, split: str = "test", name: Optional[str] = None) -> Outputs:
  """A run's ``eval`` outputs on ``split`` (see :func:`eval_folder`)."""
  folder = eval_folder(directory, split)
  hyps, refs = _lines(os.path.join(folder, f"{split}.hyp.txt")), \
      _lines(os.path.join(folder, f"{split}.ref.txt"))
  if len(hyps) != len(refs):
    raise CompareError(f"{folder}: {len(hyps)} hypotheses but {len(refs)} references in "
                       f"{split}.hyp.txt / {split}.ref.txt")
  return Outputs(name or os.path.basename(os.path.normpath(directory)), folder, hyps, refs)


def check_same_references(runs: Sequence[Outputs]) -> list[str]:
  """The references all ``runs`` share; a :class:`CompareError` naming the first difference."""
  first = runs[0]
  for run in runs[1:]:
    if len(run.references) != len(first.references):
      raise CompareError(f"{run.name} has {len(run.references)} references, {first.name} "
                         f"{len(first.references)}: the runs were evaluated on different data")
    for i, (a, b) in enumerate(zip(first.references, run.references), 1):
      if a != b:
        raise CompareError(f"the references of {first.name} and {run.name} differ at line {i} "
                           f"({first.folder}, {run.folder}): they cannot be compared")
  return first.references


@dataclasses.dataclass(frozen=True)
class Score:
  """A run's corpus score, bootstrap mean and 95% half-interval, p-value against the baseline."""
  score: float
  mean: float
  ci: float
  p_value: Optional[float]     # None for the baseline


def paired_bootstrap(systems: Sequence[tuple[str, Sequence[str]]], references: Sequence[str], *,
                     samples: int = SAMPLES) -> tuple[dict[str, list[Score]], dict[str, str]]:
  """sacrebleu's paired bootstrap of BLEU and chrF; the first system is the baseline.

  Returns ``({metric: [Score per system, in order]}, {metric: signature})``
  with metric names ``BLEU`` and ``chrF2``.
  """
  from sacrebleu.metrics import BLEU, CHRF
  from sacrebleu.significance import PairedTest

  if len(systems) < 2:
    raise CompareError("compare needs at least two runs")
  test = PairedTest([(name, list(h)) for name, h in systems],
                    {"BLEU": BLEU(), "chrF": CHRF()}, [list(references)], test_type="bs",
                    n_samples=samples)
  signatures, results = test()
  baseline = list(systems[0][1])
  # sacrebleu counts resampled differences strictly above the observed one, so a system with
  # the baseline's very output (difference 0 everywhere) would get the smallest p-value.
  same = [list(h) == baseline for _, h in systems]
  table = {}
  for metric in METRICS:
    table[metric] = [Score(float(r.score), float(r.mean), float(r.ci),
                           None if i == 0 else (1.0 if same[i] else float(r.p_value)))
                     for i, r in enumerate(results[metric])]
  return table, {k: str(v) for k, v in signatures.items()}


def compare(runs: Sequence[Outputs], *, samples: int = SAMPLES) -> dict:
  """Scores ``runs`` (the first is the baseline) on their shared references."""
  references = check_same_references(runs)
  table, signatures = paired_bootstrap([(r.name, r.hypotheses) for r in runs], references,
                                       samples=samples)
  return {"runs": [r.name for r in runs], "folders": [r.folder for r in runs],
          "segments": len(references), "samples": samples,
          "scores": {m: [dataclasses.asdict(s) for s in table[m]] for m in METRICS},
          "signatures": signatures}


def format_table(result: dict) -> str:
  """The comparison as a plain-text table (``*``: p < 0.05 against the baseline)."""
  width = max(12, *(len(n) for n in result["runs"]))
  head = f"{'run':<{width}}  " + "  ".join(f"{m:>6} {'mean ± 95% CI':>15} {'p':>7}"
                                            for m in METRICS)
  lines = [head]
  for i, name in enumerate(result["runs"]):
    cells = []
    for m in METRICS:
      s = result["scores"][m][i]
      p = "base" if s["p_value"] is None else (
          f"{s['p_value']:.4f}" + ("*" if s["p_value"] < SIGNIFICANCE else " "))
      cells.append(f"{s['score']:6.2f} {s['mean']:7.2f} ± {s['ci']:5.2f} {p:>7}")
    lines.append(f"{name:<{width}}  " + "  ".join(cells))
  lines.append(f"{result['segments']} segments; paired bootstrap resampling ({result['samples']} "
               f"samples) against {result['runs'][0]}; * p < {SIGNIFICANCE}")
  return "\n".join(lines)


def tie_marks(systems: Sequence[tuple[str, Sequence[str]]], references: Sequence[str], *,
              metric: str = "BLEU") -> dict[str, str]:
  """Marks for a ranked table: ``"best"`` for the top run by ``metric``, ``"tie"`` for runs
  not significantly different from it (paired bootstrap p >= :data:`SIGNIFICANCE`), ``""``
  otherwise.

  ``systems``: (name, hypotheses) of runs scored on the same ``references``;
  ``metric``: ``"BLEU"`` or ``"chrF2"``.
  """
  from sacrebleu.metrics import BLEU, CHRF

  if metric not in METRICS:
    raise CompareError(f"metric {metric!r}: expected one of {', '.join(METRICS)}")
  if len(systems) == 1:
    return {systems[0][0]: "best"}
  scorer = BLEU() if metric == "BLEU" else CHRF()
  scores = {name: scorer.corpus_score(list(h), [list(references)]).score for name, h in systems}
  order = sorted(systems, key=lambda s: -scores[s[0]])
  table, _ = paired_bootstrap(order, references)
  marks = {order[0][0]: "best"}
  for (name, _), s in zip(order[1:], table[metric][1:]):
    marks[name] = "tie" if s.p_value >= SIGNIFICANCE else ""
  return marks


def run_tie_marks(workdirs: dict[str, str], split: str = "test", *,
                  metric: str = "BLEU") -> dict[str, str]:
  """:func:`tie_marks` of the runs (name -> workdir) that ``eval`` has scored on ``split``.

  Runs without eval outputs get no mark (they are left out of the dict); the
  others must share their references (else :class:`CompareError`). For a
  ranked table such as the sweep's: a ``best``/``tie`` column, ``tie`` meaning
  not significantly different from the best (paired bootstrap p >= 0.05).
  """
  runs = []
  for name, workdir in workdirs.items():
    try:
      runs.append(read_outputs(workdir, split, name))
    except CompareError:
      continue
  if not runs:
    return {}
  references = check_same_references(runs)
  return tie_marks([(r.name, r.hypotheses) for r in runs], references, metric=metric)

"""``python -m mt_flax compare``: runs' eval outputs scored with sacrebleu's paired bootstrap."""
import json
import random

import pytest

from mt_flax import compare
from mt_flax.commands import compare as compare_command

WORDS = "el gato perro casa rojo azul pequeño grande corre come ve rápido lento árbol río".split()


def _references(n: int = 120, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def _corrupt(lines: list[str], rate: float, seed: int) -> list[str]:
  """Each word replaced with probability ``rate``."""
  rng = random.Random(seed)
  return [" ".join(w if rng.random() >= rate else rng.choice(WORDS) for w in line.split())
          for line in lines]


def _eval_run(root, name: str, hyps: list[str], refs: list[str], split: str = "test") -> str:
  """A workdir with what ``eval`` writes: ``eval/<split>/<split>.hyp.txt`` and ``.ref.txt``."""
  folder = root / name / "eval" / split
  folder.mkdir(parents=True)
  (folder / f"{split}.hyp.txt").write_text("".join(h + "\n" for h in hyps))
  (folder / f"{split}.ref.txt").write_text("".join(r + "\n" for r in refs))
  return str(root / name)


def test_better_run_is_significant_and_equal_run_is_not(tmp_path, call_main, capsys):
  refs = _references()
  base = _eval_run(tmp_path, "base", _corrupt(refs, 0.5, 1), refs)
  same = _eval_run(tmp_path, "same", _corrupt(refs, 0.5, 1), refs)
  better = _eval_run(tmp_path, "better", _corrupt(refs, 0.1, 2), refs)
  alike = _eval_run(tmp_path, "alike", _corrupt(refs, 0.5, 5), refs)
  out = tmp_path / "cmp.json"
  assert call_main(compare_command.main, [base, same, better, alike, "--json", str(out)]) == 0
  table = capsys.readouterr().out
  assert "base" in table and "better" in table and "paired bootstrap" in table
  result = json.loads(out.read_text())
  bleu, chrf = result["scores"]["BLEU"], result["scores"]["chrF2"]
  assert result["runs"] == ["base", "same", "better", "alike"] and result["segments"] == len(refs)
  assert bleu[0]["p_value"] is None and bleu[1]["score"] == pytest.approx(bleu[0]["score"])
  assert bleu[1]["p_value"] > 0.5 and chrf[1]["p_value"] > 0.5      # the same output
  assert bleu[2]["score"] > bleu[0]["score"] + 20
  assert bleu[2]["p_value"] < 0.05 and chrf[2]["p_value"] < 0.05
  assert bleu[3]["p_value"] > 0.05 and chrf[3]["p_value"] > 0.05    # as corrupted, other words
  for row in bleu:
    assert row["ci"] > 0 and abs(row["mean"] - row["score"]) < 2 * row["ci"]


def test_runs_on_different_references_are_refused(tmp_path, call_main, capsys):
  refs = _references()
  other = list(refs)
  other[6] = "otra frase"
  a = _eval_run(tmp_path, "a", refs, refs)
  b = _eval_run(tmp_path, "b", refs, other)
  assert call_main(compare_command.main, [a, b]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("mt_flax compare: error:") and "line 7" in err and "\n" not in err


def test_a_run_without_eval_outputs_is_named(tmp_path, call_main, capsys):
  refs = _references(10)
  a = _eval_run(tmp_path, "a", refs, refs)
  (tmp_path / "b").mkdir()
  assert call_main(compare_command.main, [a, str(tmp_path / "b"), "--split", "test"]) == 2
  err = capsys.readouterr().err.strip()
  assert "mt_flax eval --workdir" in err and str(tmp_path / "b") in err and "\n" not in err


def test_eval_out_folder_is_accepted(tmp_path):
  refs = _references(10)
  workdir = _eval_run(tmp_path, "a", refs, refs, split="validation")
  outputs = compare.read_outputs(f"{workdir}/eval/validation", "validation", "a")
  assert outputs.hypotheses == refs and outputs.references == refs


def test_tie_marks_rank_by_the_metric_and_mark_ties_with_the_best():
  refs = _references(150)
  best = _corrupt(refs, 0.1, 3)
  systems = [("worse", _corrupt(refs, 0.6, 4)), ("best", best), ("copy", list(best))]
  marks = compare.tie_marks(systems, refs)
  assert marks == {"best": "best", "copy": "tie", "worse": ""} or \
      marks == {"copy": "best", "best": "tie", "worse": ""}
  assert compare.tie_marks(systems[:1], refs) == {"worse": "best"}


@pytest.mark.parametrize("command", ["compare", "export"])
def test_help_and_one_line_usage_errors(command, capsys):
  from mt_flax import __main__ as entry
  assert entry.main([command, "--help"]) == 0
  out = capsys.readouterr().out
  assert out.startswith(f"usage: mt_flax {command}") and "--help" in out
  assert entry.main([command, "--no-such-flag"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"mt_flax {command}: error:"), err


def test_run_tie_marks_skip_runs_without_eval_outputs(tmp_path):
  refs = _references(150)
  best = _corrupt(refs, 0.1, 3)
  dirs = {"a": _eval_run(tmp_path, "a", best, refs),
          "b": _eval_run(tmp_path, "b", _corrupt(refs, 0.6, 4), refs),
          "c": str(tmp_path / "never_evaluated")}
  assert compare.run_tie_marks(dirs, "test") == {"a": "best", "b": ""}
  assert compare.run_tie_marks({"c": dirs["c"]}, "test") == {}

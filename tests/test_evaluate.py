"""`python -m mt_flax eval` and `validation_bleu` on a real trained run; scoring and slicing."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mt_flax import data, decode, evaluate, inference


def sacrebleu_cli(folder: Path, ref: str, hyp: str) -> dict:
  """Scores recomputed by the `sacrebleu` command from the saved text files."""
  command = ["-m", "sacrebleu", ref, "-i", hyp, "-m", "bleu", "chrf", "-w", "4"]
  proc = subprocess.run([sys.executable, *command], cwd=folder, capture_output=True, text=True,
                        check=True)
  bleu, chrf = json.loads(proc.stdout)
  return {"bleu": bleu["score"], "chrf": chrf["score"]}


def test_eval_cli_writes_a_report_that_sacrebleu_reproduces(tmp_path, trained_run, run_cli):
  out = tmp_path / "eval"
  proc = run_cli("eval", "--workdir", trained_run, "--split", "test", "--beam", "2",
                 "--max-examples", "6", "--long-examples", "2",
                 "--out", str(out))
  assert proc.returncode == 0, proc.stderr.decode()[-2000:]
  assert "BLEU signature: nrefs:1|case:mixed|eff:no|tok:13a" in proc.stdout.decode()
  report = json.loads((out / "report.json").read_text())
  assert (out / "report.md").read_text().startswith("# Evaluation")
  assert (out / evaluate.CHART).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  hyps = (out / "test.hyp.txt").read_text().split("\n")
  refs = (out / "test.ref.txt").read_text().split("\n")
  assert hyps[-1] == refs[-1] == "" and len(hyps) == len(refs) == 7
  assert any(h.strip() for h in hyps), "a trained model says something"
  again = sacrebleu_cli(out, "test.ref.txt", "test.hyp.txt")
  assert again["bleu"] == pytest.approx(report["bleu"], abs=0.01)
  assert again["chrf"] == pytest.approx(report["chrf"], abs=0.01)
  long_again = sacrebleu_cli(out, "test.long.ref.txt", "test.long.hyp.txt")
  rows = {r["name"]: r for r in report["table"]}
  assert rows["long"]["examples"] == 2
  assert rows["long"]["bleu"] == pytest.approx(long_again["bleu"], abs=0.01)
  assert rows["all"]["examples"] == 6
  assert sum(r["examples"] for n, r in rows.items() if n.startswith("src_len:")) == 6
  assert sum(r["examples"] for n, r in rows.items() if n.startswith("ratio:")) == 6
  assert report["decoding"]["beam_size"] == 2 and report["step"] == 40


def test_validation_bleu_is_greedy_by_default_and_scores_the_hypotheses(loaded_run):
  run = loaded_run
  examples = data.eval_examples(run.config, run.tokenizer, "validation")
  width = decode.padded_width(min(len(ex["src_ids"]) for ex in examples))
  examples = [ex for ex in examples if decode.padded_width(len(ex["src_ids"])) == width][:6]
  got = inference.validation_bleu(run.config, run.model, run.params, run.tokenizer, examples)
  assert set(got) >= {"bleu", "chrf"} and all(isinstance(v, float) for v in got.values())
  hyps = inference.translate_examples(run.config, run.model, run.params, run.tokenizer, examples,
                                     beam_size=1)
  expected = inference.corpus_scores(hyps, [ex["ref_text"] for ex in examples])
  assert got["bleu"] == expected["bleu"] and got["chrf"] == expected["chrf"]


def test_corpus_scores_of_perfect_and_disjoint_output():
  refs = ["el gato se sentó en la alfombra", "hola a todos mis amigos"]
  perfect = inference.corpus_scores(refs, refs)
  assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)
  assert "tok:13a" in perfect["bleu_signature"] and "nc:6" in perfect["chrf_signature"]
  assert inference.corpus_scores(["xyz qqq"] * 2, refs)["bleu"] == 0.0
  assert inference.corpus_scores([], [])["examples"] == 0


def test_slice_scores_group_examples_in_a_stable_order():
  def ex(ref, *slices):
    return {"ref_text": ref, "slices": list(slices)}
  examples = [ex("a b c d", "src_len:11-20", "ratio:>1.25"), ex("e f g h", "src_len:1-10",
              "ratio:<0.8"), ex("i j k l", "src_len:81+", "ratio:0.8-1.25"),
              ex("m n o p", "src_len:1-10", "ratio:0.8-1.25")]
  hyps = ["a b c d", "x", "i j k l", "m n o p"]
  rows = evaluate.slice_scores(examples, hyps)
  assert [r["name"] for r in rows] == ["src_len:1-10", "src_len:11-20", "src_len:81+",
                                       "ratio:<0.8", "ratio:0.8-1.25", "ratio:>1.25"]
  by_name = {r["name"]: r for r in rows}
  assert by_name["src_len:1-10"]["examples"] == 2
  assert by_name["ratio:0.8-1.25"]["bleu"] == pytest.approx(100.0)
  assert by_name["ratio:<0.8"]["bleu"] == 0.0


def test_eval_reports_bad_input_in_one_line(trained_run, call_main, capsys, tmp_path):
  rc = call_main(evaluate.main, ["--workdir", str(tmp_path / "missing")])
  err = capsys.readouterr().err
  assert rc == 2 and err.startswith("mt_flax eval: error:") and "missing" in err
  rc = call_main(evaluate.main, ["--workdir", trained_run, "--split", "tset",
                                 "--out", str(tmp_path / "o")])
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if line.startswith("mt_flax eval: error")]
  assert rc == 2 and len(errors) == 1 and "tset" in errors[0] and "Traceback" not in err
  rc = call_main(evaluate.main, ["--workdir", trained_run, "--max-examples", "-3"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and err == ["mt_flax eval: error: --max-examples -3: expected an integer >= 0"]

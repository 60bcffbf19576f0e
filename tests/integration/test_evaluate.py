"""`mt_flax eval` and `validation_bleu` on a real trained run; scoring and slicing."""
import dataclasses
import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

from mt_flax import data, decode, evaluate, inference, paths
from mt_flax.commands import evaluate as eval_command


def sacrebleu_scores(folder: Path, ref, hyp: str) -> dict:
  """Scores recomputed with sacrebleu's BLEU and chrF from the saved text files, read as its
  command line reads them (line by line, trailing white space dropped)."""
  from sacrebleu.metrics import BLEU, CHRF
  read = lambda name: [line.rstrip() for line in open(folder / name, encoding="utf-8")]
  refs = [read(name) for name in ([ref] if isinstance(ref, str) else ref)]
  hyps = read(hyp)
  return {"bleu": BLEU().corpus_score(hyps, refs).score,
          "chrf": CHRF().corpus_score(hyps, refs).score}


def test_eval_command_writes_a_report_that_sacrebleu_reproduces(tmp_path, trained, call_main,
                                                                capsys):
  out = tmp_path / "eval"
  workdir, summary = trained
  # fairseq's rule: under t5x's a barely trained model's best hypotheses can be empty
  code = call_main(eval_command.main, ["--workdir", workdir, "--split", "test", "--beam", "2",
                                   "--max-examples", "6", "--long-examples", "2",
                                   "--out", str(out), "--config.decode.beam_rule=fairseq"])
  assert code == 0, capsys.readouterr().err[-2000:]
  assert "BLEU signature: nrefs:1|case:mixed|eff:no|tok:13a" in capsys.readouterr().out
  report = json.loads((out / "report.json").read_text())
  assert (out / "report.md").read_text().startswith("# Evaluation")
  assert (out / paths.SLICE_CHART).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  hyps = (out / "test.hyp.txt").read_text().split("\n")
  refs = (out / "test.ref.txt").read_text().split("\n")
  assert hyps[-1] == refs[-1] == "" and len(hyps) == len(refs) == 7
  assert any(h.strip() for h in hyps), "a trained model says something"
  again = sacrebleu_scores(out, "test.ref.txt", "test.hyp.txt")
  assert again["bleu"] == pytest.approx(report["bleu"], abs=0.01)
  assert again["chrf"] == pytest.approx(report["chrf"], abs=0.01)
  long_again = sacrebleu_scores(out, "test.long.ref.txt", "test.long.hyp.txt")
  rows = {r["name"]: r for r in report["table"]}
  assert rows["long"]["examples"] == 2
  assert rows["long"]["bleu"] == pytest.approx(long_again["bleu"], abs=0.01)
  assert rows["all"]["examples"] == 6
  assert sum(r["examples"] for n, r in rows.items() if n.startswith("src_len:")) == 6
  assert sum(r["examples"] for n, r in rows.items() if n.startswith("ratio:")) == 6
  step = summary["step"]
  assert report["decoding"]["beam_size"] == 2 and report["step"] == step
  assert report["decoding"]["beam_rule"] == "fairseq"
  assert report["params"] == f"best checkpoint (step {step})"
  multi = sacrebleu_scores(out, sorted(p.name for p in out.glob("test.multi.ref.*.txt")),
                        "test.multi.hyp.txt")
  assert multi["bleu"] == pytest.approx(report["bleu_multi"], abs=0.01)
  assert multi["chrf"] == pytest.approx(report["chrf_multi"], abs=0.01)
  assert "multi-ref BLEU" in (out / "report.md").read_text()


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
    return {"src_text": ref, "ref_text": ref, "slices": list(slices)}
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
  rc = call_main(eval_command.main, ["--workdir", str(tmp_path / "missing")])
  err = capsys.readouterr().err
  assert rc == 2 and err.startswith("mt_flax eval: error:") and "missing" in err
  rc = call_main(eval_command.main, ["--workdir", trained_run, "--split", "tset",
                                 "--out", str(tmp_path / "o")])
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if line.startswith("mt_flax eval: error")]
  assert rc == 2 and len(errors) == 1 and "tset" in errors[0] and "Traceback" not in err
  rc = call_main(eval_command.main, ["--workdir", trained_run, "--max-examples", "-3"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and err == ["mt_flax eval: error: --max-examples -3: expected an integer >= 0"]


# ----------------------------------------------------------------------------- multi-reference


def test_padding_reference_streams_by_repetition_equals_leaving_references_out():
  from sacrebleu.metrics import BLEU, CHRF
  hyps = ["the cat", "hello", "a b c d"]    # shorter than the references: BP < 1
  refs = [["a cat sat on the mat", "the cat is on the mat", "there is a cat"], ["hello there"],
          ["a b c d e f g h", "a b x d"]]
  streams = evaluate.reference_streams(refs)
  assert streams == [["a cat sat on the mat", "hello there", "a b c d e f g h"],
                     ["the cat is on the mat", "hello there", "a b x d"],
                     ["there is a cat", "hello there", "a b c d e f g h"]]
  missing = [[r[j] if j < len(r) else None for r in refs] for j in range(3)]
  for metric in (BLEU(), CHRF()):
    assert metric.corpus_score(hyps, streams).score == pytest.approx(
        metric.corpus_score(hyps, missing).score, abs=1e-9)
  # empty strings instead would count as (empty) references and change BLEU
  empty = [[r[j] if j < len(r) else "" for r in refs] for j in range(3)]
  assert BLEU().corpus_score(hyps, empty).score != pytest.approx(
      BLEU().corpus_score(hyps, missing).score, abs=1e-3)


def test_multi_reference_groups_pairs_by_source():
  examples = [{"src_text": s, "ref_text": r} for s, r in
              [("Go.", "Ve."), ("Run!", "¡Corre!"), ("Go. ", "Vete."), ("go.", "Vaya."),
               ("Go.", "Ve.")]]
  assert evaluate.group_by_source(examples) == [[0, 2, 4], [1], [3]]
  hyps = ["Ve.", "Corre.", "Ve.", "Ve.", "Ve."]
  got_hyps, streams = evaluate.multi_reference(examples, hyps)
  assert got_hyps == ["Ve.", "Corre.", "Ve."]
  assert streams == [["Ve.", "¡Corre!", "Vaya."], ["Vete.", "¡Corre!", "Vaya."],
                     ["Ve.", "¡Corre!", "Vaya."]]
  row = evaluate.scores_of(examples, hyps, [0, 1, 2])
  assert row["examples"] == 3 and row["sources"] == 2 and row["references"] == 2


def test_evaluate_set_decodes_each_source_once_and_writes_files_sacrebleu_reproduces(tmp_path,
                                                                                   loaded_run):
  run = loaded_run
  base = data.eval_examples(run.config, run.tokenizer, "validation")[:5]
  # the same source three times with three references (two of them other pairs' references)
  examples = base + [{**base[0], "ref_text": base[1]["ref_text"]},
                     {**base[0], "ref_text": base[2]["ref_text"]}]
  result = evaluate.evaluate_set(run.config, run, examples, beam_size=1, out_dir=str(tmp_path),
                                 stem="x")
  assert result["decode"]["sentences"] == 5
  assert result["multi_scores"]["examples"] == 5 and result["scores"]["examples"] == 7
  hyps = (tmp_path / "x.hyp.txt").read_text().splitlines()
  assert hyps[0] == hyps[5] == hyps[6]
  assert result["files"]["multi_refs"] == ["x.multi.ref.0.txt", "x.multi.ref.1.txt",
                                           "x.multi.ref.2.txt"]
  single = sacrebleu_scores(tmp_path, "x.ref.txt", "x.hyp.txt")
  assert single["bleu"] == pytest.approx(result["scores"]["bleu"], abs=0.01)
  multi = sacrebleu_scores(tmp_path, result["files"]["multi_refs"], "x.multi.hyp.txt")
  assert multi["bleu"] == pytest.approx(result["multi_scores"]["bleu"], abs=0.01)
  assert multi["chrf"] == pytest.approx(result["multi_scores"]["chrf"], abs=0.01)
  assert "nrefs:3" in result["multi_scores"]["bleu_signature"]
  assert "tokenized_bleu" not in result        # only on WMT14 data


# ----------------------------------------------------------------------------- WMT tokenized BLEU


def test_wmt_tokenize_splits_hyphenated_compounds_like_the_paper_evaluation():
  assert evaluate.wmt_tokenize("Die Staats-Anwaltschaft sagte: \"Nein\".", "de") == (
      'Die Staats ##AT##-##AT## Anwaltschaft sagte : " Nein " .')
  # left to right without overlaps, as Perl's s{(\S)-(\S)}{...}g; a lone dash stays
  assert evaluate.wmt_tokenize("a-b-c und - so", "de") == "a ##AT##-##AT## b-c und - so"


def test_tokenized_bleu_counts_compound_parts_and_ignores_detokenization():
  from sacrebleu.metrics import BLEU
  refs = ["Der EU-Gipfel in Br\u00fcssel hat begonnen, sagte der Sprecher."]
  assert evaluate.tokenized_bleu(refs, refs)["bleu"] == pytest.approx(100.0)
  # Only the spacing around punctuation differs: the same text once tokenized.
  spaced = ["Der EU-Gipfel in Br\u00fcssel hat begonnen , sagte der Sprecher ."]
  assert evaluate.tokenized_bleu(spaced, refs)["bleu"] == pytest.approx(100.0)
  # One compound part wrong: with compound splitting "EU" and the dash still match
  # (12 of 13 tokens instead of 10 of 11), which changes the score.
  hyp = ["Der EU-Rat in Br\u00fcssel hat begonnen, sagte der Sprecher."]
  got = evaluate.tokenized_bleu(hyp, refs)
  hyp_tok = "Der EU ##AT##-##AT## Rat in Br\u00fcssel hat begonnen , sagte der Sprecher ."
  ref_tok = "Der EU ##AT##-##AT## Gipfel in Br\u00fcssel hat begonnen , sagte der Sprecher ."
  expected = BLEU(tokenize="none", smooth_method="none").corpus_score([hyp_tok], [[ref_tok]])
  assert got["bleu"] == pytest.approx(expected.score) and 0 < got["bleu"] < 100
  unsplit = BLEU(tokenize="none", smooth_method="none").corpus_score(
      [hyp_tok.replace(" ##AT##-##AT## ", "-")], [[ref_tok.replace(" ##AT##-##AT## ", "-")]])
  assert got["bleu"] != pytest.approx(unsplit.score, abs=0.1)
  assert got["detail"].split()[3].startswith("92.3/")           # unigram precision 12/13
  assert "tok:none" in got["signature"]


def evaluate_copy(loaded_run, out: Path, **kw) -> dict:
  """``evaluate_run`` of the loaded run with a config of its own (it sets a few keys)."""
  trained = dataclasses.replace(loaded_run, config=loaded_run.config.copy_and_resolve_references())
  return evaluate.evaluate_run(trained, "test", out_dir=str(out), **kw)


def assert_consistent(out: Path, others_staging: bool = False) -> dict:
  """The report in ``out`` scores exactly the hypothesis files beside it (and no staging
  folder is left beside ``out``, unless another eval is still writing: ``others_staging``)."""
  report = json.loads((out / "report.json").read_text())
  hyps = (out / "test.hyp.txt").read_text().splitlines()
  assert len(hyps) == report["table"][0]["examples"] == len(
      (out / "test.src.txt").read_text().splitlines())
  assert sacrebleu_scores(out, "test.ref.txt", "test.hyp.txt")["bleu"] == pytest.approx(
      report["bleu"], abs=0.01)
  assert report["sha256"] == {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                              for p in out.glob("*.txt")}
  if not others_staging:
    assert sorted(os.listdir(out.parent)) == [out.name]      # no staging folder left behind
  return report


def test_an_eval_that_fails_midway_leaves_the_previous_report_whole(tmp_path, loaded_run):
  out = tmp_path / "eval" / "test"
  evaluate_copy(loaded_run, out, beam_size=1, max_examples=4, long_examples=0)
  before = assert_consistent(out)
  trained = dataclasses.replace(loaded_run, config=loaded_run.config.copy_and_resolve_references())
  trained.config.data.max_len = 10**6    # the long stress set, made after the split's files, fails
  with pytest.raises(data.DataError, match="no long stress example"):
    evaluate.evaluate_run(trained, "test", out_dir=str(out), beam_size=1, max_examples=2,
                          long_examples=1)
  assert assert_consistent(out) == before
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep")
  with pytest.raises(evaluate.ConfigError, match="not an eval report"):
    evaluate_copy(loaded_run, tmp_path / "mine", max_examples=2, long_examples=0)
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_two_evals_at_once_leave_one_eval_s_files(tmp_path, loaded_run):
  """Two evals of one checkpoint into one folder, started together: the folder holds one of
  them whole (its report scores the hypotheses beside it)."""
  out = tmp_path / "eval" / "test"
  start, errors = threading.Barrier(2), []

  def run(examples: int, beam: int) -> None:
    start.wait()
    try:
      evaluate_copy(loaded_run, out, beam_size=beam, max_examples=examples, long_examples=0)
    except BaseException as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=run, args=args) for args in ((2, 1), (4, 1))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors
  assert assert_consistent(out)["table"][0]["examples"] in (2, 4)


def test_an_eval_that_overlaps_another_one_whole_still_writes_a_consistent_folder(
    tmp_path, loaded_run, monkeypatch):
  """Forced overlap: eval A has written its hypotheses and stops before its report while
  eval B of the same checkpoint runs start to end into the same folder; then A goes on.
  The folder ends up with one eval's files, whole (A's: it finished last)."""
  out = tmp_path / "eval" / "test"
  original, b_done, a_paused = evaluate.evaluate_set, threading.Event(), threading.Event()

  def evaluate_set(*args, **kwargs):
    result = original(*args, **kwargs)
    if threading.current_thread().name == "eval-a":
      a_paused.set()
      assert b_done.wait(600)
    return result

  monkeypatch.setattr(evaluate, "evaluate_set", evaluate_set)

  def eval_a():
    evaluate_copy(loaded_run, out, beam_size=1, max_examples=2, long_examples=0)

  a = threading.Thread(target=eval_a, name="eval-a")
  a.start()
  assert a_paused.wait(600)
  evaluate_copy(loaded_run, out, beam_size=1, max_examples=4, long_examples=0)     # eval B
  assert assert_consistent(out, others_staging=True)["table"][0]["examples"] == 4
  b_done.set()
  a.join()
  assert assert_consistent(out)["table"][0]["examples"] == 2

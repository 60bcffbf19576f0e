"""`mt_flax translate` on a real trained run: line alignment, long lines, bad input."""
import hashlib
import io
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import sentencepiece as spm

from mt_flax import inference
from mt_flax.commands import translate
from mt_flax.data import DataError, Tokenizer

LINES = ["The cat sees the dog.",
         "Red house.",
         "",
         "   ",
         "The teacher eats a green book quickly; the friend runs.",
         "Old trees see the river and the mountain."]


def long_line(words: int = 120) -> str:
  return " ".join(["The small cat runs to the river."] * (words // 7 + 1))


def test_the_run_has_what_inference_needs(trained, loaded_run):
  workdir, summary = trained
  for name in ("config.json", "tokenizer", "checkpoints", "DONE"):
    assert (Path(workdir) / name).exists(), name
  assert loaded_run.step == summary["step"] and loaded_run.model.config.d_model == 32
  assert loaded_run.tokenizer.tgt_vocab_size == loaded_run.model.config.tgt_vocab_size


def test_translate_keeps_one_line_per_input_line_in_order(trained_run, loaded_run, call_main,
                                                          capsys):
  code = call_main(translate.main, ["--workdir", trained_run, "--beam", "1"],
                   ("\n".join(LINES) + "\n").encode())
  out, err = capsys.readouterr()
  assert code == 0, err[-2000:]
  out = out.split("\n")
  assert out[-1] == "" and len(out[:-1]) == len(LINES)
  out = out[:-1]
  assert out[2] == "" and out[3] == ""
  # each line is the translation of that line alone: order kept, batching changes nothing
  alone = [inference.translate_lines(loaded_run, [v], beam_size=1)[0] for v in LINES]
  assert out == alone


def test_overlong_lines_are_truncated_with_a_warning_naming_the_line(trained_run, loaded_run,
                                                                     call_main, capsys):
  text = "\n".join(["Red house.", "", long_line()]).encode()
  rc = call_main(translate.main, ["--workdir", trained_run, "--beam", "1"], text)
  out, err = capsys.readouterr()
  assert rc == 0
  assert len(out.split("\n")) == 4 and out.endswith("\n")
  assert "line 3:" in err and "truncated" in err
  assert f"data.max_len={loaded_run.config.data.max_len}" in err
  assert "line 1:" not in err


def test_overlong_lines_can_be_split_into_pieces(trained_run, call_main, capsys):
  text = (long_line() + "\n").encode()
  rc = call_main(translate.main, ["--workdir", trained_run, "--beam", "1", "--long", "split"],
                 text)
  out, err = capsys.readouterr()
  assert rc == 0 and out.count("\n") == 1
  assert "line 1:" in err and "pieces" in err


def test_invalid_utf8_is_reported_with_its_line_number(call_main, capsys):
  text = b"Red house.\nok\n\xff\xfe broken\nfine\n"
  rc = call_main(translate.main, ["--workdir", "/nonexistent"], text)
  out, err = capsys.readouterr()
  assert rc == 2 and out == ""
  assert "line 3:" in err and "UTF-8" in err and "Traceback" not in err


def test_invalid_utf8_can_be_replaced(trained_run, call_main, capsys):
  text = b"Red house.\n\xff bad\n"
  rc = call_main(translate.main, ["--workdir", trained_run, "--beam", "1", "--invalid",
                                  "replace"], text)
  out, err = capsys.readouterr()
  assert rc == 0 and out.count("\n") == 2
  assert "warning: line 2:" in err


@pytest.mark.parametrize("argv,expected", [
    (["--workdir", "/nonexistent/run"], "/nonexistent/run"),
    (["--workdir", "WORKDIR", "--config.decode.alpah=0.5"], "did you mean decode.alpha"),
    (["--workdir", "WORKDIR", "--beam", "0"], "--beam 0"),
    (["--workdir", "WORKDIR", "--config.decode.max_len_a=-1"], "decode.max_len_a=-1"),
])
def test_bad_input_gives_a_one_line_error(trained_run, call_main, capsys, argv, expected):
  argv = [trained_run if a == "WORKDIR" else a for a in argv]
  rc = call_main(translate.main, argv, b"Red house.\n")
  _, err = capsys.readouterr()
  errors = [line for line in err.splitlines() if line.startswith("mt_flax translate: error")]
  assert rc == 2 and len(errors) == 1 and expected in errors[0]
  assert "Traceback" not in err


def test_read_lines_handles_endings_and_reports_bad_bytes():
  assert inference.read_lines(b"") == ([], [])
  assert inference.read_lines(b"a\r\nb\n\nc") == (["a", "b", "", "c"], [])
  lines, problems = inference.read_lines(b"ok\n\xc3(\n")
  assert lines == [] and problems[0][0] == 2 and "0xc3" in problems[0][1]
  lines, _ = inference.read_lines(b"ok\n\xc3(\n", replace=True)
  assert lines == ["ok", "\ufffd("]


def test_split_to_fit_cuts_at_sentence_ends_then_words():
  fits = lambda text: len(text.split()) <= 4
  assert inference.split_to_fit("One two. Three four five. Six", fits) == [
      "One two.", "Three four five. Six"]
  assert inference.split_to_fit("a b c d e f g", fits) == ["a b c d", "e f g"]


def test_a_changed_tokenizer_file_is_refused_at_load(tmp_path, trained_run, call_main, capsys):
  """The SentencePiece model's bytes are checked against the SHA-256 recorded when it was
  trained: one line naming the file, whether the changed bytes still parse or not."""
  workdir = tmp_path / "run"
  shutil.copytree(trained_run, workdir)
  model = workdir / "tokenizer" / "spm.model"
  good = model.read_bytes()
  recorded = json.loads((workdir / "tokenizer" / "tokenizer.json").read_text())["sha256"]
  assert recorded == {"spm.model": hashlib.sha256(good).hexdigest()}
  still_parses = next(b for b in (good[:i] + bytes([good[i] ^ 1]) + good[i + 1:]
                                  for i in range(len(good) - 1, 0, -1)) if parses(b))
  for changed in (still_parses, good[:len(good) // 3]):
    model.write_bytes(changed)
    code = call_main(translate.main, ["--workdir", str(workdir), "--beam", "1"], b"Red house.\n")
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert (f"the tokenizer file changed since the run was created: {model} has SHA-256 "
            f"{hashlib.sha256(changed).hexdigest()}, expected {recorded['spm.model']}") in err
  (workdir / "tokenizer" / "tokenizer.json").unlink()       # a run without digests
  with pytest.raises(DataError, match=f"{model} is not a SentencePiece model"):
    Tokenizer.load(str(workdir / "tokenizer"))


def parses(raw: bytes) -> bool:
  try:
    spm.SentencePieceProcessor(model_proto=raw)
    return True
  except RuntimeError:
    return False


def test_output_streams_window_by_window_and_equals_one_window(tmp_path, trained_run, loaded_run,
                                                                monkeypatch, capsys):
  """Input through a real pipe, two lines a window: the first window's translations are
  written while the rest of the input has not been sent; the whole output is that of all
  lines translated together."""
  read_end, write_end = os.pipe()
  out_path = tmp_path / "out.txt"
  monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(os.fdopen(read_end, "rb")))
  monkeypatch.setattr(sys, "stdout", open(out_path, "w", encoding="utf-8"))
  seen_early = []

  def feed() -> None:
    with os.fdopen(write_end, "wb") as pipe:
      pipe.write(("\n".join(LINES[:2]) + "\n").encode())
      pipe.flush()
      deadline = time.monotonic() + 120
      while out_path.read_text().count("\n") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
      seen_early.append(out_path.read_text().count("\n"))
      pipe.write(("\n".join(LINES[2:]) + "\n").encode())

  feeder = threading.Thread(target=feed)
  feeder.start()
  code = translate.main(["--workdir", trained_run, "--beam", "1", "--window", "2"])
  feeder.join()
  sys.stdout.close()
  assert code == 0, capsys.readouterr().err[-2000:]
  assert seen_early == [2]
  assert out_path.read_text() == "".join(
      t + "\n" for t in inference.translate_lines(loaded_run, LINES, beam_size=1))


def test_invalid_utf8_after_the_first_window_stops_after_the_windows_before(trained_run,
                                                                           call_main, capsys):
  rc = call_main(translate.main, ["--workdir", trained_run, "--beam", "1", "--window", "2"],
                 b"Red house.\nok\n\xff bad\nfine\n")
  out, err = capsys.readouterr()
  assert rc == 2 and out.count("\n") == 2
  assert "error: line 3: invalid UTF-8 byte 0xff" in err
  assert "lines 1-2 were translated, nothing from line 3 on" in err


def test_windows_start_small_and_double_up_to_the_limit():
  lines = b"".join(f"line {i}\n".encode() for i in range(300))
  sizes = [len(w) for _, w in translate.read_windows(io.BytesIO(lines), "error", 1024)]
  assert sizes == [64, 128, 108]
  firsts = [first for first, _ in translate.read_windows(io.BytesIO(lines), "error", 100)]
  assert firsts == [1, 65, 165, 265]                  # 64, then 100 at a time
  assert [len(w) for _, w in translate.read_windows(io.BytesIO(lines), "error", 2)][:3] == [2, 2, 2]

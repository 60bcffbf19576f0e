"""``eval`` and ``translate`` on an emulated pod: 2 processes x 2 CPU devices on loopback, each
started with the same command line, as ``./launch.sh tpu run ... -- eval ...`` starts one on
every host. They join, decode every batch as one program over the 4 devices, and process 0
alone writes the report and stdout: the same as one process writes. ``translate`` reads
the input of process 0 only (the others get none).

The run is the session's trained tiny run with random parameters saved as its averaged
checkpoint (``--checkpoint averaged``): the barely trained model ends every line at once,
random weights write a few tokens per line.
"""
import json
import shutil

import jax
import numpy as np
import pytest

from mt_flax import checkpoint
from mt_flax.commands import evaluate, translate

EVAL = ["--split", "validation", "--beam", "2", "--max-examples", "3", "--long-examples", "0",
        "--checkpoint", "averaged"]
TEXT = b"In the beginning God created the heavens and the earth.\n\nAnd God said.\nJesus wept.\n"


@pytest.fixture(scope="module")
def random_run(tmp_path_factory, loaded_run) -> str:
  """A copy of the trained run whose averaged params are random."""
  workdir = tmp_path_factory.mktemp("pod_inference") / "run"
  shutil.copytree(loaded_run.workdir, workdir, ignore=shutil.ignore_patterns("eval"))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: rng.normal(0.0, 0.5, p.shape).astype(p.dtype),
                        loaded_run.params)
  checkpoint.save_averaged(str(workdir), params, {"steps": [loaded_run.step], "last": 1})
  return str(workdir)


def report_files(folder) -> dict:
  """Every file of an eval report, the timing fields left out."""
  files = {p.name: p.read_bytes() for p in folder.iterdir()}
  report = json.loads(files.pop("report.json"))
  del report["split_result"]["decode"]
  md = [line for line in files.pop("report.md").decode().splitlines() if "decode speed" not in line]
  return {**files, "report.json": report, "report.md": md}


def test_pod_eval_writes_one_report_equal_to_one_process(random_run, run_pod, call_main, capsys,
                                                         tmp_path):
  assert call_main(evaluate.main, ["--workdir", random_run, *EVAL,
                                   "--out", str(tmp_path / "one")]) == 0
  one = capsys.readouterr().out
  (code0, out0, err0), (code1, out1, err1) = run_pod(
      ["eval", "--workdir", random_run, *EVAL, "--out", str(tmp_path / "pod")])
  assert code0 == code1 == 0, err0[-3000:] + err1[-3000:]
  # Gloo's connection lines go to stderr: stdout holds the report alone
  assert out1 == "" and out0.replace("/pod/", "/one/") == one
  assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "pod", "pod_0"]
  want = report_files(tmp_path / "one")
  assert report_files(tmp_path / "pod") == want
  hyps = want["validation.hyp.txt"].decode().splitlines()
  assert len(hyps) == 3 and all(hyps), hyps


def test_pod_translate_prints_each_line_once_from_the_input_of_process_0(
    random_run, run_pod, call_main, capsys):
  argv = ["--workdir", random_run, "--beam", "1", "--checkpoint", "averaged"]
  assert call_main(translate.main, argv, TEXT) == 0
  one = capsys.readouterr().out
  assert [bool(line) for line in one.splitlines()] == [True, False, True, True], one
  (code0, out0, err0), (code1, out1, err1) = run_pod(["translate", *argv], [TEXT, b""])
  assert code0 == code1 == 0, err0[-3000:] + err1[-3000:]
  assert out0 == one and out1 == ""
  # input that is not UTF-8, read by process 0 alone, stops both with its error
  for code, out, err in run_pod(["translate", *argv], [b"Jesus wept.\n\xff\n", b""]):
    assert code == 2 and out == "" and "lines 1-2 are not UTF-8" in err, err[-3000:]

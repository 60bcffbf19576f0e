"""Ahead-of-time TPU compiles of the default experiment on this CPU host with libtpu
(``python -m mt_flax compile``): real compiles, the command's errors and its exit status."""
import json
import os
import subprocess
import sys

import pytest

from mt_flax import compile as aot
from mt_flax.commands import compile as compile_cmd

from conftest import ROOT

DEFAULT_EXPERIMENT = str(ROOT / "experiments" / "bible_en_es_tiny.py")


def _compile(call_main, tmp_path, capsys, *argv):
  status = call_main(compile_cmd.main, ["--out", str(tmp_path), *argv])
  return status, capsys.readouterr()


def test_command_line_error_is_one_line_without_libtpu_logs():
  """libtpu on a host without TPU chips would log its failed metadata queries to stderr."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  run = subprocess.run([sys.executable, "-m", "mt_flax", "compile", "--config", DEFAULT_EXPERIMENT,
                        "--topology", "v4-16", "--config.mesh.data=2"], capture_output=True,
                       text=True, cwd=ROOT, env={**env, "MT_FLAX_TCMALLOC": "0"})
  assert run.returncode == 2
  assert run.stderr == ("mt_flax compile: error: mesh={'data': 2, 'fsdp': 1, 'tensor': 1} uses 2 "
                        "devices; expected 8 (set one axis to -1 to fill) (topology v4-16 has 8 "
                        "chips)\n")


def test_without_libtpu_the_error_names_the_tpu_extra():
  code = ("import sys; sys.modules['libtpu'] = None\n"   # what an environment without it finds
          "from mt_flax.commands import compile\n"
          f"sys.exit(compile.main(['--config', {DEFAULT_EXPERIMENT!r}, '--topology', 'v5e-8']))")
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
  assert run.returncode == 2
  assert run.stderr.strip().splitlines()[-1] == (
      "mt_flax compile: error: libtpu is not installed; install the tpu extra: "
      "pip install -c constraints.txt -e '.[tpu]'")


def test_a_batch_too_big_for_the_chip_is_reported_and_fails(call_main, tmp_path, capsys):
  status, out = _compile(call_main, tmp_path, capsys, "--config", f"{DEFAULT_EXPERIMENT}:test",
                         "--topology", "v5e-1", "--max-shapes", "1",
                         "--config.batch_tokens=20000000", "--config.model.dropout_rate=0")
  assert status == 1
  [row] = json.loads((tmp_path / "compile-v5e-1.json").read_text())
  assert row["train"]["hbm"] == {"fits": False}
  assert row["train"]["error"].startswith("RESOURCE_EXHAUSTED: Ran out of memory")
  assert "train DOES NOT FIT: RESOURCE_EXHAUSTED" in out.out
  assert out.err == ("mt_flax compile: 1 batch shape(s) do not fit in HBM on v5e-1, e.g. "
                     f"{row['shape']}\n")


@pytest.mark.parametrize("topology, overrides", [
    ("v5e-8", []),                                                        # one host
    ("v4-16", ["--config.mesh.fsdp=2"]),                                  # two hosts
])
def test_default_experiment_compiles_and_fits(call_main, tmp_path, capsys, topology, overrides):
  status, out = _compile(call_main, tmp_path, capsys, "--config", DEFAULT_EXPERIMENT,
                         "--topology", topology, "--max-shapes", "1", *overrides)
  assert status == 0, out.err
  [row] = json.loads((tmp_path / f"compile-{topology}.json").read_text())
  assert row["hosts"] == aot.parse_topology(topology).hosts
  assert max(row["shape"]["src_len"], row["shape"]["tgt_len"]) == 96   # data.max_len
  for step in ("train", "eval"):
    r = row[step]
    assert r["flops"] > 0 and r["bytes_accessed"] > 0 and r["compile_s"] > 0
    hbm = r["hbm"]
    assert hbm["arguments_gib"] > 0 and hbm["outputs_gib"] > 0
    # the tiny eval step can run without HBM temporaries; the train step cannot
    assert hbm["temporaries_gib"] > 0 if step == "train" else hbm["temporaries_gib"] >= 0
    assert hbm["fits"] and hbm["total_gib"] < hbm["capacity_gib"]
    assert r["roofline"]["bound_s"] == max(r["roofline"]["compute_s"], r["roofline"]["memory_s"])
    assert r["roofline"]["tokens_per_s_bound"] > 0
  gradients = row["train"]["collectives"]["all-reduce"]
  assert gradients["count"] >= 1 and gradients["bytes"] > 0     # data-parallel gradient sum
  if topology == "v4-16":                                        # fsdp=2: parameters gathered
    assert row["train"]["collectives"]["all-gather"]["count"] > 0
  assert f"{topology} " in out.out and "HBM/chip" in out.out

"""The benchmarks' own logic on made-up inputs: compile counting, result tables and
targets, the MFU sanity check, the beam-parity bridge and its errors. The probes that
time or size things are in ``tests/perf/test_bench.py``.
"""
import json
import sys

import numpy as np
import pytest

from bench import CompileCounter, all as bench_all, train_step


def test_compile_counter_sees_a_new_shape():
  import jax
  import jax.numpy as jnp
  f = jax.jit(lambda x: x * 2 + 1)
  with CompileCounter() as counter:
    f(jnp.zeros(3)).block_until_ready()
    f(jnp.ones(3)).block_until_ready()     # same shape: no compilation
    f(jnp.zeros(5)).block_until_ready()    # new shape: one more
  assert [n for n in counter.names if "lambda" in n] == ["jit(<lambda>)"] * 2
  assert counter.seconds > 0


def test_train_step_rejects_unknown_size():
  with pytest.raises(ValueError, match="model size 'huge'"):
    train_step.model_config("huge", 64)


def test_targets_read_the_benchmark_results():
  results = {"train_step": {"sizes": {"base": {"mfu": 0.8}}},
             "pipeline": {"modes": {"bucket": {"steady_speedup_vs_pad": 3.0},
                                    "pack": {"steady_speedup_vs_pad": 2.0}}}}
  got = bench_all.targets(results)
  assert got["base_train_mfu"] == {"value": 0.8, "threshold": 0.6, "met": True}
  assert got["bucket_vs_pad"]["met"] is True and got["pack_vs_pad"]["met"] is False
  assert got["cached_beam4_vs_uncached"]["met"] is None     # not run
  # An MFU above 1 is a broken peak measurement: an error, never "met".
  impossible = bench_all.targets({"train_step": {"sizes": {"base": {"mfu": 3.24}}}})
  assert impossible["base_train_mfu"]["met"] is False
  assert "outside (0, 1]" in impossible["base_train_mfu"]["error"]


def test_an_mfu_above_one_is_an_error_of_the_benchmark():
  sizes = {"base": {"mfu": 0.7, "gflops": 35.0, "peak_gflops_used": 50.0}}
  train_step.check_mfu(sizes)
  sizes["small"] = {"mfu": 1.2, "gflops": 60.0, "peak_gflops_used": 50.0}
  with pytest.raises(RuntimeError, match="MFU of small is 1.2"):
    train_step.check_mfu(sizes)


def test_all_rejects_unknown_benchmark(capsys):
  with pytest.raises(SystemExit):
    bench_all.main(["--only", "train_stepp"])
  assert "unknown benchmark" in capsys.readouterr().err


def test_table_renders_a_results_file(tmp_path, capsys):
  report = {"command": "python -m bench.all --quick", "date": "2025-01-01T00:00:00",
            "environment": {"cpu": "cpu", "cores_available": 2, "backend": "cpu", "jax": "x"},
            "benchmarks": {"decode_speed": {"process_memory": {"peak_rss_mib": 100.0}}},
            "targets": bench_all.targets({})}
  path = tmp_path / "results.json"
  path.write_text(json.dumps(report))
  assert bench_all.main(["--table", str(path)]) == 0
  out = capsys.readouterr().out
  assert "decode_speed 100 MiB" in out and "base_train_mfu: - (>= 0.6): not run" in out
  with pytest.raises(SystemExit):
    bench_all.main(["--table", str(tmp_path / "missing.json")])
  assert "not a results file" in capsys.readouterr().err


def test_beam_parity_refuses_a_missing_flax_example_in_one_line(tmp_path, monkeypatch, capsys):
  from bench import beam_parity
  missing = tmp_path / "no_decode.py"
  monkeypatch.setattr(sys, "argv", ["beam_parity", "--workdir", str(tmp_path),
                                    "--flax-decode", str(missing)])
  with pytest.raises(SystemExit) as stopped:     # sys.exit(message): exit status 1, on stderr
    beam_parity.main()
  message = stopped.value.code
  assert isinstance(message, str) and capsys.readouterr().out == ""
  assert len(message.splitlines()) == 1 and str(missing) in message
  assert "examples/wmt/decode.py" in message


def test_wmt_example_compile_refuses_a_folder_without_the_example_in_one_line(tmp_path):
  from bench import wmt_example_compile
  (tmp_path / "models.py").write_text("x = 1\n")          # a models.py, not the example's
  for folder, why in ((tmp_path / "missing", "is not a file"), (tmp_path, "has no Transformer")):
    with pytest.raises(FileNotFoundError) as refused:
      wmt_example_compile.load_example(str(folder))
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and "--flax-wmt" in message and why in message
    assert "examples/wmt/models.py" in message


def test_beam_parity_bridged_logits_follow_the_forced_eos_rule():
  import jax
  import jax.numpy as jnp
  from bench.beam_parity import _bridged_logits
  from mt_flax import decode
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(3, 12)), jnp.float32)
  limits = jnp.array([5, 4, 3])                  # step 3: before, at and past the limit
  got = jax.nn.log_softmax(_bridged_logits(logits, jnp.int32(3), limits), axis=-1)
  want = decode._token_logprobs(logits, jnp.array([False, True, True]))
  np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-6)          # free step
  # at the limit EOS keeps its unrestricted log-probability; the rest of the mass is on PAD
  np.testing.assert_allclose(got[1, decode.EOS_ID], want[1, decode.EOS_ID], atol=1e-6)
  assert np.isclose(np.exp(got[1, decode.PAD_ID]), 1 - np.exp(want[1, decode.EOS_ID]), atol=1e-6)
  finite = {0: set(range(12)) - {decode.PAD_ID, decode.BOS_ID},
            1: {decode.EOS_ID, decode.PAD_ID}, 2: {decode.PAD_ID}}
  for row, tokens in finite.items():
    assert set(np.flatnonzero(np.isfinite(np.asarray(got[row])))) == tokens
  assert float(got[2, decode.PAD_ID]) == 0.0                             # past it: PAD only

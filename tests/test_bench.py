"""Smoke tests of the benchmarks on tiny sizes: they run and return sane JSON.

No timing is asserted here; speed is what ``python -m bench.all`` reports.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from bench import CompileCounter, all as bench_all, matmul_peak, memory, pipeline, train_step

TINY = dict(d_model=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, mlp_dim=64)


def positive(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


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


def test_matmul_peak_reports_rates_per_size():
  out = matmul_peak.measure((32, 64), repeats=2)
  json.dumps(out)
  assert out["peak_size"] in (32, 64)
  assert set(out["sizes"]) == {"32", "64"}
  assert out["peak_gflops"] == max(s["jax_gflops"] for s in out["sizes"].values())
  assert all(positive(s["numpy_gflops"]) for s in out["sizes"].values())


def test_train_step_figures_are_consistent():
  # A peak floor of 1 TFLOP/s, far above what a 64 x 64 matmul reaches, keeps the MFU in
  # [0, 1] whatever the timings (the step can outrun the small matmul): the test checks the
  # arithmetic only.
  out = train_step.bench_size("tiny", batch=4, length=8, vocab=64, repeats=2,
                              peak=matmul_peak.Matmul(64), peak_calls=1,
                              peak_floor_gflops=1e3, **TINY)
  json.dumps(out)
  assert out["d_model"] == 32 and out["params"] > 0
  assert positive(out["flops_per_step"]) and len(out["step_s"]) == 2
  assert positive(out["target_tokens_per_s"])   # a timing: only its sign is checked
  assert out["peak_gflops_used"] == 1e3 >= max(out["peak_gflops_interleaved"])
  assert 0 <= out["mfu"] <= 1                   # rounded to 3 decimals
  assert out["mfu"] == pytest.approx(out["gflops"] / out["peak_gflops_used"], abs=2e-3)
  assert out["step_compilations"] == 1          # fixed shapes: compiled once
  assert out["loss_finite"]
  plan = out["step_memory_mib"]
  assert plan["total"] >= plan["temporaries"] >= 0 and plan["arguments"] > 0
  assert positive(out["memory"]["peak_rss_mib"])


def test_train_step_rejects_unknown_size():
  with pytest.raises(ValueError, match="model size 'huge'"):
    train_step.model_config("huge", 64)


def test_memory_snapshot_on_cpu():
  snap = memory.snapshot()
  assert snap["device_mib"] is None             # CPU: arrays are in the RSS
  assert snap["peak_rss_mib"] >= snap["rss_mib"] * 0.5 > 0


@pytest.mark.slow
def test_pipeline_compares_modes_on_the_same_steps(tmp_path, synthetic_corpus):
  synthetic_corpus(tmp_path / "manual")
  model = [f"--config.model.{k}={v}" for k, v in TINY.items()]
  out = pipeline.compare(3, str(tmp_path / "work"), manual_dir=str(tmp_path / "manual"),
                         overrides=("--config.data.vocab_size=120", "--config.batch_tokens=256",
                                    "--config.data.num_buckets=2", *model))
  json.dumps(out)
  assert set(out) == set(pipeline.MODES)
  for mode, figures in out.items():
    assert figures["steps"] == 3 and positive(figures["target_tokens_per_s"])
    assert 0 < figures["tgt_padding_efficiency"] <= 1
    assert 1 <= figures["compilations"] <= len(figures["shapes"])
  assert len(out["pad"]["shapes"]) == len(out["pack"]["shapes"]) == 1
  assert out["pad"]["tgt_padding_efficiency"] < out["pack"]["tgt_padding_efficiency"]
  assert out["pad"]["tgt_padding_efficiency"] < out["bucket"]["tgt_padding_efficiency"]
  assert positive(out["bucket"]["speedup_vs_pad"]) and positive(out["pack"]["speedup_vs_pad"])


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


def test_compare_times_a_revision_and_the_working_tree_interleaved():
  import subprocess
  shape = dict(batch=2, length=4, vocab=64, label_smoothing=0.1, dropout_rate=0.1,
               attention_dropout_rate=0.1, **TINY)
  out = train_step.compare("HEAD", {"tiny": shape}, repeats=2)
  json.dumps(out)
  got = out["shapes"]["tiny"]
  for side in ("rev", "work"):
    assert len(got[side]["step_s"]) == 2 and positive(got[side]["target_tokens_per_s"])
  assert positive(got["work_over_rev"]) and positive(got["work_over_rev_paired"])
  assert positive(got["work_over_rev_cpu"])
  # The revision's worktree is gone again.
  assert not os.path.exists(out["rev_worktree"])
  assert out["rev_worktree"] not in subprocess.run(
      ["git", "-C", train_step.REPO, "worktree", "list"], capture_output=True, text=True).stdout
  with pytest.raises(ValueError, match="not a git revision"):
    train_step.compare("no-such-revision", {"tiny": shape}, repeats=1)


def test_all_runs_a_benchmark_in_its_own_process():
  out = bench_all.run_isolated("memory", quick=True)
  assert "error" not in out and positive(out["process_memory"]["peak_rss_mib"])


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


def test_decode_speed_measures_a_variant():
  from bench import decode_speed
  model, params = decode_speed.never_eos_model(vocab=64)
  src = np.random.default_rng(0).integers(4, 64, (2, 5)).astype(np.int32)
  out = decode_speed.measure(model, params, src, beam_size=1, cached=True, tgt_len=4, repeats=1)
  json.dumps(out)
  assert out["target_tokens"] == 2 * 4          # EOS only at the length limit
  assert positive(out["sentences_per_s"]) and positive(out["tokens_per_s"])


def test_beam_parity_refuses_a_missing_flax_example_in_one_line(tmp_path):
  import subprocess
  import sys
  missing = tmp_path / "no_decode.py"
  proc = subprocess.run([sys.executable, "-m", "bench.beam_parity", "--workdir", str(tmp_path),
                         "--flax-decode", str(missing)], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 1 and proc.stdout == ""
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and str(missing) in lines[0] and "examples/wmt/decode.py" in lines[0]


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

"""Performance probes, opt-in (./launch.sh test --perf): the benchmarks run on tiny sizes
and return sane JSON.

No timing is asserted here; speed is what ``python -m bench.all`` reports.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from bench import all as bench_all, matmul_peak, memory, pipeline, prefetch, train_step

TINY = dict(d_model=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, mlp_dim=64)


def positive(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


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


def test_memory_snapshot_on_cpu():
  snap = memory.snapshot()
  assert snap["device_mib"] is None             # CPU: arrays are in the RSS
  assert snap["peak_rss_mib"] >= snap["rss_mib"] * 0.5 > 0


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


def test_prefetch_reports_both_arms_of_both_waits():
  out = prefetch.run(rounds=2, steps=2)
  json.dumps(out)
  assert positive(out["build_ms"]) and positive(out["step_ms"]) and out["step_matmuls"] >= 1
  for wait in ("sync", "async"):
    figures = out[wait]
    assert positive(figures["steps_per_s_prefetch_0"])
    assert positive(figures["steps_per_s_prefetch_2"]) and positive(figures["speedup"])
    assert [len(v) for v in figures["per_round"].values()] == [2, 2]
  assert len(out["load_average_before"]) == len(out["load_average_after"]) == 3


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


def test_decode_speed_measures_a_variant():
  from bench import decode_speed
  model, params = decode_speed.never_eos_model(vocab=64)
  src = np.random.default_rng(0).integers(4, 64, (2, 5)).astype(np.int32)
  out = decode_speed.measure(model, params, src, beam_size=1, cached=True, tgt_len=4, repeats=1)
  json.dumps(out)
  assert out["target_tokens"] == 2 * 4          # EOS only at the length limit
  assert positive(out["sentences_per_s"]) and positive(out["tokens_per_s"])



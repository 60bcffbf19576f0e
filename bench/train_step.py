"""Train-step throughput and MFU for the tiny, small and base models at fixed shapes.

    python -m bench.train_step [--quick] [--sizes tiny,small,base] [--batch 64] [--length 32]

The step is :func:`mt_flax.steps.make_train_step` (AdamW, clipping, label
smoothing 0.1, dropout 0.1) on random full rows (no padding), source and
target ``[batch, length]``, vocabulary 8192, shared embeddings tied to the
output as in ``experiments/``.

MFU = (FLOPs of the compiled step from XLA's cost analysis / step time) /
measured fp32 matmul peak (:mod:`bench.matmul_peak`). Each repeat times a burst
of peak-sized matmuls right before one step, so both sides see the same machine
load; ``mfu`` is the median of the per-repeat ratios of the step's rate to the
burst's. ``mfu_vs_best_peak`` divides the median step rate by the best single
matmul rate of the run instead: the same figure on an idle machine, lower when
other processes share the cores.
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from bench import CompileCounter, environment, median, seconds
from bench.matmul_peak import Matmul, measure
from bench.memory import compiled_memory_mib, snapshot
from mt_flax import steps
from mt_flax.model import Transformer, TransformerConfig, count_params

SIZES = {
    "tiny": dict(d_model=128, num_heads=4, num_encoder_layers=2, num_decoder_layers=2,
                 mlp_dim=512),
    "small": dict(d_model=256, num_heads=4, num_encoder_layers=3, num_decoder_layers=3,
                  mlp_dim=1024),
    "base": dict(d_model=512, num_heads=8, num_encoder_layers=6, num_decoder_layers=6,
                 mlp_dim=2048),
}
TRAINING = dict(learning_rate=1e-3, warmup_steps=1000, schedule="rsqrt", num_train_steps=10000,
                weight_decay=0.0, grad_clip_norm=1.0)


def model_config(size: str, vocab: int, **overrides) -> TransformerConfig:
  """The ``size`` model (a key of :data:`SIZES`) with a shared, tied vocabulary."""
  if size not in SIZES:
    raise ValueError(f"model size {size!r}: expected one of {sorted(SIZES)}")
  fields = dict(share_embeddings=True, tie_output=True, dropout_rate=0.1, **SIZES[size])
  return TransformerConfig(src_vocab_size=vocab, tgt_vocab_size=vocab, **{**fields, **overrides})


def random_batch(batch: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Full rows of random non-special ids: ``src``, ``tgt_in``, ``tgt_out`` int32 ``[B, T]``."""
  rng = np.random.default_rng(seed)
  return {k: rng.integers(4, vocab, (batch, length), dtype=np.int32)
          for k in ("src", "tgt_in", "tgt_out")}


def bench_size(size: str, *, batch: int, length: int, vocab: int, repeats: int,
               peak: Matmul, peak_calls: int = 3, **model_overrides) -> dict[str, Any]:
  """Times ``repeats`` train steps of one model size, each after ``peak_calls`` matmuls.

  Returns FLOPs per step (XLA), step seconds, target tokens/s, achieved
  GFLOP/s, ``mfu`` (median of interleaved ratios), ``mfu_vs_best_peak``,
  compile seconds, the number of compilations of the step (1 = no
  recompilation), XLA's buffer plan and the process's peak RSS.
  """
  config = model_config(size, vocab, **model_overrides)
  model = Transformer(config)
  optimizer = steps.make_optimizer(ml_collections.ConfigDict(TRAINING))
  state = steps.create_train_state(model, optimizer, jax.random.key(0))
  n_params = count_params(state.params)
  data = jax.device_put(random_batch(batch, length, vocab))
  step = steps.make_train_step(model, optimizer, label_smoothing=0.1)

  last_metrics = {}

  def run_step():
    nonlocal state
    state, metrics = step(state, data)
    jax.block_until_ready((state, metrics))
    last_metrics.update(metrics)

  def burst():
    for _ in range(peak_calls):
      peak()

  with CompileCounter() as compiles:
    compile_s = seconds(run_step)   # first call: trace, compile, run
    compiled = step.lower(state, data).compile()   # the cached executable, for its analyses
    cost = compiled.cost_analysis()
    flops = float((cost[0] if isinstance(cost, list) else cost)["flops"])
    step_s, burst_gflops = [], []
    for _ in range(repeats):
      burst_gflops.append(peak.gflops(seconds(burst) / peak_calls))
      step_s.append(seconds(run_step))
    best_gflops = max(burst_gflops + [peak.gflops(min(seconds(peak) for _ in range(3)))])
  step_compiles = sum(name.endswith("train_step)") for name in compiles.names)

  rates = [flops / s / 1e9 for s in step_s]
  return {
      "size": size, "params": n_params, **{k: getattr(config, k) for k in SIZES[size]},
      "dropout_rate": config.dropout_rate, "batch": batch, "length": length,
      "vocab": vocab, "flops_per_step": flops, "step_s": [round(s, 4) for s in step_s],
      "step_s_median": round(median(step_s), 4),
      "target_tokens_per_s": round(batch * length / median(step_s), 1),
      "gflops": round(median(rates), 2),
      "peak_gflops_interleaved": [round(p, 1) for p in burst_gflops],
      "peak_gflops_best": round(best_gflops, 1),
      "mfu": round(median([r / p for r, p in zip(rates, burst_gflops)]), 3),
      "mfu_vs_best_peak": round(median(rates) / best_gflops, 3),
      "compile_s": round(compile_s, 2), "step_compilations": step_compiles,
      "loss_finite": bool(last_metrics["finite"] == 1.0),
      "step_memory_mib": compiled_memory_mib(compiled), "memory": snapshot(),
  }


def run(quick: bool = True, sizes: Optional[list[str]] = None, batch: int = 64,
        length: int = 32, vocab: int = 8192, repeats: Optional[int] = None,
        peak_sizes: Optional[tuple[int, ...]] = None) -> dict[str, Any]:
  """Matmul peak, then every size in ``sizes`` (default tiny, small, base)."""
  sizes = sizes or list(SIZES)
  repeats = repeats or (3 if quick else 10)
  peak_sizes = peak_sizes or ((1024, 2048) if quick else (1024, 2048, 4096))
  matmul = measure(peak_sizes)
  peak = Matmul(matmul["peak_size"])
  results = {s: bench_size(s, batch=batch, length=length, vocab=vocab, repeats=repeats,
                           peak=peak) for s in sizes}
  return {"environment": environment(), "matmul_peak": matmul, "dtype": "float32",
          "label_smoothing": 0.1, "dropout_rate": 0.1, "sizes": results}


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer repeats and matmul sizes")
  parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated model sizes")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--length", type=int, default=32)
  parser.add_argument("--vocab", type=int, default=8192)
  parser.add_argument("--repeats", type=int, default=None)
  args = parser.parse_args(argv)
  sizes = [s for s in args.sizes.split(",") if s]
  unknown = [s for s in sizes if s not in SIZES]
  if unknown:
    parser.error(f"--sizes: unknown {unknown}; expected some of {sorted(SIZES)}")
  print(json.dumps(run(args.quick, sizes, args.batch, args.length, args.vocab, args.repeats),
                   indent=2))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

"""Train-step throughput and MFU for the tiny, small and base models at fixed shapes.

    python -m bench.train_step [--quick] [--sizes tiny,small,base] [--batch 64] [--length 32]
    python -m bench.train_step --compare REV [--repeats N] [--shapes small,base]

The step is :func:`mt_flax.steps.make_train_step` (AdamW, clipping, label
smoothing 0.1, dropout 0.1) on random full rows (no padding), source and
target ``[batch, length]``, vocabulary 8192, shared embeddings tied to the
output as in ``experiments/``.

MFU = (FLOPs of the compiled step from XLA's cost analysis / median step time)
/ the best fp32 matmul rate measured in the same run (:mod:`bench.matmul_peak`
before the steps, a burst of peak-sized matmuls before every timed step, and
a few after): the peak is the highest of all those measurements, so load from
other processes can only lower the MFU. A value outside (0, 1] means the peak
measurement failed and is an error, never a result. The base model should reach
an MFU of at least 0.6 (the target ``bench.all`` checks).

``--compare REV`` checks ``REV`` out into a temporary git worktree and times
its train step and the working tree's in two worker processes
(``bench/step_worker.py``), one step at a time, alternating which goes first,
on the shapes of :data:`COMPARE_SHAPES`; it prints both and the ratio. Both
sides inherit the environment: under ``./launch.sh bench train_step --compare
REV`` (which preloads tcmalloc) both use tcmalloc; ``--work-preload LIB`` gives
``LD_PRELOAD=LIB`` to the working tree's side only.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from bench import CompileCounter, checkout, environment, median, seconds
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
               peak: Matmul, peak_calls: int = 3, peak_floor_gflops: float = 0.0,
               **model_overrides) -> dict[str, Any]:
  """Times ``repeats`` train steps of one model size, each after ``peak_calls`` matmuls.

  Returns FLOPs per step (XLA), step seconds, target tokens/s, achieved
  GFLOP/s, ``mfu`` (median step rate over the best matmul rate seen here or
  ``peak_floor_gflops``, whichever is higher), the peak used, compile
  seconds, the number of compilations of the step (1 = no recompilation),
  XLA's buffer plan and the process's peak RSS.
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
    after = [peak.gflops(seconds(peak)) for _ in range(3)]
  best_gflops = max(burst_gflops + after + [peak_floor_gflops])
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
      "peak_gflops_used": round(best_gflops, 1),
      "mfu": round(median(rates) / best_gflops, 3),
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
                           peak=peak, peak_floor_gflops=matmul["peak_gflops"]) for s in sizes}
  best = max(r["peak_gflops_used"] for r in results.values())
  for r in results.values():
    r["peak_gflops_used"], r["mfu"] = best, round(r["gflops"] / best, 3)
  check_mfu(results)
  return {"environment": environment(), "matmul_peak": matmul, "peak_gflops_used": best,
          "dtype": "float32", "label_smoothing": 0.1, "dropout_rate": 0.1, "sizes": results}


def check_mfu(results: dict[str, dict[str, Any]]) -> None:
  """Raises if any size's MFU is outside (0, 1]: then the peak measurement is wrong."""
  for name, r in results.items():
    if not 0.0 < r["mfu"] <= 1.0:
      raise RuntimeError(
          f"MFU of {name} is {r['mfu']}: the step ran at {r['gflops']} GFLOP/s but the best "
          f"matmul of the run at {r['peak_gflops_used']}; an MFU must lie in (0, 1], so the "
          "peak measurement is wrong (rerun on a quieter machine)")


COMPARE_SHAPES = {
    "small": dict(batch=64, length=32, d_model=256, num_heads=4, num_encoder_layers=3,
                  num_decoder_layers=3, mlp_dim=1024),
    "base": dict(batch=32, length=32, d_model=512, num_heads=8, num_encoder_layers=6,
                 num_decoder_layers=6, mlp_dim=2048),
}
COMPARE_COMMON = dict(vocab=8000, dropout_rate=0.1, attention_dropout_rate=0.1,
                      label_smoothing=0.1)
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "step_worker.py")
REPO = os.path.dirname(os.path.dirname(WORKER))


class Worker:
  """A ``bench/step_worker.py`` process building the step of the checkout at ``root``."""

  def __init__(self, root: str, shape: dict[str, Any], env: Optional[dict[str, str]] = None):
    env = {**os.environ, **(env or {}), "PYTHONPATH": root}
    self.proc = subprocess.Popen([sys.executable, WORKER, json.dumps(shape)], env=env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.ready = self._read()
    self.peak_rss_mib = 0

  def _read(self) -> dict[str, Any]:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"step worker exited with status {self.proc.wait()} (its stderr "
                         "is above)")
    return json.loads(line)

  def step(self) -> tuple[float, float]:
    """Runs one step; its wall seconds and the CPU seconds of all the worker's threads."""
    self.proc.stdin.write("step\n")
    self.proc.stdin.flush()
    reply = self._read()
    self.peak_rss_mib = round(float(reply.get("peak_rss_mib", 0.0)))
    return float(reply["seconds"]), float(reply["cpu_seconds"])

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.close()
      self.proc.wait(timeout=60)


def compare_shape(rev_root: str, shape: dict[str, Any], repeats: int,
                  work_env: Optional[dict[str, str]] = None) -> dict[str, Any]:
  """Step seconds of ``rev_root``'s and the working tree's step, interleaved.

  ``work_over_rev`` is the ratio of median target tokens/s (working tree over
  revision); ``work_over_rev_paired`` the median of per-round ratios;
  ``work_over_rev_cpu`` the ratio of median CPU seconds per step, which other
  processes on the machine disturb less than wall time. ``work_env`` adds
  environment variables for the working tree's worker only.
  """
  sides = {"rev": Worker(rev_root, shape)}
  try:
    sides["work"] = Worker(REPO, shape, work_env)
    wall, cpu = {"rev": [], "work": []}, {"rev": [], "work": []}
    for r in range(repeats + 1):     # round 0 warms both up, untimed
      for name in (("rev", "work") if r % 2 == 0 else ("work", "rev")):
        t, c = sides[name].step()
        if r:
          wall[name].append(t)
          cpu[name].append(c)
  finally:
    for w in sides.values():
      w.close()
  tokens = shape["batch"] * shape["length"]
  out = {"shape": shape}
  for name, ts in wall.items():
    out[name] = {"step_s": [round(t, 4) for t in ts], "step_s_median": round(median(ts), 4),
                 "cpu_s_median": round(median(cpu[name]), 4),
                 "target_tokens_per_s": round(tokens / median(ts), 1),
                 "compile_and_first_step_s": sides[name].ready["compile_and_first_step_s"],
                 "first_nll": round(sides[name].ready["nll"], 4),
                 "peak_rss_mib": sides[name].peak_rss_mib}
  out["work_over_rev"] = round(median(wall["rev"]) / median(wall["work"]), 3)
  out["work_over_rev_paired"] = round(statistics.median(
      a / b for a, b in zip(wall["rev"], wall["work"])), 3)
  out["work_over_rev_cpu"] = round(median(cpu["rev"]) / median(cpu["work"]), 3)
  return out


def compare(rev: str, shapes: dict[str, dict[str, Any]], repeats: int,
            work_env: Optional[dict[str, str]] = None) -> dict[str, Any]:
  """``--compare REV``: each of ``shapes`` (name -> worker shape) for ``REV`` and the working tree.

  A shape has ``batch``, ``length``, ``vocab``, ``label_smoothing`` and the
  model fields of ``bench/step_worker.py``; see :data:`COMPARE_SHAPES`.
  """
  with checkout(rev) as (rev_root, sha):
    load_before = os.getloadavg()[0]
    results = {name: compare_shape(rev_root, shape, repeats, work_env)
               for name, shape in shapes.items()}
  return {"rev": rev, "rev_commit": sha[:12], "rev_worktree": rev_root,
          "repeats": repeats,
          "ld_preload": os.environ.get("LD_PRELOAD", ""), "work_env": work_env or {},
          "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
          "environment": environment(), "shapes": results}


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer repeats and matmul sizes")
  parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated model sizes")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--length", type=int, default=32)
  parser.add_argument("--vocab", type=int, default=8192)
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed steps per size (with --compare: per side and shape, "
                           "default 6)")
  parser.add_argument("--compare", metavar="REV",
                      help="time REV's train step and the working tree's, interleaved")
  parser.add_argument("--shapes", default=",".join(COMPARE_SHAPES),
                      help=f"with --compare: some of {','.join(COMPARE_SHAPES)}")
  parser.add_argument("--work-preload", metavar="LIB",
                      help="with --compare: LD_PRELOAD LIB for the working tree's side only "
                           "(e.g. tcmalloc, to see what ./launch.sh gains over REV)")
  args = parser.parse_args(argv)
  if args.compare:
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in COMPARE_SHAPES]
    if unknown or not shapes:
      parser.error(f"--shapes: unknown {unknown}; expected some of {sorted(COMPARE_SHAPES)}")
    try:
      chosen = {name: {**COMPARE_SHAPES[name], **COMPARE_COMMON} for name in shapes}
      if args.work_preload and not os.path.isfile(args.work_preload):
        raise ValueError(f"--work-preload {args.work_preload}: no such file")
      work_env = {"LD_PRELOAD": args.work_preload} if args.work_preload else None
      print(json.dumps(compare(args.compare, chosen, args.repeats or 6, work_env), indent=2))
    except ValueError as e:
      parser.error(str(e))
    return 0
  sizes = [s for s in args.sizes.split(",") if s]
  unknown = [s for s in sizes if s not in SIZES]
  if unknown:
    parser.error(f"--sizes: unknown {unknown}; expected some of {sorted(SIZES)}")
  print(json.dumps(run(args.quick, sizes, args.batch, args.length, args.vocab, args.repeats),
                   indent=2))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

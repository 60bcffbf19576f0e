"""Input ahead of the device: steps/s with the input thread (``data.prefetch``) on and off.

    python -m bench.prefetch [--quick] [--rounds N] [--steps N] [--depth D]

Batches are built the way the training pipeline builds them: a Grain
``MapDataset`` whose map pads one synthetic example at a time into a batch
(:func:`mt_flax.data.pipeline.pad_batch`), then ``jax.device_put``. The step is a
jitted chain of matmuls that reads the batch, its length calibrated so that one step
takes about as long as building one batch. Without prefetch the loop builds a
batch, then runs the step; with it, :class:`mt_flax.data.Prefetcher` builds the next
``depth`` batches on a thread while the step runs.

Two ways of waiting, each measured with prefetch off (0) and on (``depth``):
``sync`` reads the step's result every step (as a run logging every step, or any
per-step host read, does); ``async`` only at the end of a block (JAX's asynchronous
dispatch alone then overlaps a build with the step before it). Arms take turns, one
block each per round, in an order rotated every round, so they share the machine's
load; the figures are medians over rounds. The load average is read before and after.
With both at once, a step can be no faster than the slower of building and stepping:
the ideal speedup is (build + step) / max(build, step), about 2 here, less where the
thread and the step share too few cores.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Callable, Optional

from bench import environment

import grain  # noqa: E402  (after bench: the CPU is chosen before JAX starts)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mt_flax.data import Prefetcher  # noqa: E402
from mt_flax.data.pipeline import pad_batch  # noqa: E402

ROWS, SRC_LEN, TGT_LEN = 256, 64, 64
WIDTH = 256                      # the step's matmuls are [WIDTH, WIDTH]


def batches(rows: int = ROWS, seed: int = 0):
  """An endless, checkpointable iterator of padded batches built row by row (like
  ``_Assemble``): batch ``i`` holds random pairs of random lengths drawn with seed ``(seed, i)``."""
  def build(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, i])
    examples = []
    for n, m in rng.integers(2, [SRC_LEN, TGT_LEN], size=(rows, 2)):
      tgt = rng.integers(4, 1000, m - 1, dtype=np.int32)
      examples.append({"src": rng.integers(4, 1000, n, dtype=np.int32),
                       "tgt_in": np.insert(tgt, 0, 2), "tgt_out": np.append(tgt, 3)})
    return pad_batch(examples, rows, SRC_LEN, TGT_LEN)
  # no read threads: the pipeline's batches are built on the thread that asks for them
  return iter(grain.MapDataset.range(1 << 30).map(build)
              .to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def make_step(matmuls: int) -> Callable:
  """``(state [WIDTH, WIDTH], batch) -> state``: ``matmuls`` dependent matmuls, fed the batch."""
  @jax.jit
  def step(state, batch):
    x = state + jnp.mean(batch["src"].astype(jnp.float32)) * 1e-6
    return jax.lax.fori_loop(0, matmuls, lambda _, y: jnp.tanh(y @ state) * 0.5 + x * 0.5, x)
  return step


def place(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  return jax.device_put(batch, jax.devices()[0])


def _median_s(fn: Callable[[], Any], repeats: int = 7) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def calibrate(build_s: float, state: jax.Array) -> tuple[int, float]:
  """(matmuls, step seconds) of the step whose time is closest to ``build_s``."""
  batch = place(next(batches()))
  matmuls, step_s = 8, 0.0
  for _ in range(12):
    step = make_step(matmuls)
    jax.block_until_ready(step(state, batch))
    step_s = _median_s(lambda: jax.block_until_ready(step(state, batch)))
    if 0.85 <= step_s / build_s <= 1.15:
      break
    matmuls = max(1, round(matmuls * build_s / step_s))
  return matmuls, step_s


def block(step: Callable, state: jax.Array, depth: int, steps: int, sync: bool,
          seed: int) -> float:
  """Steps/s of ``steps`` steps after one untimed step (starts the thread, warms up)."""
  with Prefetcher(batches(seed=seed), place, depth) as feed:
    state = jax.block_until_ready(step(state, next(feed)))
    start = time.perf_counter()
    for _ in range(steps):
      state = step(state, next(feed))
      if sync:
        state.block_until_ready()
    state.block_until_ready()
    return steps / (time.perf_counter() - start)


def run(quick: bool = True, rounds: Optional[int] = None, steps: Optional[int] = None,
        depth: int = 2) -> dict[str, Any]:
  rounds, steps = rounds or (4 if quick else 10), steps or (15 if quick else 40)
  load_before = os.getloadavg()
  state = jax.random.normal(jax.random.key(0), (WIDTH, WIDTH)) / np.sqrt(WIDTH)
  source = batches()
  next(source)
  build_s = _median_s(lambda: place(next(source)))
  matmuls, step_s = calibrate(build_s, state)
  step = make_step(matmuls)
  arms = [(sync, d) for sync in (True, False) for d in (0, depth)]
  rates: dict[tuple[bool, int], list[float]] = {arm: [] for arm in arms}
  for r in range(rounds):
    for sync, d in arms[r % len(arms):] + arms[:r % len(arms)]:
      rates[sync, d].append(block(step, state, d, steps, sync, seed=r))
  out: dict[str, Any] = {}
  for sync in (True, False):
    off, on = (statistics.median(rates[sync, d]) for d in (0, depth))
    out["sync" if sync else "async"] = {
        "steps_per_s_prefetch_0": round(off, 2), f"steps_per_s_prefetch_{depth}": round(on, 2),
        "speedup": round(on / off, 2),
        "per_round": {str(d): [round(x, 2) for x in rates[sync, d]] for d in (0, depth)}}
  return {"environment": environment(), "rows": ROWS, "src_len": SRC_LEN, "tgt_len": TGT_LEN,
          "depth": depth, "rounds": rounds, "steps_per_block": steps,
          "build_ms": round(build_s * 1e3, 2), "step_ms": round(step_s * 1e3, 2),
          "step_matmuls": matmuls,
          "ideal_speedup": round((build_s + step_s) / max(build_s, step_s), 2),
          **out, "load_average_before": [round(x, 2) for x in load_before],
          "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="4 rounds of 15 steps per arm")
  parser.add_argument("--rounds", type=int, default=None, help="blocks per arm")
  parser.add_argument("--steps", type=int, default=None, help="steps per block")
  parser.add_argument("--depth", type=int, default=2, help="prefetch depth of the 'on' arm")
  args = parser.parse_args(argv)
  print(json.dumps(run(args.quick, args.rounds, args.steps, args.depth), indent=2))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

"""Measured fp32 matmul peak of the default JAX device: the MFU denominator.

    python -m bench.matmul_peak [--quick]

A square ``[n, n] @ [n, n]`` float32 product (``2 n^3`` FLOPs) compiled by the
same XLA as the model, timed after a warm-up with ``block_until_ready``; the
peak is the best rate over sizes and repeats. NumPy's BLAS on the same
matrices is reported beside it for reference.
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bench import environment, repeat


class Matmul:
  """One compiled ``[n, n] @ [n, n]`` fp32 product on the default device."""

  def __init__(self, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    self.n = n
    self.flops = 2.0 * n ** 3
    self.host = [rng.standard_normal((n, n), np.float32) for _ in range(2)]
    self.a, self.b = (jnp.asarray(x) for x in self.host)
    self.fn = jax.jit(jnp.matmul).lower(self.a, self.b).compile()

  def __call__(self) -> None:
    self.fn(self.a, self.b).block_until_ready()

  def gflops(self, seconds: float) -> float:
    return self.flops / seconds / 1e9


def best_gflops(fn: Callable[[], Any], flops: float, repeats: int) -> float:
  """Best rate of ``repeats`` timed calls after one warm-up call."""
  return flops / min(repeat(fn, repeats)) / 1e9


def measure(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5) -> dict[str, Any]:
  """Best JAX fp32 matmul rate over ``sizes`` (the peak), with NumPy's beside it.

  Returns ``peak_gflops``, ``peak_size`` and per-size ``jax_gflops`` /
  ``numpy_gflops``.
  """
  per_size = {}
  for n in sizes:
    mm = Matmul(n)
    a, b = mm.host
    per_size[str(n)] = {"jax_gflops": round(best_gflops(mm, mm.flops, repeats), 1),
                        "numpy_gflops": round(best_gflops(lambda: a @ b, mm.flops, repeats), 1)}
  best = max(per_size, key=lambda n: per_size[n]["jax_gflops"])
  return {"peak_gflops": per_size[best]["jax_gflops"], "peak_size": int(best),
          "repeats": repeats, "sizes": per_size}


def run(quick: bool = True) -> dict[str, Any]:
  sizes = (1024, 2048) if quick else (1024, 2048, 4096)
  return {"environment": environment(), **measure(sizes, repeats=5 if quick else 10)}


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="sizes 1024 and 2048 only")
  print(json.dumps(run(parser.parse_args().quick), indent=2))

"""Keep glibc malloc from handing XLA's CPU buffers back to the kernel between steps.

On the CPU backend every step allocates and frees the same large buffers
(activations, gradients, logits chunks). With glibc's defaults, blocks above
the mmap threshold are ``mmap``-ed and unmapped on ``free``, and the worker
threads' arenas trim their tops, so each step page-faults its buffers in again
(about 100k minor faults per step of the small benchmark model). Three
``mallopt`` settings keep the memory in the process instead:

- ``M_ARENA_MAX = 1``: one arena, so large blocks come from the main heap
  rather than from per-thread heaps that fall back to ``mmap``;
- ``M_MMAP_MAX = 0``: no block is served by its own ``mmap``;
- ``M_TRIM_THRESHOLD`` = 2 GiB: the heap's free top is not returned to the
  kernel after every step.

The cost is that the process keeps its peak heap until it exits. Applied once,
when :mod:`mt_flax` is imported (before XLA starts its threads), on glibc
only; ``MT_FLAX_MALLOC=0`` leaves malloc as it is. When another allocator is
preloaded (``./launch.sh`` preloads tcmalloc) its ``mallopt`` is a no-op.
Measured with ``python -m bench.train_step --compare REV``.
"""
from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2 ** 31 - 1))
_applied: dict[str, bool] = {}


def tune_malloc() -> bool:
  """Apply :data:`SETTINGS` with glibc's ``mallopt``; True if every call succeeded.

  Does nothing (False) off Linux, without glibc, or with ``MT_FLAX_MALLOC=0``;
  repeated calls return the first answer.
  """
  if "done" in _applied:
    return _applied["done"]
  ok = False
  if sys.platform.startswith("linux") and os.environ.get("MT_FLAX_MALLOC", "1") != "0":
    try:
      mallopt = ctypes.CDLL(None).mallopt   # the process's own C library
    except (OSError, AttributeError):
      mallopt = None
    if mallopt is not None:
      mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
      mallopt.restype = ctypes.c_int
      ok = all(mallopt(param, value) == 1 for param, value in SETTINGS)
  _applied["done"] = ok
  return ok

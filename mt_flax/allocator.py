"""Keep XLA's per-step CPU buffers in malloc's pools instead of faulting them in every step.

On the CPU backend a train step allocates all of its temporaries (activations
kept for the backward pass, gradients, logits chunks) as one block: 723 MiB for
the base shapes of ``bench.train_step``. glibc serves a block that large with
its own ``mmap`` and unmaps it on ``free``, so every step page-faults 185k
fresh pages in again (about 0.4 s of kernel time per 1.9 s step on 2 cores).
Two settings, together, keep that memory in the process:

- :func:`compiler_options` asks XLA (on the CPU backend only) to split the
  temporaries into heaps of at most :data:`TEMP_HEAP_BYTES`, small enough for
  malloc's arenas (``jax.pmap`` takes no compiler options, so the steps of the
  pmap partitioner keep the one block);
- :func:`tune_malloc` (run when :mod:`mt_flax` is imported) fixes glibc's
  ``mmap`` threshold at its largest allowed value, 32 MiB, so those heaps come
  from the arenas; gives every arena a 64 MiB top pad, so a worker thread's
  arena does not unmap its heaps once the step frees them; and raises the trim
  threshold to 1 GiB, so the main arena keeps its free top.

Neither limits the number of arenas: threads keep their own, so compilation
and multi-device runs are not serialised on one lock. The cost is memory the
process keeps after a step: up to 64 MiB per arena and 1 GiB in the main one.
``MT_FLAX_MALLOC=0`` leaves malloc as it is; under a preloaded allocator
(``./launch.sh`` preloads tcmalloc) ``mallopt`` is a no-op. Measured with
``python -m bench.train_step --compare REV`` (see README, Performance).
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional

import jax

TEMP_HEAP_BYTES = 30 << 20   # below the mmap threshold, two fit one 64 MiB arena heap
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
SETTINGS = ((M_MMAP_THRESHOLD, 32 << 20), (M_TOP_PAD, 64 << 20), (M_TRIM_THRESHOLD, 1 << 30))
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


def compiler_options(backend: Optional[str] = None) -> Optional[dict]:
  """XLA options for a jitted step: the temporaries' heap limit on CPU, else None."""
  if (backend or jax.default_backend()) != "cpu":
    return None
  return {"xla_multiheap_size_constraint_per_heap": TEMP_HEAP_BYTES}

"""Keep XLA's per-step CPU buffers in malloc's pools instead of faulting them in every step.

On the CPU backend a train step allocates all of its temporaries (activations
kept for the backward pass, gradients, logits chunks) as one block: 723 MiB for
the base shapes of ``bench.train_step``. glibc serves a block that large with
its own ``mmap`` and unmaps it on ``free``, so every step page-faults 185k
fresh pages in again (about 0.4 s of kernel time per 1.9 s step on 2 cores).
Two settings, together, keep that memory in the process:

- :func:`compiler_options` asks XLA (on the CPU backend only) to split the
  temporaries into heaps of at most :data:`TEMP_HEAP_BYTES`, small enough for
  malloc's arenas; :func:`jit`, which jits mt_flax's train and eval steps,
  applies them to every batch shape whose lowered step has no larger tensor
  (``jax.pmap`` takes no compiler options, so the steps of the pmap
  partitioner keep the one block);
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
import math
import os
import re
import sys
from typing import Any, Callable, Optional

import jax
import numpy as np

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
  """XLA options that split the temporaries into heaps: on CPU only, else None."""
  if (backend or jax.default_backend()) != "cpu":
    return None
  return {"xla_multiheap_size_constraint_per_heap": TEMP_HEAP_BYTES}


_TENSOR = re.compile(r"tensor<((?:\d+x)+)(\w+)>")
_BYTES = {"f64": 8, "i64": 8, "ui64": 8, "f32": 4, "i32": 4, "ui32": 4, "bf16": 2, "f16": 2,
          "i16": 2, "ui16": 2, "i8": 1, "ui8": 1, "i1": 1}


def largest_tensor_bytes(module_text: str) -> int:
  """Bytes of the largest ranked tensor type in a StableHLO module's text."""
  largest = 0
  for dims, dtype in _TENSOR.findall(module_text):
    largest = max(largest, math.prod(int(d) for d in dims[:-1].split("x")) * _BYTES.get(dtype, 8))
  return largest


def jit(fn: Callable, **jit_kwargs) -> Callable:
  """``jax.jit(fn, **jit_kwargs)``; on CPU, with the heap split where it fits.

  XLA logs a warning for every temporary above the heap limit on every heap it
  fills (thousands of lines for one step with 64 MiB activations), and such a
  temporary is mapped per step anyway. So for each shape of the last argument
  (the batch; the state or parameters keep one shape per step function) the
  step is lowered once, and calls go to ``jax.jit`` with
  :func:`compiler_options` only when no tensor of the lowered computation is
  above :data:`TEMP_HEAP_BYTES`, else to plain ``jax.jit``. Off CPU this is
  ``jax.jit``.
  """
  options = compiler_options()
  if options is None:
    return jax.jit(fn, **jit_kwargs)
  return _HeapSplitJit(jax.jit(fn, **jit_kwargs),
                       jax.jit(fn, compiler_options=options, **jit_kwargs))


class _HeapSplitJit:
  """Sends each call to the plain or the heap-split ``jax.jit`` (see :func:`jit`)."""

  def __init__(self, plain, split):
    self._plain, self._split = plain, split
    self._choice: dict[tuple, Any] = {}

  def _jitted(self, args: tuple):
    key = tuple((np.shape(x), str(getattr(x, "dtype", type(x))))
                for x in jax.tree.leaves(args[-1]))
    jitted = self._choice.get(key)
    if jitted is None:
      fits = largest_tensor_bytes(self._plain.lower(*args).as_text()) <= TEMP_HEAP_BYTES
      jitted = self._choice[key] = self._split if fits else self._plain
    return jitted

  def __call__(self, *args):
    return self._jitted(args)(*args)

  def lower(self, *args):
    """The chosen ``jax.jit``'s lowering (its ``compile()`` is the executable calls use)."""
    return self._jitted(args).lower(*args)

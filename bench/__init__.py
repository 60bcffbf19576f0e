"""Benchmarks of mt_flax: speed and memory, printed as JSON, never asserted in tests.

Every benchmark module has ``run(quick: bool) -> dict``; ``python -m bench.all
--quick`` runs each in its own process and writes ``bench/results.json``. The
helpers here are shared: repeated timing, machine description, and a counter
of XLA compilations. Run them as ``./launch.sh bench NAME``, which preloads
tcmalloc on CPU as every mt_flax command does; the measured figures and how to
read them are in ``docs/performance.md``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from types import ModuleType
from typing import Any, Callable, Iterator

from mt_flax.__main__ import cpu_if_no_tpu

cpu_if_no_tpu()      # before JAX starts: a CPU host with libtpu installed runs on the CPU
import jax  # noqa: E402
from jax import monitoring  # noqa: E402

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def seconds(fn: Callable[[], Any]) -> float:
  """Wall time of ``fn()``; ``fn`` must block until its result is ready."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def repeat(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
  """``warmup`` untimed calls, then the wall time of each of ``repeats`` calls."""
  for _ in range(warmup):
    fn()
  return [seconds(fn) for _ in range(repeats)]


def median(values: list[float]) -> float:
  return float(statistics.median(values))


def cpu_model() -> str:
  """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
  """What the numbers were measured on: CPU, threads, versions, devices, XLA flags."""
  import flax
  import jaxlib
  device = jax.devices()[0]
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:
    cores = os.cpu_count()
  return {
      "cpu": cpu_model(), "cores_available": cores, "python": platform.python_version(),
      "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
      "backend": jax.default_backend(), "device": device.device_kind,
      "device_count": jax.device_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
  }


class CompileCounter:
  """Counts XLA backend compilations (and their seconds) inside a ``with`` block.

  Listens to JAX's own compile event, so it sees every compilation, including
  one caused by a new input shape of an already jitted function.
  """

  def __init__(self):
    self.count = 0
    self.seconds = 0.0
    self.names: list[str] = []

  def _listen(self, event: str, duration: float, **kwargs) -> None:
    if event == BACKEND_COMPILE_EVENT:
      self.count += 1
      self.seconds += duration
      self.names.append(str(kwargs.get("fun_name", "?")))

  def __enter__(self) -> "CompileCounter":
    monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc) -> None:
    monitoring.unregister_event_duration_listener(self._listen)


@contextlib.contextmanager
def checkout(rev: str) -> Iterator[tuple[str, str]]:
  """``(folder, commit)`` of ``rev`` checked out into a temporary git worktree of this
  repository, removed on exit; ValueError if ``rev`` is not a revision."""
  sha = subprocess.run(["git", "-C", REPO, "rev-parse", "--verify", f"{rev}^{{commit}}"],
                       capture_output=True, text=True)
  if sha.returncode:
    raise ValueError(f"--compare {rev}: not a git revision of {REPO}")
  tmp = tempfile.mkdtemp(prefix="mt_flax_compare_")
  root = os.path.join(tmp, "rev")
  subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", "-q", root,
                  sha.stdout.strip()], check=True)
  try:
    yield root, sha.stdout.strip()
  finally:
    subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", root], check=False)
    shutil.rmtree(tmp, ignore_errors=True)


def load_flax_example(path: str, flag: str, name: str, needs: str) -> ModuleType:
  """Imports the Flax WMT example's file ``name`` (of ``google/flax`` ``examples/wmt``) from
  ``path``, given with the command-line flag ``flag``; it must define ``needs``.

  Raises:
    FileNotFoundError: one-line reason naming ``flag`` and the file expected.
  """
  expected = f"expected a copy of google/flax examples/wmt/{name}"
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{flag} {path!r} is not a file; {expected}")
  spec = importlib.util.spec_from_file_location(f"flax_wmt_{name[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, needs):
    raise FileNotFoundError(f"{flag} {path!r} has no {needs}; {expected}")
  return module

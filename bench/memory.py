"""Memory figures: peak host RSS of this process, device memory when not on CPU.

    python -m bench.memory          # the figures of a fresh process, as JSON

Every benchmark adds :func:`snapshot` to its result; ``bench.all`` runs each
benchmark in its own process, so the peak RSS is that benchmark's own.
"""
from __future__ import annotations

import json
import resource
import sys
from typing import Any, Optional

import jax
import psutil

MIB = 1024 * 1024


def peak_rss_mib() -> float:
  """Largest resident set size this process has had so far, in MiB."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return round(peak / (MIB if sys.platform == "darwin" else 1024), 1)   # bytes on macOS, KiB on Linux


def rss_mib() -> float:
  """Resident set size now, in MiB."""
  return round(psutil.Process().memory_info().rss / MIB, 1)


def device_memory_mib(device: Optional[jax.Device] = None) -> Optional[dict[str, float]]:
  """``in_use``, ``peak`` and ``limit`` of an accelerator in MiB; None on CPU.

  On CPU the arrays live in host memory and are part of the RSS figures.
  """
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    return None
  stats = device.memory_stats() or {}
  keys = {"in_use": "bytes_in_use", "peak": "peak_bytes_in_use", "limit": "bytes_limit"}
  return {k: round(stats[v] / MIB, 1) for k, v in keys.items() if v in stats}


def compiled_memory_mib(compiled: Any) -> Optional[dict[str, float]]:
  """XLA's buffer plan of one compiled function: arguments, outputs, temporaries (MiB).

  ``total`` counts donated (aliased) buffers once. None where the backend
  gives no analysis.
  """
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  parts = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
           "temporaries": stats.temp_size_in_bytes, "aliased": stats.alias_size_in_bytes}
  parts["total"] = parts["arguments"] + parts["outputs"] + parts["temporaries"] - parts["aliased"]
  return {k: round(v / MIB, 1) for k, v in parts.items()}


def snapshot() -> dict[str, Any]:
  """Peak and current host RSS and, off CPU, device memory (MiB)."""
  return {"peak_rss_mib": peak_rss_mib(), "rss_mib": rss_mib(),
          "device_mib": device_memory_mib()}


def run(quick: bool = True) -> dict[str, Any]:
  del quick
  return snapshot()


if __name__ == "__main__":
  print(json.dumps(run(), indent=2))

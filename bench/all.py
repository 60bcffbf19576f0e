"""Runs every benchmark, each in a fresh process, and writes one JSON file.

    python -m bench.all --quick                 # laptop-sized; writes bench/results.json
    python -m bench.all [--out FILE] [--only train_step,pipeline]

A fresh process per benchmark keeps compile caches and peak RSS apart. The
``targets`` section checks the figures against the project's speed targets
(base train step MFU >= 0.75 of the measured matmul peak; bucketing and
packing >= 2.5x pad-to-max effective target tokens/s; cached beam-4 decoding
>= 5x the uncached decoder). The exit status is 1 if a benchmark failed.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

from bench import environment
from bench.memory import snapshot

BENCHMARKS = ("train_step", "pipeline", "decode_speed")
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json")


def run_child(name: str, quick: bool, out_path: str) -> None:
  """Inside the child process: ``bench.<name>.run(quick)`` plus memory, to ``out_path``."""
  result = importlib.import_module(f"bench.{name}").run(quick)
  result["process_memory"] = snapshot()
  with open(out_path, "w") as f:
    json.dump(result, f)


def run_isolated(name: str, quick: bool) -> dict[str, Any]:
  """Runs one benchmark in a fresh Python process; its result, or ``{"error": ...}``."""
  with tempfile.TemporaryDirectory() as tmp:
    out_path = os.path.join(tmp, f"{name}.json")
    command = [sys.executable, "-m", "bench.all", "--child", name, "--child-out", out_path]
    if quick:
      command.append("--quick")
    start = time.time()
    proc = subprocess.run(command, cwd=os.path.dirname(os.path.dirname(DEFAULT_OUT)))
    wall = round(time.time() - start, 1)
    if proc.returncode != 0 or not os.path.exists(out_path):
      return {"error": f"bench.{name} exited with status {proc.returncode} (its stderr is "
                       "above)", "wall_s": wall}
    with open(out_path) as f:
      result = json.load(f)
  result["wall_s"] = wall
  return result


def _get(tree: dict[str, Any], *path: str) -> Any:
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def targets(results: dict[str, Any]) -> dict[str, Any]:
  """Each target: the measured figure, the threshold and whether it is met (None: not run)."""
  def check(value: Optional[float], threshold: float) -> dict[str, Any]:
    return {"value": value, "threshold": threshold,
            "met": None if value is None else bool(value >= threshold)}

  modes = _get(results, "pipeline", "modes") or {}
  decode = _get(results, "decode_speed") or {}
  return {
      "base_train_mfu": check(_get(results, "train_step", "sizes", "base", "mfu"), 0.75),
      "bucket_vs_pad": check(_get(modes, "bucket", "steady_speedup_vs_pad"), 2.5),
      "pack_vs_pad": check(_get(modes, "pack", "steady_speedup_vs_pad"), 2.5),
      "cached_beam4_vs_uncached": check(cached_beam_speedup(decode), 5.0),
  }


def cached_beam_speedup(decode: dict[str, Any]) -> Optional[float]:
  """Cached over uncached beam-4 sentences/s from ``bench.decode_speed``'s result."""
  return decode.get("beam4_cached_speedup")


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="sizes that suit a laptop")
  parser.add_argument("--out", default=DEFAULT_OUT, help="where to write the JSON results")
  parser.add_argument("--only", default=",".join(BENCHMARKS),
                      help=f"comma-separated subset of {','.join(BENCHMARKS)}")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  parser.add_argument("--child-out", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    run_child(args.child, args.quick, args.child_out)
    return 0
  names = [n for n in args.only.split(",") if n]
  unknown = [n for n in names if n not in BENCHMARKS]
  if unknown:
    parser.error(f"--only: unknown benchmark(s) {unknown}; expected some of {list(BENCHMARKS)}")

  results: dict[str, Any] = {}
  for name in names:
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    results[name] = run_isolated(name, args.quick)
    print(f"[bench] {name} done in {results[name]['wall_s']} s", file=sys.stderr, flush=True)
  command = "python -m bench.all" + (" --quick" if args.quick else "") + (
      f" --only {args.only}" if args.only != ",".join(BENCHMARKS) else "")
  report = {"command": command, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "environment": environment(), "targets": targets(results), "benchmarks": results}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=2)
    f.write("\n")
  print(json.dumps({"out": args.out, "targets": report["targets"]}, indent=2))
  return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
  raise SystemExit(main())

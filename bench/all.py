"""Runs every benchmark, each in a fresh process, and writes one JSON file.

    python -m bench.all --quick                 # laptop-sized; writes bench/results.json
    python -m bench.all [--out FILE] [--only train_step,pipeline]
    python -m bench.all --table bench/results.json   # the README's markdown tables

A fresh process per benchmark keeps compile caches and peak RSS apart. The
``targets`` section checks the figures against the project's speed targets
(base train step MFU >= 0.6 of the best matmul rate measured in the run, and
every MFU in (0, 1]: a value outside is an error, never "met"; bucketing and
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

  def check_mfu(value: Optional[float], threshold: float) -> dict[str, Any]:
    if value is not None and not 0.0 < value <= 1.0:
      return {"value": value, "threshold": threshold, "met": False,
              "error": f"MFU {value} is outside (0, 1]: the matmul peak measurement is wrong"}
    return check(value, threshold)

  modes = _get(results, "pipeline", "modes") or {}
  decode = _get(results, "decode_speed") or {}
  return {
      "base_train_mfu": check_mfu(_get(results, "train_step", "sizes", "base", "mfu"), 0.6),
      "bucket_vs_pad": check(_get(modes, "bucket", "steady_speedup_vs_pad"), 2.5),
      "pack_vs_pad": check(_get(modes, "pack", "steady_speedup_vs_pad"), 2.5),
      "cached_beam4_vs_uncached": check(decode.get("beam4_cached_speedup"), 5.0),
  }


def _row(*cells: Any) -> str:
  return "| " + " | ".join(str(c) for c in cells) + " |"


def _fmt(x: Any, digits: int = 1) -> str:
  return "-" if x is None else f"{x:,.{digits}f}" if isinstance(x, float) else str(x)


def table(report: dict[str, Any]) -> str:
  """Markdown tables of the main figures of a results file."""
  b, env = report["benchmarks"], report["environment"]
  lines = [f"`{report['command']}` on {env['cpu']} ({env['cores_available']} cores, "
           f"{env['backend']}, jax {env['jax']}), {report['date'][:10]}.", ""]
  train = b.get("train_step", {})
  if "sizes" in train:
    first = next(iter(train["sizes"].values()))
    lines += [f"Train step, fp32, batch {first['batch']} x {first['length']} tokens, vocabulary "
              f"{first['vocab']}; MFU over the best matmul rate of the run, "
              f"{_fmt(train.get('peak_gflops_used'))} GFLOP/s:", "",
              _row("model", "params", "step s", "target tokens/s", "GFLOP/s", "MFU",
                   "compilations", "peak RSS MiB"),
              _row(*["---"] * 8)]
    for name, r in train["sizes"].items():
      lines.append(_row(name, f"{r['params'] / 1e6:.1f}M", _fmt(r["step_s_median"], 2),
                        _fmt(r["target_tokens_per_s"], 0), _fmt(r["gflops"]), _fmt(r["mfu"], 2),
                        r["step_compilations"], _fmt(r["memory"]["peak_rss_mib"], 0)))
    lines.append("")
  pipe = b.get("pipeline", {})
  if "modes" in pipe:
    lines += [f"spa_eng train end to end, {pipe['steps_per_mode']} steps per mode, "
              f"{pipe['batch_tokens']} tokens per batch side:", "",
              _row("batching", "target tokens/s", "without compile", "x pad", "x pad without "
                   "compile", "target padding efficiency", "compilations", "compile s"),
              _row(*["---"] * 8)]
    for mode, r in pipe["modes"].items():
      lines.append(_row(mode, _fmt(r["target_tokens_per_s"], 0),
                        _fmt(r["steady_target_tokens_per_s"], 0),
                        _fmt(r.get("speedup_vs_pad"), 2), _fmt(r.get("steady_speedup_vs_pad"), 2),
                        _fmt(r["tgt_padding_efficiency"], 2), r["compilations"],
                        _fmt(r["compiling_steps_s"])))
    lines.append("")
  dec = b.get("decode_speed", {})
  if "beam4_cached" in dec:
    lines += [f"Decoding {dec['batch']} sentences x {dec['tgt_len']} target tokens:", "",
              _row("search", "cache", "sentences/s", "tokens/s", "cached speedup"),
              _row(*["---"] * 5)]
    for search in ("greedy", "beam4"):
      for cache in ("cached", "uncached"):
        r = dec[f"{search}_{cache}"]
        lines.append(_row(search, cache, _fmt(r["sentences_per_s"]), _fmt(r["tokens_per_s"], 0),
                          _fmt(dec[f"{search}_cached_speedup"], 2) if cache == "cached" else ""))
    lines.append("")
  rss = [f"{name} {_fmt(r['process_memory']['peak_rss_mib'], 0)} MiB" for name, r in b.items()
         if "process_memory" in r]
  if rss:
    lines += ["Peak host RSS of each benchmark's process: " + ", ".join(rss) + ".", ""]
  verdict = {True: "met", False: "not met", None: "not run"}
  lines += ["Targets:", ""] + [
      f"- {name}: {_fmt(t['value'], 2)} (>= {t['threshold']}): "
      + (f"ERROR, {t['error']}" if "error" in t else verdict[t["met"]])
      for name, t in report["targets"].items()]
  return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="sizes that suit a laptop")
  parser.add_argument("--out", default=DEFAULT_OUT, help="where to write the JSON results")
  parser.add_argument("--only", default=",".join(BENCHMARKS),
                      help=f"comma-separated subset of {','.join(BENCHMARKS)}")
  parser.add_argument("--table", metavar="RESULTS",
                      help="print the markdown tables of a results file and exit")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  parser.add_argument("--child-out", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    run_child(args.child, args.quick, args.child_out)
    return 0
  if args.table:
    try:
      with open(args.table) as f:
        print(table(json.load(f)))
    except (OSError, ValueError, KeyError) as e:
      parser.error(f"--table {args.table}: not a results file of bench.all ({e!r})")
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
  print(table(report))
  print(f"\nwritten to {args.out}")
  return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
  raise SystemExit(main())

"""How soon ``translate`` writes its first line, and that streaming does not change the output.

    python -m bench.translate_stream --workdir runs/bible_en_es_tiny [--lines 20000] [--beam 1]

Feeds the first ``--lines`` training sources of the run's dataset (repeated if the split
is shorter) to ``python -m mt_flax translate`` through a pipe, twice: with the default
windows (64 lines first, doubling to 1,024) and with one window holding the whole input
(every line sorted and batched together, as before streaming). Prints JSON: seconds to
the first output line and to the last, for each, the load average, and whether the two
outputs are identical. Needs a trained workdir (``./launch.sh`` makes one).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from bench import REPO


def source_lines(workdir: str, count: int) -> list[str]:
  from mt_flax import checkpoint
  from mt_flax.data import sources
  config = checkpoint.read_config(workdir)
  pairs = sources.load_pairs(config, "train")
  lines = [" ".join(src.split()) for src, _ in pairs]
  return [lines[i % len(lines)] for i in range(count)]


def timed_translate(workdir: str, input_path: str, extra: list[str]) -> dict:
  """Runs translate on the file; seconds to the first and last output line, and the output."""
  command = [sys.executable, "-m", "mt_flax", "translate", "--workdir", workdir, *extra]
  load = os.getloadavg()[0]
  start = time.perf_counter()
  with open(input_path, "rb") as stdin:
    proc = subprocess.Popen(command, stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, cwd=REPO)
    first = proc.stdout.readline()
    first_s = time.perf_counter() - start
    rest = proc.stdout.read()
    proc.wait()
  total_s = time.perf_counter() - start
  if proc.returncode != 0:
    raise SystemExit(f"{' '.join(command)} exited with status {proc.returncode}")
  return {"first_line_s": round(first_s, 2), "all_lines_s": round(total_s, 2),
          "load_average_1min_at_start": load, "output": first + rest}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="bench.translate_stream", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--lines", type=int, default=20000)
  parser.add_argument("--beam", type=int, default=None, help="default: the run's beam size")
  args = parser.parse_args(argv)
  beam = [] if args.beam is None else ["--beam", str(args.beam)]
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "input.txt")
    with open(path, "w", encoding="utf-8") as f:
      f.write("".join(line + "\n" for line in source_lines(args.workdir, args.lines)))
    streamed = timed_translate(args.workdir, path, beam)
    whole = timed_translate(args.workdir, path, [*beam, "--window", str(args.lines)])
  same = streamed.pop("output") == whole.pop("output")
  print(json.dumps({"benchmark": "translate_stream", "lines": args.lines, "beam": args.beam,
                    "streamed": streamed, "one_window": whole, "identical_output": same},
                   indent=1))


if __name__ == "__main__":
  main()

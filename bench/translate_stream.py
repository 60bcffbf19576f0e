"""How soon ``translate`` writes its first line, and that streaming does not change the output.

    python -m bench.translate_stream --workdir runs/bible_en_es_tiny [--lines 20000] \
        [--check-lines 2000] [--beam 1]

Feeds the first ``--lines`` training sources of the run's dataset (repeated if the split
is shorter) to ``python -m mt_flax translate`` through a pipe with the default windows
(64 lines first, doubling to 1,024) and times the first output line (then stops it).
Then translates the first ``--check-lines`` of them with the default windows (timed) and,
in this process, all together (``inference.translate_lines``: every line sorted and
batched at once, as before streaming). Prints JSON: the seconds, the load average at each
start, and whether the two outputs are identical. The first command of a run compiles its
decoding programs; later ones load them from the compilation cache. Needs a trained
workdir (``./launch.sh`` makes one).
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


def timed_translate(workdir: str, input_path: str, extra: list[str], first_only: bool = False
                    ) -> dict:
  """Runs translate on the file; seconds to the first and last output line, and the output
  (``first_only``: stops it after the first line)."""
  command = [sys.executable, "-m", "mt_flax", "translate", "--workdir", workdir, *extra]
  load = os.getloadavg()[0]
  start = time.perf_counter()
  with open(input_path, "rb") as stdin:
    proc = subprocess.Popen(command, stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, cwd=REPO)
    first = proc.stdout.readline()
    first_s = time.perf_counter() - start
    if first_only:
      proc.kill()
      proc.wait()
      return {"first_line_s": round(first_s, 2), "load_average_1min_at_start": load}
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
  parser.add_argument("--check-lines", type=int, default=2000)
  parser.add_argument("--beam", type=int, default=None, help="default: the run's beam size")
  args = parser.parse_args(argv)
  beam = [] if args.beam is None else ["--beam", str(args.beam)]
  lines = source_lines(args.workdir, args.lines)
  with tempfile.TemporaryDirectory() as tmp:
    path, check = os.path.join(tmp, "input.txt"), os.path.join(tmp, "check.txt")
    with open(path, "w", encoding="utf-8") as f:
      f.write("".join(line + "\n" for line in lines))
    with open(check, "w", encoding="utf-8") as f:
      f.write("".join(line + "\n" for line in lines[:args.check_lines]))
    first = timed_translate(args.workdir, path, beam, first_only=True)
    streamed = timed_translate(args.workdir, check, beam)
  from mt_flax import inference
  trained = inference.load_trained(args.workdir)
  together = inference.translate_lines(trained, lines[:args.check_lines], beam_size=args.beam)
  same = streamed.pop("output").decode("utf-8") == "".join(t + "\n" for t in together)
  print(json.dumps({"benchmark": "translate_stream", "lines": args.lines, "beam": args.beam,
                    "first_line": first, "check_lines": args.check_lines,
                    "streamed": streamed, "identical_to_all_at_once": same}, indent=1))


if __name__ == "__main__":
  main()

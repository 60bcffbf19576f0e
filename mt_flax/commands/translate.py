r"""Translation of text files with a trained run.

    python -m mt_flax translate --workdir DIR [--beam 4] [--checkpoint best|latest|averaged]
        [--long truncate|split] [--invalid error|replace] [--config.decode.alpha=0.8] \
        < in.txt > out.txt

One line in, one line out, in order; an empty (or all-blank) line gives an
empty line. A line longer than ``data.max_len`` tokens (EOS included) is
truncated with a warning naming the line, or with ``--long split`` translated
in pieces (cut at sentence ends, else between words) that are joined with a
space. Input must be UTF-8: invalid lines are reported with their numbers and
stop the command before their window is translated, unless ``--invalid replace``
(U+FFFD, with a warning). Input is read in windows of 64 lines, doubling up to
``--window`` (default 1024); each window is batched by length and written as soon as
it is translated, so output starts early and before the input ends; on a terminal
stderr shows lines/s.
``--beam`` defaults to ``decode.beam_size`` of the run's config; 1 is greedy search.
On a pod every process runs the command: process 0 reads stdin and shares each window,
all of them decode it together, and process 0 writes the output.

"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from typing import BinaryIO, Iterator

from mt_flax import cli, sharding
from mt_flax.config import ConfigError
from mt_flax.inference import load_trained, read_lines, translate_lines

WINDOW = 1024          # lines read, sorted by length, translated and written at a time (at most)
FIRST_WINDOW = 64      # the first window; each next one doubles, up to --window

MAX_ERRORS_SHOWN = 10


def build_parser() -> argparse.ArgumentParser:
  parser = cli.new_parser("translate", __doc__, config="optional")
  cli.add_workdir_args(parser)
  parser.add_argument("--beam", type=int, default=None,
                      help="beam size (default decode.beam_size of the run; 1 = greedy)")
  parser.add_argument("--long", choices=("truncate", "split"), default="truncate",
                      help="what to do with lines longer than data.max_len tokens")
  parser.add_argument("--invalid", choices=("error", "replace"), default="error",
                      help="what to do with input lines that are not UTF-8")
  parser.add_argument("--window", type=int, default=WINDOW,
                      help="most lines translated (batched by length) and written at a "
                           f"time; windows start at {FIRST_WINDOW} lines and double "
                           f"(default {WINDOW})")
  parser.add_argument("--full-recompute", action="store_true",
                      help="decode without the key/value cache (slow; for comparison)")
  return parser


def read_windows(stream: BinaryIO, invalid: str, size: int) -> Iterator[tuple[int, list[str]]]:
  """(number of the first line, lines) of the binary ``stream`` as they arrive, in windows of
  FIRST_WINDOW lines, then twice as many each time up to ``size`` (the first output comes
  soon; later windows batch better). Lines that are not UTF-8 are reported (at most
  MAX_ERRORS_SHOWN); with ``--invalid error`` they stop the command before their window
  is translated."""
  first, raw, shown, want = 1, [], 0, min(FIRST_WINDOW, size)
  for chunk in itertools.chain(stream, [None]):
    if chunk is not None:
      raw.append(chunk)
      if len(raw) < want:
        continue
    want = min(2 * want, size)
    if not raw:
      return
    lines, problems = read_lines(b"".join(raw), replace=True)
    raw = []
    level = "warning" if invalid == "replace" else "error"
    for number, reason in problems[:max(MAX_ERRORS_SHOWN - shown, 0)]:
      print(f"mt_flax translate: {level}: line {first + number - 1}: {reason}", file=sys.stderr)
    shown += len(problems)
    if problems and invalid == "error":
      done = f"lines 1-{first - 1} were translated, " if first > 1 else ""
      raise ConfigError(f"{len(problems)} line(s) of lines {first}-{first + len(lines) - 1} "
                        f"are not UTF-8; {done}nothing from line {first} on (fix the input, "
                        "or pass --invalid replace)")
    yield first, lines
    first += len(lines)


def run(args: argparse.Namespace) -> int:
  if args.beam is not None and args.beam < 1:
    raise ConfigError(f"--beam {args.beam}: expected an integer >= 1")
  if args.window < 1:
    raise ConfigError(f"--window {args.window}: expected an integer >= 1")
  sharding.maybe_initialize_distributed()
  primary = sharding.is_primary()

  def warn(message: str) -> None:
    if primary:
      print(f"mt_flax translate: warning: {message}", file=sys.stderr)

  windows = sharding.from_primary(read_windows(sys.stdin.buffer, args.invalid, args.window))
  head = list(itertools.islice(windows, 1))          # bad input is reported before loading
  trained = load_trained(args.workdir, which=args.checkpoint, config_path=args.config,
                         overrides=args.overrides)
  progress, t0, done = primary and sys.stderr.isatty(), time.time(), 0
  for first, lines in itertools.chain(head, windows):
    outputs = translate_lines(trained, lines, beam_size=args.beam,
                              split_long=args.long == "split", cached=not args.full_recompute,
                              warn=warn, first_line=first)
    try:
      if primary:
        sys.stdout.write("".join(line + "\n" for line in outputs))
        sys.stdout.flush()
    except BrokenPipeError:          # the reader went away (e.g. `| head`): not an error here
      windows.close()                # the other processes stop too
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
      return 0
    done += len(lines)
    if progress:
      print(f"\rmt_flax translate: {done} lines, {done / (time.time() - t0):.1f} lines/s",
            end="", file=sys.stderr, flush=True)
  if progress and done:
    print(file=sys.stderr)
  return 0


main = cli.entry("translate", build_parser, run)

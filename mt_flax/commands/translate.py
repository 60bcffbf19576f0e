r"""Translation of text files with a trained run.

    python -m mt_flax translate --workdir DIR [--beam 4] [--checkpoint best|latest|averaged]
        [--long truncate|split] [--invalid error|replace] [--config.decode.alpha=0.8] \
        < in.txt > out.txt

One line in, one line out, in order; an empty (or all-blank) line gives an
empty line. A line longer than ``data.max_len`` tokens (EOS included) is
truncated with a warning naming the line, or with ``--long split`` translated
in pieces (cut at sentence ends, else between words) that are joined with a
space. Input must be UTF-8: invalid lines are reported with their numbers and
nothing is translated, unless ``--invalid replace`` (U+FFFD, with a warning).
Lines are batched by length internally. ``--beam`` defaults to
``decode.beam_size`` of the run's config; 1 is greedy search.

"""
from __future__ import annotations

import argparse
import os
import sys

from mt_flax import cli
from mt_flax.config import ConfigError
from mt_flax.inference import load_trained, read_lines, translate_lines

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
  parser.add_argument("--full-recompute", action="store_true",
                      help="decode without the key/value cache (slow; for comparison)")
  return parser


def read_stdin(invalid: str) -> list[str]:
  """The lines of stdin; lines that are not UTF-8 are reported (at most MAX_ERRORS_SHOWN), and
  with ``--invalid error`` stop the command."""
  lines, problems = read_lines(sys.stdin.buffer.read(), replace=invalid == "replace")
  for number, reason in problems[:MAX_ERRORS_SHOWN]:
    level = "warning" if invalid == "replace" else "error"
    print(f"mt_flax translate: {level}: line {number}: {reason}", file=sys.stderr)
  if problems and invalid == "error":
    more = len(problems) - MAX_ERRORS_SHOWN
    raise ConfigError(f"{len(problems)} line(s) of the input are not UTF-8"
                      + (f" ({more} more not shown)" if more > 0 else "")
                      + "; nothing translated (fix the input, or pass --invalid replace)")
  return lines


def run(args: argparse.Namespace) -> int:
  warn = lambda message: print(f"mt_flax translate: warning: {message}", file=sys.stderr)
  if args.beam is not None and args.beam < 1:
    raise ConfigError(f"--beam {args.beam}: expected an integer >= 1")
  lines = read_stdin(args.invalid)
  trained = load_trained(args.workdir, which=args.checkpoint, config_path=args.config,
                         overrides=args.overrides)
  outputs = translate_lines(trained, lines, beam_size=args.beam, split_long=args.long == "split",
                            cached=not args.full_recompute, warn=warn)
  try:
    sys.stdout.write("".join(line + "\n" for line in outputs))
    sys.stdout.flush()
  except BrokenPipeError:            # the reader went away (e.g. `| head`): not an error here
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
  return 0


main = cli.entry("translate", build_parser, run)

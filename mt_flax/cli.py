"""One command-line convention for every ``python -m mt_flax <command>``.

Each command module (``mt_flax/commands/<name>.py``) defines ``build_parser() ->
argparse.ArgumentParser`` and ``run(args) -> int`` and exposes
``main = cli.entry(NAME, build_parser, run)``.
Parsers are plain argparse; a command that reads an experiment takes
``--config FILE[:VARIANT]`` and any number of ``--config.KEY=VALUE`` overrides
(collected into ``args.overrides``). :func:`entry` is the one error handler: a
:class:`UserError` (bad config, data, checkpoint, command line) is printed as
one line, ``mt_flax COMMAND: error: ...``, and turned into its exit code. Warnings
are one line each, mt_flax's only unless ``--verbose``.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Callable, Sequence

from mt_flax.errors import UserError
from mt_flax.runlog import terminal_logging


class _Parser(argparse.ArgumentParser):
  """argparse, but a usage mistake is one line (plus a pointer to --help)."""

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def new_parser(command: str, *docs: str | None, config: str = "") -> argparse.ArgumentParser:
  """A parser for ``python -m mt_flax COMMAND``; its description is ``docs`` (module
  docstrings: the library module's, then the command's) joined by blank lines.

  ``config``: "" (no experiment), "required" or "optional" (``--config FILE[:VARIANT]``).
  """
  text = plain_text("\n\n".join(doc.strip() for doc in docs if doc and doc.strip()))
  parser = _Parser(prog=f"mt_flax {command}", description=text or None,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--verbose", action="store_true",
                      help="also show third-party log output (absl, Orbax, gcsfs), hidden by "
                           "default")
  if config:
    parser.add_argument("--config", required=config == "required", metavar="FILE[:VARIANT]",
                        help="experiment config file, e.g. experiments/bible_en_es_tiny.py or "
                             "experiments/wmt14_en_de.py:big")
    parser.epilog = ("--config.KEY=VALUE (any number) overrides a key of the config, e.g. "
                     "--config.model.dropout_rate=0.2; every key is listed with its meaning in "
                     "mt_flax/default_config.py.")
  return parser


def plain_text(doc: str) -> str:
  """A docstring as a terminal shows it: ``:func:`x```, ````x```` and ```x``` become ``x``."""
  doc = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", doc)
  return re.sub(r"``([^`]+)``|`([^`]+)`", lambda m: m.group(1) or m.group(2), doc)


def add_workdir_args(parser: argparse.ArgumentParser) -> None:
  """``--workdir`` of a trained run and ``--checkpoint best|latest|averaged`` (eval, translate,
  audit)."""
  parser.add_argument("--workdir", required=True, help="the workdir of a training run "
                      "(local or gs://)")
  parser.add_argument("--checkpoint", choices=("best", "latest", "averaged"), default="best",
                      help="best (by validation), latest, or averaged (made by "
                           "python -m mt_flax average); default best")


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(``--config.KEY=VALUE`` overrides, the other arguments); ``--config.KEY VALUE`` also works."""
  overrides, rest = [], []
  it = iter(argv)
  for arg in it:
    if arg.startswith("--config."):
      if "=" not in arg:
        value = next(it, None)
        if value is None:
          raise UserError(f"{arg} needs a value (--config.KEY=VALUE)")
        arg = f"{arg}={value}"
      overrides.append(arg)
    else:
      rest.append(arg)
  return overrides, rest


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
  """Parses ``argv``; ``--config.KEY=VALUE`` flags land in ``args.overrides``."""
  overrides, rest = split_overrides(argv)
  args = parser.parse_args(rest)
  args.overrides = overrides
  return args


def parse_passthrough(parser: argparse.ArgumentParser, argv: Sequence[str]
                      ) -> argparse.Namespace:
  """Parses ``[options] [-- mt_flax args]`` of a launcher (``tpu``, ``slurm``); the mt_flax
  command after ``--`` lands in ``args.mt_args``, untouched."""
  argv = list(argv)
  cut = argv.index("--") if "--" in argv else len(argv)
  args = parser.parse_args(argv[:cut])
  args.mt_args = argv[cut + 1:]
  return args


def flag_value(mt_args: Sequence[str], flag: str) -> str | None:
  """The value of ``flag`` (e.g. ``--workdir``) in an mt_flax command line, if any."""
  for i, arg in enumerate(mt_args):
    if arg == flag and i + 1 < len(mt_args):
      return mt_args[i + 1]
    if arg.startswith(flag + "="):
      return arg.split("=", 1)[1]
  return None


def entry(command: str, build_parser: Callable[[], argparse.ArgumentParser],
          run: Callable[[argparse.Namespace], int], parse_with: Callable = parse
          ) -> Callable[[Sequence[str]], int]:
  """``main(argv) -> exit status`` of a command: parse, run, report a UserError in one line.

  ``parse_with(parser, argv)`` replaces :func:`parse` for a command whose arguments
  do not follow the ``--config.KEY=VALUE`` convention (``tpu`` and ``slurm`` pass them on:
  :func:`parse_passthrough`).
  """

  def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
      args = parse_with(build_parser(), argv)
      terminal_logging(getattr(args, "verbose", False))
      return int(run(args) or 0)
    except SystemExit as e:               # --help (0) or a usage error (2), already printed
      return e.code if isinstance(e.code, int) else 2
    except UserError as e:
      print(f"mt_flax {command}: error: {e}", file=sys.stderr)
      return e.exit_code
    except KeyboardInterrupt:             # commands that save on Ctrl-C handle it themselves
      print(f"mt_flax {command}: interrupted", file=sys.stderr)
      return 130

  main.__doc__ = f"``python -m mt_flax {command} ...``; returns the exit status."
  return main

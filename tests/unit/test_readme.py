"""Every command line the README shows is one the code accepts, and every --help is plain text.

The command lines are taken from the README itself (code blocks, indented blocks and inline
code), placeholders filled in, optional parts ``[...]`` kept with their first choice, and
parsed by the command's own parser; ``tpu`` lines are built with ``--dry-run``, and ``slurm``
lines with ``--dry-run`` must print a complete sbatch script. The long
runs behind them (the default run, train, eval, translate, average, sweep) run end to end in
tests/e2e and tests/integration.
"""
from __future__ import annotations

import importlib
import os
import re
import shlex

import pytest

from mt_flax import cli
from mt_flax.__main__ import COMMANDS
from mt_flax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(ROOT, "README.md")
DEFAULT_EXPERIMENT = os.path.join(ROOT, "experiments", "bible_en_es_tiny.py")
PREFIXES = ("./launch.sh", "python -m mt_flax")
PLACEHOLDERS = {"N": "5", "FILE": "experiments/bible_en_es_tiny.py",
                "CONFIG": "experiments/bible_en_es_tiny.py",
                "SWEEP": "experiments/sweeps/bible_tiny_lr.py"}
LAUNCH_ONLY = {"test": ("--all", "--perf"), "setup": (), "help": ()}
GENERIC = re.compile(r" (CMD|NAME|ACTION)\b")   # the general forms: "./launch.sh CMD ..."


def readme_commands() -> list[str]:
  """The README's command lines (without what follows a ``#``), in order, each once."""
  text = open(README).read()
  lines, block = [], False
  for raw in text.replace("\\\n", " ").splitlines():       # continued lines joined
    if raw.startswith("```"):
      block = not block
      continue
    stripped = raw.strip().removeprefix("# ")            # commands shown in comments too
    if (block or raw.startswith("    ")) and stripped.startswith(PREFIXES):
      lines.append(stripped)
  found = [line.split(" #")[0].strip() for line in lines]
  found += re.findall(r"`((?:\./launch\.sh|python -m mt_flax)(?: [^`]*)?)`", text)
  found = [" ".join(c.split()) for c in found]
  return [c for c in dict.fromkeys(found) if not GENERIC.search(c)]


def tpu_shorthand() -> dict[str, str]:
  match = re.search(r'^T="([^"]+)"$', open(README).read(), re.M)
  return {"$T": match.group(1)} if match else {}


def to_argv(command: str) -> list[str]:
  """A README command as the arguments after ``./launch.sh``: optional parts kept with their
  first choice, ``...`` and redirections dropped, placeholders filled in."""
  for prefix in PREFIXES:
    if command.startswith(prefix):
      command = command[len(prefix):]
  command = re.sub(r"\[([^\[\]]*)\]", r"\1", re.sub(r"\[([^\[\]]*)\]", r"\1", command))
  for name, value in tpu_shorthand().items():
    command = command.replace(name, value)
  argv = []
  for word in shlex.split(re.sub(r"[<>] ?\S+", "", command)):
    if word in ("...", "[...]"):
      continue
    word = word.split("|")[0] if not word.startswith("--config.") else word
    word = re.sub(r":VARIANT$", "", word)
    argv.append(PLACEHOLDERS.get(word, word))
  return argv


COMMAND_LINES = readme_commands()


def test_the_readme_shows_every_command():
  shown = {to_argv(c)[0] for c in COMMAND_LINES if to_argv(c)}
  assert set(COMMANDS) <= shown, f"not in the README: {sorted(set(COMMANDS) - shown)}"
  assert len(COMMAND_LINES) >= 25


@pytest.mark.parametrize("command", COMMAND_LINES)
def test_readme_command_is_accepted(command, capsys):
  argv = to_argv(command)
  if not argv or argv[0].startswith("--config."):   # the default run, maybe with overrides
    config = load_config(DEFAULT_EXPERIMENT, [a[len("--config."):] for a in argv])
    assert config.num_train_steps > 0
    return
  name, rest = argv[0], argv[1:]
  if name in LAUNCH_ONLY:
    launch = open(os.path.join(ROOT, "launch.sh")).read()
    assert re.search(rf"^  {name}\)", launch, re.M), f"launch.sh has no {name!r}"
    assert all(flag in LAUNCH_ONLY[name] for flag in rest), command
    return
  if name == "bench":
    assert os.path.isfile(os.path.join(ROOT, "bench", f"{rest[0]}.py")), command
    return
  assert name in COMMANDS, f"{command}: no command {name!r}"
  module = importlib.import_module(COMMANDS[name][0])
  if name == "tpu":
    if len(rest) > 1:                  # an action with its flags: the gcloud lines it prints
      assert module.main([*rest[:1], "--dry-run", *rest[1:]]) == 0, capsys.readouterr().err
    return
  if name == "slurm":
    cli.parse_passthrough(module.build_parser(), rest)
    if "--dry-run" in rest:            # the script it would submit
      assert module.main(rest) == 0, capsys.readouterr().err
      script = capsys.readouterr().out
      assert script.startswith("#!/bin/bash\n#SBATCH ") and script.endswith('exit "$status"\n')
      assert re.search(r"^srun --ntasks-per-node=\d+ .* -m mt_flax train .*&$", script, re.M)
    return
  parse = getattr(module, "parse_args", cli.parse)
  try:
    parse(module.build_parser(), rest)
  except SystemExit:
    pytest.fail(f"README line {command!r} is refused: {capsys.readouterr().err.strip()}")


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_is_plain_text(name, capsys):
  module = importlib.import_module(COMMANDS[name][0])
  assert module.main(["--help"]) == 0
  text = capsys.readouterr().out
  assert text.startswith("usage: mt_flax " + name)
  markup = re.findall(r"``|:(?:func|mod|class|meth):|`[^`\n]+`", text)
  assert markup == [], f"{name} --help shows markup: {markup[:3]}"

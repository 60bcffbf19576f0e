"""``python -m mt_flax <command> ...``: one entry point for every command.

Every command follows :mod:`mt_flax.cli`: argparse flags, ``--help``, and for
commands that read an experiment ``--config FILE[:VARIANT]`` plus
``--config.KEY=VALUE`` overrides; errors are one line and exit with status 2.
"""
from __future__ import annotations

import importlib
import sys

# command -> (module whose ``main(argv) -> int`` implements it, what it does)
COMMANDS = {
    "train": ("mt_flax.train", "train a model; re-running on a workdir resumes it"),
    "eval": ("mt_flax.evaluate", "BLEU/chrF report of a trained run, whole split and slices"),
    "translate": ("mt_flax.translate", "translate stdin to stdout, one line per line"),
    "audit": ("mt_flax.audit", "mask invariance checks on a trained model"),
    "average": ("mt_flax.average", "average the parameters of the last N checkpoints"),
    "data-stats": ("mt_flax.data.stats", "lengths, ratios and padding of the batches"),
    "sweep": ("mt_flax.sweep", "hyperparameter sweep with a ranked results table"),
    "tpu": ("mt_flax.tpu", "create, set up, run on and delete Cloud TPU VMs"),
}


def usage() -> str:
  lines = ["usage: python -m mt_flax COMMAND [--help] [flags]", "", "commands:"]
  lines += [f"  {name:<11} {what}" for name, (_, what) in COMMANDS.items()]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(usage())
    return 0 if argv else 2
  if argv[0] not in COMMANDS:
    print(f"mt_flax: error: unknown command {argv[0]!r}; expected one of {', '.join(COMMANDS)} "
          "(see --help)", file=sys.stderr)
    return 2
  module = importlib.import_module(COMMANDS[argv[0]][0])
  return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
  sys.exit(main())

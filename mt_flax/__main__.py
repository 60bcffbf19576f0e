"""``python -m mt_flax <command> ...``: one entry point for every command."""
from __future__ import annotations

import importlib
import sys

# command -> module whose ``main(argv) -> int`` implements it
COMMANDS = {
    "train": "mt_flax.train",
    "eval": "mt_flax.evaluate",
    "translate": "mt_flax.translate",
    "data-stats": "mt_flax.data.stats",
    "audit": "mt_flax.audit",
    "average": "mt_flax.average",
    "sweep": "mt_flax.sweep",
}


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
    if argv and argv[0] not in ("-h", "--help"):
      print(f"mt_flax: unknown command {argv[0]!r}; expected one of {', '.join(COMMANDS)}",
            file=sys.stderr)
    print("usage: python -m mt_flax {" + ",".join(COMMANDS) + "} [--config FILE] "
          "[--workdir DIR] [--config.key=value ...]", file=sys.stderr)
    return 0 if argv and argv[0] in ("-h", "--help") else 2
  module = importlib.import_module(COMMANDS[argv[0]])
  return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
  sys.exit(main())

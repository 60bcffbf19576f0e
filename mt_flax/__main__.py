"""``python -m mt_flax <command> ...``: one entry point for every command.

Every command follows :mod:`mt_flax.cli`: argparse flags, ``--help``, and for
commands that read an experiment ``--config FILE[:VARIANT]`` plus
``--config.KEY=VALUE`` overrides; errors are one line and exit with status 2.
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import sys

# command -> (module whose ``main(argv) -> int`` implements it, what it does)
COMMANDS = {
    "train": ("mt_flax.commands.train", "train a model; re-running on a workdir resumes it"),
    "eval": ("mt_flax.commands.evaluate", "BLEU/chrF report of a trained run, whole split and "
             "slices"),
    "translate": ("mt_flax.commands.translate", "translate stdin to stdout, one line per line"),
    "audit": ("mt_flax.commands.audit", "mask invariance checks on a trained model"),
    "export": ("mt_flax.commands.export", "write a trained run as a CTranslate2 model"),
    "compare": ("mt_flax.commands.compare", "compare runs' eval outputs with paired significance"),
    "average": ("mt_flax.commands.average", "average the parameters of the last N checkpoints"),
    "data-stats": ("mt_flax.commands.data_stats", "lengths, ratios and padding of the batches"),
    "sweep": ("mt_flax.commands.sweep", "hyperparameter sweep with a ranked results table"),
    "compile": ("mt_flax.commands.compile", "compile the steps for a TPU slice on this host: "
                "HBM, FLOPs, bytes, collectives"),
    "tpu": ("mt_flax.commands.tpu", "create, set up, run on and delete Cloud TPU VMs"),
    "slurm": ("mt_flax.commands.slurm", "train on a SLURM GPU cluster: sbatch script, logs, "
              "cancel"),
}


def usage() -> str:
  lines = ["usage: python -m mt_flax COMMAND [--help] [flags]", "", "commands:"]
  lines += [f"  {name:<11} {what}" for name, (_, what) in COMMANDS.items()]
  return "\n".join(lines)


# tcmalloc keeps the large buffers XLA's CPU backend frees after every step; glibc malloc
# returns them to the kernel and page-faults them in again on the next step.
TCMALLOC = "libtcmalloc_minimal.so.4"
TCMALLOC_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")
ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin")


def _runs_on_cpu() -> bool:
  """Whether JAX will pick the CPU backend (no accelerator plugin, or JAX_PLATFORMS=cpu)."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(importlib.util.find_spec(name) for name in ACCELERATOR_PLUGINS)


def cpu_if_no_tpu() -> None:
  """With libtpu installed (the tpu extra, for ``compile``) on a host without TPU chips or
  another accelerator plugin, JAX would try the TPU first and libtpu would log its failure:
  such a host runs on the CPU (``JAX_PLATFORMS``, when unset)."""
  if (os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None
      or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
      or any(importlib.util.find_spec(name) for name in ACCELERATOR_PLUGINS[1:])):
    return
  os.environ["JAX_PLATFORMS"] = "cpu"


def tcmalloc_path() -> str | None:
  """The path of tcmalloc (Debian's libtcmalloc-minimal4), or None."""
  for folder in TCMALLOC_DIRS:
    if os.path.isfile(os.path.join(folder, TCMALLOC)):
      return os.path.join(folder, TCMALLOC)
  return None


def preload_tcmalloc(argv: list[str]) -> None:
  """Starts this command again with tcmalloc preloaded, once, when it runs on CPU.

  ``MT_FLAX_TCMALLOC=0`` turns it off; without tcmalloc one line says so.
  """
  if (os.environ.get("MT_FLAX_TCMALLOC", "1") == "0" or "tcmalloc" in os.environ.get("LD_PRELOAD", "")
      or not argv or argv[0] not in COMMANDS or argv[0] in ("tpu", "slurm")
      or not _runs_on_cpu()):
    return
  lib = tcmalloc_path()
  if lib is None:
    print("mt_flax: no tcmalloc (apt-get install libtcmalloc-minimal4): the system malloc makes "
          "CPU steps slower; MT_FLAX_TCMALLOC=0 hides this line", file=sys.stderr)
    os.environ["MT_FLAX_TCMALLOC"] = "0"   # said once, also for the commands this one starts
    return
  preload = os.environ.get("LD_PRELOAD")
  env = dict(os.environ, LD_PRELOAD=lib + (":" + preload if preload else ""))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)   # as it was started


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
  cpu_if_no_tpu()
  preload_tcmalloc(sys.argv[1:])
  sys.exit(main())

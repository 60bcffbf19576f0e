r"""Cloud TPU VMs: create, set up, run mt_flax on, sweep over, read logs of, delete.

Every action is a list of ``gcloud compute tpus tpu-vm`` command lines built by
the pure functions below; ``--dry-run`` prints them instead of running them.
On a multi-host slice (a pod, e.g. v4-32) commands go to every host with
``--worker=all``, which is how JAX multi-host runs start: the same program on
all hosts, ``jax.distributed.initialize()`` finding the others. Data comes from
GCS (``--data-dir`` becomes ``TFDS_DATA_DIR``) and workdirs should be ``gs://``
paths, so checkpoints outlive the VM; on a pod they must be.

``run`` tees output to ``~/mt_flax.log`` on each host (``--detach`` keeps it
running after you disconnect); ``logs`` shows that file. ``sweep`` with
several names splits the trials of one sweep over the VMs (``--shard i/N``),
all writing into one ``gs://`` sweep directory.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import tempfile
from typing import Sequence

from mt_flax import cli, paths, sweep
from mt_flax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the checkout to copy
REMOTE_DIR = "~/mt_flax"
LOG_FILE = "~/mt_flax.log"
ARCHIVE = "mt_flax-src.tar.gz"
MT_FLAX_COMMANDS = ("train", "eval", "translate", "data-stats", "audit", "sweep", "compile")
VM_PYTHON = "3.11"          # what the VMs' venv is built with (pyproject.toml: requires-python)
UV = "~/.local/bin/uv"
UV_INSTALLER = "https://astral.sh/uv/0.13.9/install.sh"
# The host's index in its slice, from the TPU VM metadata server (as JAX reads it).
WORKER_ID = ("$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/"
             "computeMetadata/v1/instance/attributes/agent-worker-number)")


class TpuError(UserError, ValueError):
  """A bad TPU command line; the message is one line for the user."""


@dataclasses.dataclass(frozen=True)
class Tpu:
  """One TPU VM (single host or a multi-host slice)."""
  name: str
  zone: str
  accelerator: str = ""
  project: str = ""


def parse_accelerator(accelerator: str) -> tuple[str, int]:
  """``"v4-32"`` -> ``("v4", 32)``."""
  m = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v6e)-(\d+)", accelerator)
  if not m:
    raise TpuError(f"--accelerator {accelerator!r}: expected a TPU type such as v4-8, v4-32, "
                   "v5p-8, v5litepod-8 or v6e-8")
  return m.group(1), int(m.group(2))


def num_hosts(accelerator: str) -> int:
  """Hosts (VM workers) of a slice.

  v2/v3/v4/v5p count TensorCores, 8 per host; v5e/v6e count chips, up to 8 on one
  host, 4 per host in larger slices.
  """
  family, n = parse_accelerator(accelerator)
  if family in ("v5litepod", "v6e"):
    return 1 if n <= 8 else n // 4
  return max(1, n // 8)


def runtime_version(accelerator: str) -> str:
  """The TPU software version to create a VM with, for JAX."""
  family, _ = parse_accelerator(accelerator)
  return {"v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite",
          "v6e": "v2-alpha-tpuv6e"}.get(family, "tpu-ubuntu2204-base")


def _gcloud(tpu: Tpu, verb: str, *args: str) -> list[str]:
  project = [f"--project={tpu.project}"] if tpu.project else []
  return ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, f"--zone={tpu.zone}", *project]


def _workers(tpu: Tpu) -> list[str]:
  return ["--worker=all"] if num_hosts(tpu.accelerator) > 1 else []


def _distributed(tpu: Tpu) -> list[str]:
  """On a multi-host slice the trainer joins the other hosts (mt_flax.sharding)."""
  return ["MT_FLAX_DISTRIBUTED=1"] if num_hosts(tpu.accelerator) > 1 else []


def create_command(tpu: Tpu, *, version: str = "", spot: bool = False) -> list[str]:
  return _gcloud(tpu, "create", tpu.name, f"--accelerator-type={tpu.accelerator}",
                 f"--version={version or runtime_version(tpu.accelerator)}",
                 *(["--spot"] if spot else []))


def delete_command(tpu: Tpu) -> list[str]:
  return _gcloud(tpu, "delete", tpu.name)


def ssh_command(tpu: Tpu, remote: str, workers: Sequence[str] | None = None) -> list[str]:
  """``gcloud ... ssh NAME --command=REMOTE``; on all hosts of a pod unless ``workers`` says."""
  workers = _workers(tpu) if workers is None else list(workers)
  return _gcloud(tpu, "ssh", tpu.name, *workers, f"--command={remote}")


def archive_command(root: str, archive: str) -> list[str]:
  """Local: packs the working tree (no .git, .venv, runs) for copying to the VMs, with a
  ``GIT_COMMIT`` file naming its commit (what a run there records in ``git_commit.txt``)."""
  excludes = ["--exclude-vcs", "--exclude=./.venv", "--exclude=./runs", "--exclude=__pycache__",
              "--exclude=*.egg-info", "--exclude=.pytest_cache", f"--exclude=./{paths.COMMIT_FILE}"]
  return ["tar", "-czf", archive, *excludes, "-C", root, ".", "-C", _commit_folder(root, archive),
          paths.COMMIT_FILE]


def _commit_folder(root: str, archive: str) -> str:
  """A folder beside ``archive`` holding ``GIT_COMMIT`` with ``root``'s commit."""
  folder = archive + ".commit"
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, paths.COMMIT_FILE), "w") as f:
    f.write(paths.source_commit(root) + "\n")
  return folder


def setup_commands(tpu: Tpu, root: str, archive: str) -> list[list[str]]:
  """Pack the code, copy it to every host, install it there in a venv with JAX for TPU.

  The TPU images run Ubuntu 22.04, whose python3 (3.10) is too old for the pinned stack:
  ``uv`` installs Python ``VM_PYTHON`` and ``launch.sh setup`` builds the venv with it
  (the ``tpu`` extra: libtpu).
  """
  remote = " && ".join([
      f"(test -x {UV} || curl -LsSf {UV_INSTALLER} | env UV_INSTALL_DIR=$HOME/.local/bin "
      "UV_NO_MODIFY_PATH=1 sh)",
      f"{UV} python install {VM_PYTHON}",
      f"mkdir -p {REMOTE_DIR}",
      f"tar -xzf ~/{ARCHIVE} -C {REMOTE_DIR}",
      f"cd {REMOTE_DIR}",
      f"PYTHON=$({UV} python find {VM_PYTHON}) MT_FLAX_EXTRAS=tpu ./launch.sh setup",
  ])
  scp = _gcloud(tpu, "scp", archive, f"{tpu.name}:{ARCHIVE}", *_workers(tpu))
  return [archive_command(root, archive), scp, ssh_command(tpu, remote)]


def workdir_of(mt_args: Sequence[str]) -> str | None:
  """The ``--workdir`` value in an mt_flax command line, if any."""
  return cli.flag_value(mt_args, "--workdir")


def remote_mt_flax(mt_args: Sequence[str], *, data_dir: str = "", detach: bool = False,
                   env: Sequence[str] = (), first: Sequence[str] = ()) -> str:
  """The shell line that runs ``python -m mt_flax <mt_args>`` in the VM's checkout; ``first``,
  an mt_flax command run before it (attached) that must succeed."""
  exports = [f"TFDS_DATA_DIR={shlex.quote(data_dir)}"] if data_dir else []
  exports += list(env)
  run = shlex.join([".venv/bin/python", "-m", "mt_flax", *mt_args])
  parts = [f"cd {REMOTE_DIR}"]
  if exports:
    parts.append("export " + " ".join(exports))
  if first:
    parts += ["set -o pipefail", shlex.join([".venv/bin/python", "-m", "mt_flax", *first])
              + f" 2>&1 | tee -a {LOG_FILE}"]
  if detach:
    parts.append(f"(nohup {run} >> {LOG_FILE} 2>&1 < /dev/null &)")
  else:  # pipefail: the command's exit status, not tee's, reaches gcloud
    parts += ["set -o pipefail"] * (not first) + [f"{run} 2>&1 | tee -a {LOG_FILE}"]
  return " && ".join(parts)


def _check_mt_args(tpu: Tpu, mt_args: Sequence[str], *, shared: bool) -> None:
  if not mt_args:
    raise TpuError("expected the mt_flax command after --, e.g. -- train --config "
                   "experiments/bible_en_es_tiny.py --workdir gs://BUCKET/runs/x")
  if mt_args[0] not in MT_FLAX_COMMANDS:
    raise TpuError(f"unknown mt_flax command {mt_args[0]!r} after --; expected one of "
                   f"{', '.join(MT_FLAX_COMMANDS)}")
  workdir = workdir_of(mt_args)
  if (shared or num_hosts(tpu.accelerator) > 1) and mt_args[0] in ("train", "sweep") and (
      not workdir or not workdir.startswith("gs://")):
    raise TpuError(f"{mt_args[0]} on {'a multi-host slice' if not shared else 'several VMs'} "
                   f"needs --workdir gs://BUCKET/...; got {workdir!r}")


def compile_first_args(tpu: Tpu, mt_args: Sequence[str]) -> list[str]:
  """``compile`` of a train command's config for this slice, its longest batch shape only: a
  config that cannot fit stops in minutes, before data preparation."""
  from mt_flax.compile import parse_topology
  overrides, rest = cli.split_overrides(mt_args[1:])
  config = cli.flag_value(rest, "--config")
  if mt_args[0] != "train" or not config:
    raise TpuError("--compile-first needs a train command with --config after --")
  parse_topology(tpu.accelerator)
  return ["compile", "--config", config, "--topology", tpu.accelerator, "--max-shapes", "1",
          *overrides]


def run_command(tpu: Tpu, mt_args: Sequence[str], *, data_dir: str = "",
                detach: bool = False, compile_first: bool = False) -> list[str]:
  """Runs one mt_flax command on the VM (on every host of a pod)."""
  _check_mt_args(tpu, mt_args, shared=False)
  first = compile_first_args(tpu, mt_args) if compile_first else []
  return ssh_command(tpu, remote_mt_flax(mt_args, data_dir=data_dir, detach=detach,
                                         env=_distributed(tpu), first=first))


def sweep_commands(tpus: Sequence[Tpu], sweep_args: Sequence[str], *,
                   data_dir: str = "") -> list[list[str]]:
  """One detached ``mt_flax sweep ... --shard i/N`` per VM; together they cover every trial."""
  if any(a == "--shard" or a.startswith("--shard=") for a in sweep_args):
    raise TpuError("tpu sweep assigns --shard itself; remove it from the sweep arguments")
  commands = []
  for i, tpu in enumerate(tpus):
    args = ["sweep", *sweep_args, "--shard", f"{i}/{len(tpus)}"]
    _check_mt_args(tpu, args, shared=len(tpus) > 1)
    env = [*_distributed(tpu), f"MT_FLAX_WORKER={WORKER_ID}"]  # host 0 keeps the sweep's books
    commands.append(ssh_command(tpu, remote_mt_flax(args, data_dir=data_dir, detach=True, env=env)))
  return commands


def logs_command(tpu: Tpu, *, worker: str = "0", follow: bool = False, lines: int = 100) -> list[str]:
  tail = f"tail -n {lines}" + (" -f" if follow else "") + f" {LOG_FILE}"
  return ssh_command(tpu, tail, workers=[f"--worker={worker}"])


def sweep_plan(tpus: Sequence[Tpu], trials: Sequence[dict]) -> list[list[str]]:
  """Comment lines (``["#", text]``) naming which of the sweep's ``trials`` each VM runs."""
  lines = []
  for i, tpu in enumerate(tpus):
    names = [sweep.trial_name(j, trials[j]) for j in sweep.shard_indices(len(trials), (i, len(tpus)))]
    lines.append(["#", f"{tpu.name}: {', '.join(names) or 'no trials'}"])
  return lines


ACTIONS = ("create", "setup", "run", "sweep", "logs", "delete")


def make_tpus(action: str, names: str, zone: str, accelerator: str = "",
              project: str = "") -> list[Tpu]:
  """The VMs of one action; ``names`` is comma-separated (several for create, setup, sweep
  and delete)."""
  names = [n for n in names.split(",") if n]
  for name in names:
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name):
      raise TpuError(f"--name {name!r}: expected lowercase letters, digits and hyphens, "
                     "starting with a letter")
  if len(names) > 1 and action not in ("create", "setup", "sweep", "delete"):
    raise TpuError(f"tpu {action} takes one --name; got {len(names)}")
  if action in ("create", "setup", "run", "sweep"):
    if not accelerator:
      raise TpuError(f"tpu {action} needs --accelerator, e.g. v4-8")
    parse_accelerator(accelerator)
  return [Tpu(n, zone, accelerator, project) for n in names]


def build(action: str, tpus: Sequence[Tpu], mt_args: Sequence[str] = (), *, root: str = ROOT,
          version: str = "", spot: bool = False, data_dir: str = "", detach: bool = False,
          worker: str = "0", follow: bool = False, compile_first: bool = False
          ) -> list[list[str]]:
  """All command lines of one action on ``tpus`` (``mt_args``: the mt_flax command of run
  and sweep). The plan of a sweep is :func:`sweep_plan`."""
  if mt_args and action not in ("run", "sweep"):
    raise TpuError(f"tpu {action} takes no mt_flax command after --")
  if action == "create":
    return [create_command(t, version=version, spot=spot) for t in tpus]
  if action == "setup":
    archive = os.path.join(tempfile.gettempdir(), ARCHIVE)
    cmds = setup_commands(tpus[0], root, archive)
    return cmds + [c for t in tpus[1:] for c in setup_commands(t, root, archive)[1:]]
  if action == "run":
    return [run_command(tpus[0], mt_args, data_dir=data_dir, detach=detach,
                        compile_first=compile_first)]
  if action == "sweep":
    return sweep_commands(tpus, mt_args, data_dir=data_dir)
  if action == "logs":
    return [logs_command(tpus[0], worker=worker, follow=follow)]
  return [delete_command(t) for t in tpus]


def format_command(cmd: Sequence[str]) -> str:
  return "# " + cmd[1] if cmd and cmd[0] == "#" else shlex.join(cmd)

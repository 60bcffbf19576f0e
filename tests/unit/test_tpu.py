"""TPU VM command lines: exact dry-run output for a single host, a pod, and a sweep over VMs."""
import os
import shlex
import subprocess
import tempfile

import pytest

from mt_flax import paths, sweep, tpu
from mt_flax.commands import tpu as tpu_command

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GCLOUD = "gcloud compute tpus tpu-vm"
ZONE = "us-central2-b"


def dry_run(capsys, *argv: str) -> list[str]:
  rc = tpu_command.main([argv[0], "--dry-run", *argv[1:]])
  out = capsys.readouterr()
  assert rc == 0, out.err
  return out.out.splitlines()


@pytest.mark.parametrize("accelerator, hosts, version", [
    ("v4-8", 1, "tpu-ubuntu2204-base"), ("v4-32", 4, "tpu-ubuntu2204-base"),
    ("v3-8", 1, "tpu-ubuntu2204-base"), ("v5p-16", 2, "v2-alpha-tpuv5"),
    ("v5litepod-8", 1, "v2-alpha-tpuv5-lite"), ("v5litepod-16", 4, "v2-alpha-tpuv5-lite"),
    ("v6e-4", 1, "v2-alpha-tpuv6e"), ("v6e-64", 16, "v2-alpha-tpuv6e"),
])
def test_hosts_and_runtime_version_per_accelerator(accelerator, hosts, version):
  assert tpu.num_hosts(accelerator) == hosts
  assert tpu.runtime_version(accelerator) == version


def test_single_host_lifecycle(capsys):
  base = ["--name", "mt-a", "--zone", ZONE, "--accelerator", "v4-8"]
  assert dry_run(capsys, "create", *base, "--spot") == [
      f"{GCLOUD} create mt-a --accelerator-type=v4-8 --version=tpu-ubuntu2204-base --spot --zone={ZONE}"]
  setup = dry_run(capsys, "setup", *base, "--project", "my-proj")
  archive = os.path.join(tempfile.gettempdir(), tpu.ARCHIVE)
  assert setup[0].startswith(f"tar -czf {archive} --exclude-vcs ")
  assert setup[0].endswith(f"-C {ROOT} . -C {archive}.commit GIT_COMMIT")
  assert setup[1] == (f"{GCLOUD} scp {archive} mt-a:mt_flax-src.tar.gz --zone={ZONE} --project=my-proj")
  ssh = shlex.split(setup[2])
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mt-a"]
  assert "--worker=all" not in ssh
  # the image's python3 is 3.10: uv installs the Python the venv is built with
  assert ssh[6].startswith("--command=(test -x ~/.local/bin/uv || curl -LsSf "
                           "https://astral.sh/uv/0.13.9/install.sh | env ")
  assert " && ~/.local/bin/uv python install 3.11 && " in ssh[6]
  assert ssh[6].endswith(" && cd ~/mt_flax && PYTHON=$(~/.local/bin/uv python find 3.11) "
                         "MT_FLAX_EXTRAS=tpu ./launch.sh setup")
  run = dry_run(capsys, "run", *base, "--data-dir", "gs://b/tfds", "--", "train", "--config",
                "experiments/bible_en_es_tiny.py", "--workdir", "gs://b/runs/tiny")
  assert run == [
      f"{GCLOUD} ssh mt-a '--command=cd ~/mt_flax && export TFDS_DATA_DIR=gs://b/tfds && "
      "set -o pipefail && .venv/bin/python -m mt_flax train --config experiments/bible_en_es_tiny.py "
      f"--workdir gs://b/runs/tiny 2>&1 | tee -a ~/mt_flax.log' --zone={ZONE}"]
  assert dry_run(capsys, "logs", "--name", "mt-a", "--zone", ZONE, "--follow") == [
      f"{GCLOUD} ssh mt-a --worker=0 '--command=tail -n 100 -f ~/mt_flax.log' --zone={ZONE}"]
  assert dry_run(capsys, "delete", "--name", "mt-a", "--zone", ZONE) == [
      f"{GCLOUD} delete mt-a --zone={ZONE}"]


def test_run_can_compile_the_config_for_the_slice_first(capsys):
  base = ["--name", "mt-pod", "--zone", ZONE, "--accelerator", "v4-32"]
  run = dry_run(capsys, "run", *base, "--compile-first", "--detach", "--", "train", "--config",
                "experiments/wmt14_en_de.py:big", "--config.mesh.fsdp", "4", "--workdir=gs://b/r")
  assert run == [
      f"{GCLOUD} ssh mt-pod --worker=all '--command=cd ~/mt_flax && export MT_FLAX_DISTRIBUTED=1 && "
      "set -o pipefail && .venv/bin/python -m mt_flax compile --config experiments/wmt14_en_de.py:big "
      "--topology v4-32 --max-shapes 1 --config.mesh.fsdp=4 2>&1 | tee -a ~/mt_flax.log && "
      "(nohup .venv/bin/python -m mt_flax train --config experiments/wmt14_en_de.py:big "
      "--config.mesh.fsdp 4 --workdir=gs://b/r >> ~/mt_flax.log 2>&1 < /dev/null &)' "
      f"--zone={ZONE}"]
  assert tpu_command.main(["run", "--dry-run", *base, "--compile-first", "--", "eval",
                           "--workdir", "gs://b/r"]) == 2
  assert "--compile-first needs a train command with --config" in capsys.readouterr().err


def test_pod_commands_go_to_every_host(capsys):
  base = ["--name", "mt-pod", "--zone", ZONE, "--accelerator", "v4-32"]
  setup = dry_run(capsys, "setup", *base)
  assert setup[1].endswith("--worker=all --zone=" + ZONE)
  assert " ssh mt-pod --worker=all '--command=" in setup[2]
  run = dry_run(capsys, "run", *base, "--detach", "--", "train", "--config",
                "experiments/bible_en_es_tiny.py", "--workdir=gs://b/runs/pod", "--config.seed=3")
  assert run == [
      f"{GCLOUD} ssh mt-pod --worker=all '--command=cd ~/mt_flax && export MT_FLAX_DISTRIBUTED=1 && "
      "(nohup .venv/bin/python -m "
      "mt_flax train --config experiments/bible_en_es_tiny.py --workdir=gs://b/runs/pod "
      f"--config.seed=3 >> ~/mt_flax.log 2>&1 < /dev/null &)' --zone={ZONE}"]
  assert dry_run(capsys, "logs", "--name", "mt-pod", "--zone", ZONE, "--worker", "3")[0].startswith(
      f"{GCLOUD} ssh mt-pod --worker=3 ")


def test_remote_command_quotes_user_arguments():
  line = tpu.remote_mt_flax(["translate", "--workdir", "gs://b/my run", "--beam", "4"])
  assert ".venv/bin/python -m mt_flax translate --workdir 'gs://b/my run' --beam 4" in line


def test_sweep_fans_trials_out_over_vms(capsys):
  sweep_file = os.path.join(ROOT, "experiments", "sweeps", "bible_tiny_lr.py")
  names = [sweep.trial_name(i, t) for i, t in enumerate(sweep.load_sweep(sweep_file))]
  lines = dry_run(capsys, "sweep", "--name", "sw-a,sw-b,sw-c", "--zone", ZONE, "--accelerator",
                  "v4-8", "--data-dir", "gs://b/tfds", "--", "experiments/bible_en_es_tiny.py",
                  sweep_file, "--workdir", "gs://b/sweeps/lr", "--config.num_train_steps=300")
  plan, cmds = lines[:3], lines[3:]
  assert plan == [f"# sw-a: {names[0]}, {names[3]}", f"# sw-b: {names[1]}", f"# sw-c: {names[2]}"]
  assert len(cmds) == 3
  for i, (vm, cmd) in enumerate(zip(["sw-a", "sw-b", "sw-c"], cmds)):
    argv = shlex.split(cmd)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", vm]
    remote = argv[6]
    assert remote.startswith("--command=cd ~/mt_flax && export TFDS_DATA_DIR=gs://b/tfds MT_FLAX_WORKER=")
    assert (f"(nohup .venv/bin/python -m mt_flax sweep experiments/bible_en_es_tiny.py {sweep_file} "
            f"--workdir gs://b/sweeps/lr --config.num_train_steps=300 --shard {i}/3 >> ~/mt_flax.log") in remote
  # every VM runs its shard; together the shards are every trial exactly once
  shards = [sweep.shard_indices(4, (i, 3)) for i in range(3)]
  assert sorted(sum(shards, [])) == [0, 1, 2, 3]


@pytest.mark.parametrize("argv, message", [
    (["run", "--name", "x", "--zone", ZONE, "--accelerator", "v9-8", "--", "train"], "expected a TPU type"),
    (["run", "--name", "x", "--zone", ZONE, "--accelerator", "v4-32", "--", "train", "--workdir", "runs/x"],
     "needs --workdir gs://"),
    (["sweep", "--name", "a,b", "--zone", ZONE, "--accelerator", "v4-8", "--", "c.py", "s.py"],
     "needs --workdir gs://"),
    (["sweep", "--name", "a", "--zone", ZONE, "--accelerator", "v4-8", "--", "c.py", "s.py", "--shard", "0/2"],
     "assigns --shard itself"),
    (["run", "--name", "x", "--zone", ZONE, "--accelerator", "v4-8"], "expected the mt_flax command"),
    (["run", "--name", "x", "--zone", ZONE, "--accelerator", "v4-8", "--", "trian"], "unknown mt_flax command"),
    (["create", "--name", "My_TPU", "--zone", ZONE, "--accelerator", "v4-8"], "lowercase letters"),
    (["create", "--name", "x", "--zone", ZONE], "needs --accelerator"),
    (["logs", "--name", "a,b", "--zone", ZONE], "takes one --name"),
    (["delete", "--name", "x", "--zone", ZONE, "--", "train"], "takes no mt_flax command"),
])
def test_bad_command_lines_are_one_line_errors(capsys, argv, message):
  assert tpu_command.main([argv[0], "--dry-run", *argv[1:]]) == 2
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- the VMs' Python


def _requirements(extra: str) -> list[str]:
  """pyproject.toml's dependencies and one of its extras."""
  import tomllib
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  return [*project["dependencies"], *project["optional-dependencies"][extra]]


# Pinned packages published as source only (pure Python): built into wheels first, as pip
# builds them on the VMs, since a resolution for another Python takes wheels only.
SOURCE_ONLY = ("pysword", "promise")
OFFLINE = ("NewConnectionError", "Could not fetch URL", "Max retries", "No matching distribution")


def _pip(*args: str):
  import subprocess
  import sys
  run = subprocess.run([sys.executable, "-m", "pip", *args, "--quiet", "--no-input",
                        "--disable-pip-version-check"], capture_output=True, text=True, timeout=900)
  if run.returncode and any(s in run.stderr for s in OFFLINE):
    pytest.skip(f"pip cannot reach the package index: {run.stderr.strip().splitlines()[-1]}")
  assert run.returncode == 0, run.stderr
  return run


def test_pinned_stack_with_the_tpu_extra_resolves_for_the_vm_python(tmp_path):
  """What ``tpu setup`` installs on the VMs (Python VM_PYTHON, the tpu extra), resolved against
  constraints.txt as pip would there."""
  import json
  constraints = os.path.join(ROOT, "constraints.txt")
  pins = dict(line.strip().lower().split("==") for line in open(constraints) if "==" in line)
  wheels = tmp_path / "wheels"
  _pip("wheel", "--no-deps", "-w", str(wheels), *(f"{n}=={pins[n]}" for n in SOURCE_ONLY))
  report = tmp_path / "report.json"
  _pip("install", "--dry-run", "--python-version", tpu.VM_PYTHON, "--only-binary=:all:",
       "--find-links", str(wheels), "--target", str(tmp_path / "target"),
       "--report", str(report), "-c", constraints, *_requirements("tpu"))
  installed = {i["metadata"]["name"].lower(): i["metadata"]["version"]
               for i in json.loads(report.read_text())["install"]}
  for name in ("jax", "jaxlib", "libtpu", "numpy", "grain", "flax", "pysword"):
    assert installed[name] == pins[name], name


def test_launch_sh_refuses_python_3_10_in_one_line(tmp_path):
  """Ubuntu 22.04's python3 (what the TPU images have) stops setup before any install. The
  stand-in answers the version question as Python 3.10 does; nothing else is asked of it."""
  import subprocess
  python310 = tmp_path / "python3.10"
  python310.write_text("#!/bin/sh\necho 3.10\n")
  python310.chmod(0o755)
  venv = tmp_path / "venv"
  run = subprocess.run([os.path.join(ROOT, "launch.sh"), "setup"], capture_output=True, text=True,
                       env={**os.environ, "PYTHON": str(python310), "MT_FLAX_VENV": str(venv),
                            "MT_FLAX_NO_SETUP": ""})
  assert run.returncode == 2
  assert run.stderr == (f"launch.sh: {python310} is Python 3.10; mt_flax needs Python >= 3.11 "
                        "(set PYTHON=python3.11, or install one with: uv python install 3.11)\n")
  assert not venv.exists()


def test_the_archive_carries_the_commit_of_the_tree(tmp_path):
  tree = tmp_path / "tree"
  (tree / "mt_flax").mkdir(parents=True)
  (tree / "mt_flax" / "a.py").write_text("x = 1\n")
  git = lambda *a: subprocess.run(["git", "-C", str(tree), *a], check=True, capture_output=True,
                                  text=True).stdout.strip()
  git("init", "-q")
  git("add", "-A")
  git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
  head = git("rev-parse", "HEAD")
  archive = str(tmp_path / "src.tar.gz")
  subprocess.run(tpu.archive_command(str(tree), archive), check=True)
  out = tmp_path / "out"
  out.mkdir()
  subprocess.run(["tar", "-xzf", archive, "-C", str(out)], check=True)
  assert not (out / ".git").exists() and (out / "mt_flax" / "a.py").exists()
  assert (out / "GIT_COMMIT").read_text() == head + "\n"
  assert paths.source_commit(str(out)) == head              # what a run there records
  (tree / "mt_flax" / "a.py").write_text("x = 2\n")
  subprocess.run(tpu.archive_command(str(tree), archive), check=True)
  subprocess.run(["tar", "-xzf", archive, "-C", str(out)], check=True)
  assert paths.source_commit(str(out)) == head + "-dirty"

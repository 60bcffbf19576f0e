"""TPU VM command lines: exact dry-run output for a single host, a pod, and a sweep over VMs."""
import os
import shlex
import tempfile

import pytest

from mt_flax import sweep, tpu
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
  assert setup[0].startswith(f"tar -czf {archive} --exclude-vcs ") and setup[0].endswith(f"-C {ROOT} .")
  assert setup[1] == (f"{GCLOUD} scp {archive} mt-a:mt_flax-src.tar.gz --zone={ZONE} --project=my-proj")
  ssh = shlex.split(setup[2])
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mt-a"]
  assert ssh[6].startswith("--command=sudo apt-get update") and "--worker=all" not in ssh
  assert "-c constraints.txt -e . 'jax[tpu]' gcsfs" in ssh[6]
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

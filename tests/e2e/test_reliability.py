"""Reliability of the command line, with real processes, signals, files and a full disk.

- a damaged checkpoint is caught by ``train``, ``eval`` and ``translate`` (one line each);
- one run per workdir (a second one stops at once, naming the holder);
- Ctrl-C saves and exits 130;
- a full disk stops training at the failed save with one line, the previous checkpoint intact;
- the OS workdir lock is freed when its holder dies.

The lock object, atomic writes and small inputs are tested in this process
(``tests/unit/test_reliability_in_process.py``).
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from mt_flax import checkpoint, workdir_lock
from mt_flax.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "experiments", "bible_en_es_tiny.py") + ":test"
SENTENCES = "In the beginning God created the heaven and the earth.\nAnd God said, Let there be light.\n"


def env(tmp_path, devices: int = 1) -> dict:
  """One CPU device; ``devices=8`` to resume the session's trained run (made with 8)."""
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
              + os.environ["MT_FLAX_TEST_XLA_FLAGS"],
              JAX_PLATFORMS="cpu")


def cli(command: str, workdir: str, args: list[str], environ: dict,
        stdin: str | None = None) -> subprocess.Popen:
  argv = [sys.executable, "-m", "mt_flax", command, "--workdir", workdir, *args]
  if command == "train":
    argv[4:4] = ["--config", CONFIG]
  return subprocess.Popen(argv, env=environ, cwd=ROOT, text=True,
                          stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run(command: str, workdir: str, args: list[str], environ: dict,
        stdin: str | None = None) -> tuple[int, str, list[str]]:
  proc = cli(command, workdir, args, environ, stdin)
  out, err = proc.communicate(stdin, timeout=600)
  return proc.returncode, out, err.strip().splitlines()


def assert_quiet(lines: list[str]) -> None:
  """Only our own lines reach the terminal (errors, notices, mt_flax warnings): no
  tracebacks, no third-party logging."""
  for line in lines:
    assert line.startswith(("mt_flax", "[train]")), lines


def rewrite_saved_param(step_dir: str, name: str, value: float) -> None:
  """Writes ``value`` into element [0, 0] of a saved param via TensorStore (files stay readable)."""
  import tensorstore as ts
  array = ts.open({"driver": "zarr", "kvstore": {
      "driver": "ocdbt", "base": f"file://{step_dir}/params/", "path": f"{name}/"}}).result()
  array[0, 0] = value


# ----------------------------------------------------------------------------- damaged checkpoint


def test_damaged_checkpoint_is_caught_by_every_command(tmp_path, trained_run):
  """The newest checkpoint's kernel changed in place (readable, different values):
  translate and eval use step 12 and say so in one line; train moves step 24 aside and
  resumes from 12."""
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_run, workdir)
  rewrite_saved_param(os.path.join(workdir, "checkpoints", "24"), "decoder_0.mlp.Dense_0.kernel",
                      1e30)
  environ = env(tmp_path)
  notice = ("mt_flax: checkpoint step 24 failed verification: "
            "params/decoder_0/mlp/Dense_0/kernel differs from the digest saved with it; "
            "using step 12 instead")

  code, out, err = run("translate", workdir, ["--beam", "1"], environ, stdin=SENTENCES)
  assert code == 0 and err == [notice], err
  assert len(out.splitlines()) == 2

  code, out, err = run("eval", workdir, ["--beam", "1", "--max-examples", "8",
                                         "--long-examples", "0", "--split", "validation"],
                       environ)
  assert code == 0 and err == [notice], err
  report = json.load(open(os.path.join(workdir, "eval", "validation", "report.json")))
  assert report["step"] == 12

  code, _, err = run("train", workdir, [], env(tmp_path, devices=8))
  assert code == 0, err
  assert_quiet(err)
  assert (f"mt_flax: checkpoint step 24 in {workdir}/checkpoints failed verification: "
          "params/decoder_0/mlp/Dense_0/kernel differs from the digest saved with it; "
          "moved to checkpoints_unreadable/ and using the previous one") in err
  assert any("resumed from checkpoint step 12" in line for line in err)
  assert os.path.isdir(os.path.join(workdir, "checkpoints_unreadable", "24"))
  assert sorted(r["step"] for r in read_metrics(workdir) if "loss" in r) == list(range(1, 25))


# ----------------------------------------------------------------------------- one run per workdir


def test_second_run_stops_at_once_and_ctrl_c_saves_then_twice_stops(tmp_path, tiny_training):
  """A second train on a running workdir stops with one line naming the holder (status 75:
  retry later); the first, interrupted with SIGINT, saves and exits 130; the resumed run,
  interrupted with SIGINT twice, stops at once with 130 too."""
  workdir = tiny_training.new_workdir(tmp_path, "shared")
  environ = env(tmp_path)
  args = tiny_training.overrides(num_train_steps=400, checkpoint_every_steps=10,
                                 eval_every_steps=1000)
  first = cli("train", workdir, args, environ)
  tiny_training.wait(tiny_training.has_checkpoint(workdir, 10), first, "checkpoint 10")

  code, _, err = run("train", workdir, args, environ)
  assert code == 75 and len(err) == 1, err
  assert err[0].startswith(f"mt_flax train: error: workdir {workdir} is in use by another run")
  assert f"pid {first.pid}" in err[0]

  first.send_signal(signal.SIGINT)
  code, err = tiny_training.finish(first)
  lines = err.strip().splitlines()
  assert code == 130, lines
  assert_quiet(lines)
  saved = [line for line in lines if "SIGINT: saved checkpoint step" in line]
  assert len(saved) == 1
  step = int(saved[0].split("step ")[1].split(";")[0])
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))
  assert not os.path.exists(os.path.join(workdir, "DONE"))

  # resumed, training again (a new checkpoint), then Ctrl-C twice
  resumed = cli("train", workdir, args, environ)
  tiny_training.wait(tiny_training.has_checkpoint(workdir, (step // 10 + 1) * 10), resumed,
                     "a checkpoint after the resume")
  resumed.send_signal(signal.SIGINT)
  resumed.send_signal(signal.SIGINT)
  code, err = tiny_training.finish(resumed)
  lines = err.strip().splitlines()
  assert code == 130, lines
  assert_quiet(lines)
  assert any(f"resumed from checkpoint step {step}" in line for line in lines)
  assert any("interrupted again" in line or "SIGINT: saved" in line for line in lines)
  assert not os.path.exists(os.path.join(workdir, "DONE"))


def test_local_lock_is_freed_when_its_process_dies(tmp_path):
  workdir = str(tmp_path / "w")
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from mt_flax import workdir_lock\n"
       "with workdir_lock.hold(sys.argv[1]):\n  print('held', flush=True); time.sleep(600)",
       workdir], stdout=subprocess.PIPE, text=True, cwd=ROOT)
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(workdir_lock.WorkdirBusy, match=f"pid {holder.pid}"):
    with workdir_lock.hold(workdir):
      pass
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  with workdir_lock.hold(workdir) as lock:      # the kernel freed it
    info = json.loads(open(lock.path).read())
    assert info["pid"] == os.getpid()


# ----------------------------------------------------------------------------- disk full


def temporary_folders(folder) -> list[str]:
  """What a failed save left in ``folder``. Training removes it when it stops, but a write
  orphaned inside tensorstore can recreate it after that; the next run removes it for sure."""
  return [n for n in os.listdir(folder) if "tmp" in n]


def start_then_fill(tiny_training, workdir: str, disk, environ: dict,
                    fill_disk) -> tuple[int, list[str]]:
  """Trains until checkpoint 10, fills ``disk``, returns (status, stderr lines)."""
  args = tiny_training.overrides(num_train_steps=400, checkpoint_every_steps=10,
                                 eval_every_steps=1000)
  proc = cli("train", workdir, args, environ)
  tiny_training.wait(tiny_training.has_checkpoint(workdir, 10), proc, "checkpoint 10")
  fill_disk(disk)
  code, err = tiny_training.finish(proc)
  lines = err.strip().splitlines()
  assert_quiet(lines)
  return code, lines


def test_failed_background_save_stops_training_in_one_line(tmp_path, tiny_training, tmpfs,
                                                            fill_disk):
  """Only the checkpoints folder is full: the step-20 save fails in the background and
  training stops before the next save with one line; checkpoint 10 stays usable."""
  workdir = tiny_training.new_workdir(tmp_path, "run")
  environ = env(tmp_path)
  with tmpfs(os.path.join(workdir, "checkpoints")) as disk:
    code, lines = start_then_fill(tiny_training, workdir, disk, environ, fill_disk)
    assert code == 1, lines
    assert lines[-1] == (
        f"mt_flax train: error: saving checkpoint step 20 failed: no space left on device in "
        f"{workdir}; stopped, the previous checkpoint (step 10) is intact; fix the cause and "
        f"re-run the same command to resume (details in {workdir}/train.log)")
    assert max(tiny_training.losses(workdir)) <= 30          # stopped before the step-30 save
    assert "10" in os.listdir(disk) and "20" not in os.listdir(disk)
    assert "No space left on device" in open(os.path.join(workdir, "train.log")).read()
    os.remove(os.path.join(disk, "filler"))
    stray = os.path.join(disk, "20.orbax-checkpoint-tmp", "params")   # as an orphaned write
    os.makedirs(stray, exist_ok=True)                                   # would leave it
    open(os.path.join(stray, "manifest.ocdbt"), "wb").close()
    code, _, err = run("train", workdir, tiny_training.overrides(
        num_train_steps=12, checkpoint_every_steps=10, eval_every_steps=1000),
        environ)
    assert code == 0, err
    assert any("resumed from checkpoint step 10" in line for line in err)
    assert any("removed the temporary folders of unfinished saves: 20.orbax-checkpoint-tmp"
               in line for line in err), err
    assert not temporary_folders(disk)


def test_full_disk_stops_training_in_one_line(tmp_path, tiny_training, small_disk, fill_disk):
  """The whole workdir on a full disk: whichever write fails first, one line, then a resume."""
  workdir = tiny_training.new_workdir(small_disk, "run")
  environ = env(tmp_path)
  code, lines = start_then_fill(tiny_training, workdir, small_disk, environ, fill_disk)
  assert code == 1, lines
  assert lines[-1].startswith("mt_flax train: error: ")
  assert f"no space left on device in {workdir}" in lines[-1]
  assert lines[-1].endswith(f"(details in {workdir}/train.log)")
  os.remove(small_disk / "filler")
  last = max(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
  code, _, err = run("train", workdir, tiny_training.overrides(
      num_train_steps=last + 2, checkpoint_every_steps=10, eval_every_steps=1000),
      environ)
  assert code == 0, err
  assert any(f"resumed from checkpoint step {last}" in line for line in err)
  assert not temporary_folders(os.path.join(workdir, "checkpoints"))


def test_checkpoint_errors_keep_one_line_when_nothing_is_good(tmp_path, trained_run):
  """Every checkpoint damaged: translate stops with one line saying none is good."""
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_run, workdir)
  for step in ("12", "24"):
    rewrite_saved_param(os.path.join(workdir, "checkpoints", step),
                        "decoder_0.mlp.Dense_0.kernel", float("nan"))
  code, out, err = run("translate", workdir, ["--beam", "1"], env(tmp_path), stdin=SENTENCES)
  assert code == 2 and out == "" and len(err) == 1, err
  assert err[0].startswith("mt_flax translate: error: no good checkpoint in ")
  assert checkpoint.UNREADABLE_DIR not in os.listdir(workdir)     # inference moves nothing

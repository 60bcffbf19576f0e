"""A real sweep: two tiny trials through the training CLI, killed mid-trial, re-run, resumed."""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

from mt_flax import paths, sweep
from mt_flax.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "experiments", "bible_en_es_tiny.py")
STEPS = 16      # trial 0; trial 1 runs 48
RANK_EXAMPLES = 12   # validation pairs each finished trial is scored on
SETTINGS = [f"--config.num_train_steps={STEPS}", "--config.warmup_steps=4",
            "--config.checkpoint_every_steps=8", "--config.eval_every_steps=8"]
# Same programs in both trials (compiled once); the second runs longer, to be killed midway.
SWEEP = "def get_sweep():\n  return [{'seed': 1}, {'seed': 2, 'num_train_steps': 48}]\n"


def sweep_command(sweep_file: str, sweep_dir: str, flags: list[str]) -> list[str]:
  """The sweep of the experiment file with the ``:test`` variant's settings as flags."""
  return [sys.executable, "-m", "mt_flax", "sweep", CONFIG, sweep_file, "--workdir", sweep_dir,
          "--rank-examples", str(RANK_EXAMPLES), *flags, *SETTINGS]


def one_device_env() -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = os.environ["MT_FLAX_TEST_XLA_FLAGS"]  # one CPU device
  env.update(PYTHONPATH=ROOT)
  return env


def wait_for(predicate, proc: subprocess.Popen, timeout_s: float, what: str) -> None:
  deadline = time.time() + timeout_s
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"sweep exited (rc={proc.returncode}) before {what}")
    if time.time() > deadline:
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.2)


def train_steps(workdir: str) -> list[int]:
  rows = read_metrics(workdir)
  return [r["step"] for r in rows if "loss" in r and r.get("split") is None]


def test_killed_sweep_skips_finished_trials_and_resumes_the_interrupted_one(tmp_path,
                                                                          variant_flags,
                                                                          tiny_training):
  sweep_file = tmp_path / "two.py"
  sweep_file.write_text(SWEEP)
  sweep_dir = tmp_path / "sw"
  names = [sweep.trial_name(i, t) for i, t in enumerate(sweep.load_sweep(str(sweep_file)))]
  second = sweep_dir / names[1]
  for name in names:        # the trials find the session's tokenizer instead of training one
    tiny_training.new_workdir(sweep_dir, name)
  log = open(tmp_path / "first.log", "w")
  command = sweep_command(str(sweep_file), str(sweep_dir), variant_flags)
  proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                          env=one_device_env(), cwd=ROOT,
                          start_new_session=True)
  try:
    # Trial 0 runs to the end; kill everything once trial 1 is past its first checkpoint.
    wait_for(lambda: os.path.isdir(second / "checkpoints" / "8") and
             max(train_steps(second), default=0) >= 12, proc, 240, "trial 1's checkpoint")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
    log.close()
  assert os.path.exists(sweep_dir / names[0] / "DONE") and not os.path.exists(second / "DONE")

  rerun = subprocess.run(command, capture_output=True, text=True,
                         env=one_device_env(), cwd=ROOT, timeout=240)
  out = rerun.stdout + rerun.stderr
  assert rerun.returncode == 0, out[-3000:]
  assert f"{names[0]}: finished at step {STEPS}, skipped" in out
  assert f"{names[1]}: resuming" in out
  resumed = re.search(r"resumed from checkpoint step (\d+)", out)
  assert resumed and 8 <= int(resumed.group(1)) < 48, out[-3000:]

  steps = train_steps(second)  # every logged step once, up to the end: continued, not restarted
  assert steps == sorted(set(steps)) and steps[-1] == 48 and steps[0] == 1
  attempts = json.loads((second / paths.TRIAL_FILE).read_text())["attempts"]
  assert len(attempts) == 2 and attempts[0]["end"] is None and attempts[1]["rc"] == 0
  for name in names:      # scored by eval --split validation on RANK_EXAMPLES pairs
    report = json.loads((sweep_dir / name / "eval" / "validation" / "report.json").read_text())
    assert report["table"][0]["examples"] == RANK_EXAMPLES and report["split"] == "validation"
  rows = list(csv.DictReader(open(sweep_dir / "results.csv")))
  assert [r["status"] for r in rows] == ["finished", "finished"]
  assert all(r["val_bleu"] != "" and r["val_pairs"] == str(RANK_EXAMPLES) for r in rows)
  bleus = [float(r["val_bleu"]) for r in rows]
  assert bleus == sorted(bleus, reverse=True)
  # the killed attempt counts once: up to the second attempt's start at the latest
  wall = {r["trial"]: float(r["wall_s"]) for r in rows}
  assert wall[names[1]] <= attempts[1]["end"] - attempts[0]["start"] + 1
  assert "| rank | trial |" in out and names[0] in out and names[1] in out

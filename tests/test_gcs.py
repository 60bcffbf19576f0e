"""A run whose workdir is on ``gs://`` (a local GCS emulator): train, SIGTERM, resume, then
eval, translate and audit read the workdir; every file goes through mt_flax.paths.

The command lines run in subprocesses that only see ``STORAGE_EMULATOR_HOST``:
``TENSORSTORE_GCS_HTTP_URL`` (for the Orbax checkpoints) is derived by mt_flax.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from etils import epath

from mt_flax.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "bible_en_es_tiny.py")
STEPS = 30
RUN = dict(warmup_steps=4, num_train_steps=STEPS, eval_every_steps=15, checkpoint_every_steps=2,
           progress_bar=False)


def train_until_sigterm(gcs, args: list[str], workdir: str, after_step: int) -> int:
  """Starts training, sends SIGTERM once ``after_step`` is logged; returns the exit status."""
  log = open(os.devnull, "w")
  proc = subprocess.Popen([sys.executable, "-m", "mt_flax", "train", "--workdir", workdir, *args],
                          env=gcs.env(), cwd=ROOT, stdout=log, stderr=log)
  try:
    deadline = time.time() + 900
    while proc.poll() is None and time.time() < deadline:
      if any(r.get("step", 0) >= after_step for r in read_metrics(workdir)):
        proc.send_signal(signal.SIGTERM)
        break
      time.sleep(0.5)
    return proc.wait(timeout=600)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    log.close()


@pytest.mark.slow
def test_train_resume_eval_translate_audit_on_gcs(gcs_emulator, tiny_training, tmp_path):
  args = ["--config", CONFIG, *tiny_training.overrides(**RUN)]
  losses, mt_flax = tiny_training.losses, gcs_emulator.run
  workdir = gcs_emulator.path("run")
  local = str(tmp_path / "local")
  done = mt_flax("train", "--workdir", local, *args)
  assert done.returncode == 0, done.stderr[-3000:]

  # metrics.jsonl is rewritten every 30 s on GCS, so SIGTERM lands after a few steps
  status = train_until_sigterm(gcs_emulator, args, workdir, after_step=1)
  assert status == 143
  root = epath.Path(workdir)
  assert not (root / "DONE").exists()
  stopped = max(losses(workdir))
  assert stopped < STEPS
  resumed = mt_flax("train", "--workdir", workdir, *args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from checkpoint" in resumed.stderr
  got, want = losses(workdir), losses(local)
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=1e-5)
  for name in ("config.json", "run.json", "DONE", "tokenizer/tokenizer.json"):
    assert (root / name).exists(), name
  assert any(p.name.startswith("events.out.tfevents") for p in (root / "tensorboard").iterdir())

  ev = mt_flax("eval", "--workdir", workdir, "--split", "validation", "--beam", "1",
               "--max-examples", "8", "--long-examples", "0")
  assert ev.returncode == 0, ev.stderr[-3000:]
  out = root / "eval" / "validation"
  report = json.loads((out / "report.json").read_text())
  assert report["table"][0]["examples"] == 8
  assert len((out / "validation.hyp.txt").read_text().splitlines()) == 8
  assert (out / "report.md").exists()
  assert (out / "bleu_by_slice.png").read_bytes()[:4] == b"\x89PNG"

  tr = mt_flax("translate", "--workdir", workdir, "--beam", "1",
               stdin="In the beginning God created the heavens and the earth.\nAnd God said.\n")
  assert tr.returncode == 0, tr.stderr[-3000:]
  assert len(tr.stdout.splitlines()) == 2

  au = mt_flax("audit", "--workdir", workdir)
  assert au.returncode == 0, au.stderr[-3000:] + au.stdout[-3000:]

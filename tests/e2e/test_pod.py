"""An emulated TPU pod: 2 processes x 4 CPU devices on loopback, workdir on a GCS emulator.

This is what ``./launch.sh tpu run ... -- train --workdir gs://...`` does on a pod
(every host runs the same command, JAX connects them, all write one gs://
checkpoint). With ``jit`` (a data x fsdp x tensor mesh) both processes are SIGKILLed
after a checkpoint, as a preempted VM: the dead run's ``train.lock`` stays and the
restart takes it over once its heartbeat has not advanced for the bound, shortened to
3 s here; the same command resumes. With ``pmap`` the pod runs once. Either way the
per-step losses, validation losses and BLEU equal one run on the 8 devices of this
process (whose workdir is on gs:// too for the jit mesh). Then ``eval``, ``translate``
and ``audit`` read the gs:// workdir, in this process. The subprocesses only see
``STORAGE_EMULATOR_HOST``: ``TENSORSTORE_GCS_HTTP_URL`` (for Orbax) is derived by
mt_flax, and every other file goes through mt_flax.paths. Processes agreeing on a
SIGTERM at a sync point, saving and exiting 143 is ``test_slurm_job.py``'s (SLURM's
time-limit signal).
"""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
from etils import epath

from mt_flax import train, workdir_lock
from mt_flax.commands import audit, evaluate, translate
from mt_flax.config import load_config

from mt_flax.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "experiments", "bible_en_es_tiny.py") + ":test"
STEPS = 12
# the processes agree on a stop signal every 3 steps (between those, no host-level collective)
SETTINGS = dict(warmup_steps=4, num_train_steps=STEPS, eval_every_steps=6,
                checkpoint_every_steps=4, sync_every_steps=3)
MODES = {"jit_data_fsdp_tensor": {"parallelism": "jit", "mesh.data": 2, "mesh.fsdp": 2,
                                  "mesh.tensor": 2},
         "pmap": {"parallelism": "pmap", "model.dropout_rate": 0.0}}


def overrides(mode: str) -> list[str]:
  return [f"--config.{key}={value}" for key, value in {**SETTINGS, **MODES[mode]}.items()]


def gcs_has(gcs, path: str) -> bool:
  """Whether object ``gs://BUCKET/path`` exists (asked of the emulator directly, no cache)."""
  url = f"{gcs.url}/storage/v1/b/{gcs.bucket}/o/{urllib.parse.quote(path, safe='')}"
  try:
    urllib.request.urlopen(url, timeout=30).read()
    return True
  except urllib.error.HTTPError as e:
    if e.code == 404:
      return False
    raise


def pod_train(gcs, pod_env, argv: list[str], workdir: str, log_dir, name: str,
              kill_after: int | None) -> list[int]:
  """Runs ``train`` as 2 processes x 4 devices; SIGKILLs both once checkpoint ``kill_after``
  of the gs:// workdir is committed. Returns both exit statuses.
  """
  env = dict(pod_env(2, 4), **{workdir_lock.HEARTBEAT_ENV: "1"})
  logs = [open(log_dir / f"{name}_{kill_after}_{i}.log", "w") for i in range(2)]
  procs = [subprocess.Popen([sys.executable, "-m", "mt_flax", "train", "--workdir", workdir,
                             *argv], env=dict(env, MT_FLAX_PROCESS_ID=str(i)), cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
           for i, log in enumerate(logs)]
  try:
    deadline = time.time() + 900
    committed = (workdir.removeprefix(f"gs://{gcs.bucket}/")
                 + f"/checkpoints/{kill_after}/commit_success.txt")
    while kill_after and time.time() < deadline and all(p.poll() is None for p in procs):
      if gcs_has(gcs, committed):
        for p in procs:
          p.kill()
        break
      time.sleep(0.2)
    return [p.wait(timeout=900) for p in procs]
  finally:
    for p, log in zip(procs, logs):
      if p.poll() is None:
        p.kill()
        p.wait()
      log.close()


@pytest.mark.parametrize("mode", list(MODES))
def test_emulated_pod_resumes_on_gcs_like_one_process(gcs_emulator, pod_env, tiny_training,
                                                       tmp_path, mode, call_main, capsys):
  argv, losses = ["--config", CONFIG, *overrides(mode)], tiny_training.losses
  on_gcs = mode == "jit_data_fsdp_tensor"     # the other reads the gs:// workdir after training
  bucket = gcs_emulator.path("")      # every workdir starts with the session's tokenizer
  single = tiny_training.new_workdir(bucket if on_gcs else tmp_path, f"single_{mode}")
  one = train.train_and_evaluate(load_config(CONFIG, overrides(mode)), single)
  assert one["step"] == STEPS

  workdir = tiny_training.new_workdir(bucket, f"pod_{mode}")
  root = epath.Path(workdir)
  log = lambda: "\n".join(p.read_text()[-2000:] for p in sorted(tmp_path.glob("*.log")))
  if on_gcs:     # killed after checkpoint 4, then resumed
    status = pod_train(gcs_emulator, pod_env, argv, workdir, tmp_path, mode, kill_after=4)
    assert status == [-signal.SIGKILL] * 2, log()
    assert not (root / "DONE").exists()
    assert max(losses(workdir)) < STEPS
  assert pod_train(gcs_emulator, pod_env, argv, workdir, tmp_path, mode,
                   kill_after=None) == [0, 0], log()
  if on_gcs:     # the killed run's lock: watched for the bound (3 s), then taken over
    resumed = (tmp_path / f"{mode}_None_0.log").read_text()
    assert "resumed from checkpoint" in resumed
    assert resumed.count("is locked by another run") == 1, resumed[-3000:]
    assert "waiting up to 3s" in resumed and "did not advance for 3s; taking its lock over" in resumed
  got, want = losses(workdir), losses(single)
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=1e-4)
  # validation sums span every device of both processes (a per-process reduction differs)
  evals = lambda w: {r["step"]: r["eval_loss"] for r in read_metrics(w) if "eval_loss" in r}
  assert sorted(evals(workdir)) == [6, 12]
  np.testing.assert_allclose([evals(workdir)[s] for s in (6, 12)],
                             [evals(single)[s] for s in (6, 12)], rtol=1e-4)
  # BLEU and chrF of validation: decoded over the devices of both processes (jit), or by each
  # process on its own copy of the params (pmap)
  scores = lambda w: [(r["bleu"], r["chrf"]) for r in read_metrics(w) if "chrf" in r]
  assert scores(workdir) == scores(single) and len(scores(workdir)) == 2
  for name in ("config.json", "run.json", "DONE", "tokenizer/tokenizer.json"):
    assert (root / name).exists(), name
  assert any(p.name.startswith("events.out.tfevents") for p in (root / "tensorboard").iterdir())
  if not on_gcs:
    return

  code = call_main(evaluate.main, ["--workdir", workdir, "--split", "validation", "--beam", "1",
                                   "--max-examples", "8", "--long-examples", "0"])
  assert code == 0, capsys.readouterr().err[-3000:]
  out = root / "eval" / "validation"
  report = json.loads((out / "report.json").read_text())
  assert report["table"][0]["examples"] == 8
  assert len((out / "validation.hyp.txt").read_text().splitlines()) == 8
  assert (out / "report.md").exists()
  assert (out / "bleu_by_slice.png").read_bytes()[:4] == b"\x89PNG"
  capsys.readouterr()
  code = call_main(translate.main, ["--workdir", workdir, "--beam", "1"],
                   b"In the beginning God created the heavens and the earth.\nAnd God said.\n")
  out, err = capsys.readouterr()
  assert code == 0 and len(out.splitlines()) == 2, err[-3000:]
  code = call_main(audit.main, ["--workdir", workdir, "--batches", "1", "--rows", "2"])
  out, err = capsys.readouterr()
  assert code == 0, err[-3000:] + out[-3000:]

"""Fixtures of the end-to-end tier.

  ``gcs_emulator``    a GCS emulator on 127.0.0.1 (tools/gcs_emulator.py) for gs:// workdirs
  ``pod_env``         ``(processes, devices) -> environment`` of an emulated pod's processes
  ``run_pod``         ``python -m mt_flax ...`` on an emulated pod: each process's status and output
"""
import dataclasses
import itertools
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class GcsEmulator:
  """A running emulator: ``url`` (``$STORAGE_EMULATOR_HOST``) and a ``bucket`` that exists."""
  url: str
  bucket: str

  def path(self, name: str) -> str:
    """``gs://BUCKET/name``."""
    return f"gs://{self.bucket}/{name}"

  @staticmethod
  def env(devices: int = 1) -> dict:
    """Environment of ``mt_flax`` subprocesses: they see ``STORAGE_EMULATOR_HOST`` only
    (mt_flax derives ``TENSORSTORE_GCS_HTTP_URL`` itself) and ``devices`` CPU devices."""
    from mt_flax import paths
    env = {k: v for k, v in os.environ.items() if k != paths.TENSORSTORE_GCS_ENV}
    env.update(PYTHONPATH=str(ROOT), XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
               + os.environ["MT_FLAX_TEST_XLA_FLAGS"])
    return env


@pytest.fixture(scope="session")
def gcs_emulator():
  """gcp-storage-emulator (tools/gcs_emulator.py, in memory) on 127.0.0.1 for the session.

  Sets ``STORAGE_EMULATOR_HOST`` (gcsfs, and through mt_flax.paths tensorstore)
  for this process and its subprocesses; restores the environment afterwards.
  """
  pytest.importorskip("gcp_storage_emulator", reason="needs gcp-storage-emulator (test extra)")
  import portpicker
  port = portpicker.pick_unused_port()
  url, bucket = f"http://127.0.0.1:{port}", "mt-flax-test"
  script = str(ROOT / "tools" / "gcs_emulator.py")
  proc = subprocess.Popen([sys.executable, script, str(port), bucket],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
  try:
    deadline = time.time() + 120
    while True:
      try:
        urllib.request.urlopen(url + "/", timeout=5).read()
        break
      except OSError:
        if proc.poll() is not None or time.time() > deadline:
          raise RuntimeError(f"the GCS emulator did not start on {url}") from None
        time.sleep(0.2)
    os.environ["STORAGE_EMULATOR_HOST"] = url
    os.environ.pop("TENSORSTORE_GCS_HTTP_URL", None)
    from mt_flax import paths
    paths.use_gcs_emulator_for_tensorstore()
    yield GcsEmulator(url, bucket)
  finally:
    proc.kill()
    proc.wait()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


@pytest.fixture(scope="session")
def pod_env():
  """``env(processes, devices) -> dict``: the environment of the processes of one emulated pod,
  ``devices`` CPU devices each, joined through a free port on loopback (add
  ``MT_FLAX_PROCESS_ID``)."""
  import portpicker

  def env(processes: int, devices: int) -> dict:
    return dict(GcsEmulator.env(devices), JAX_PLATFORMS="cpu", MT_FLAX_NUM_PROCESSES=str(processes),
                MT_FLAX_COORDINATOR=f"127.0.0.1:{portpicker.pick_unused_port()}")
  return env


@pytest.fixture
def run_pod(pod_env, tmp_path):
  """``run(argv, stdin=b"", processes=2, devices=2) -> [(status, stdout, stderr)]``: every
  process of an emulated pod runs ``python -m mt_flax ARGV``, as every host of a pod runs a
  command, with ``stdin`` (or ``stdin[i]`` for process i); their output goes through files
  (a pipe can fill)."""
  runs = itertools.count()

  def run(argv, stdin=b"", processes: int = 2, devices: int = 2) -> list:
    env, folder = pod_env(processes, devices), tmp_path / f"pod_{next(runs)}"
    folder.mkdir()
    for i in range(processes):
      (folder / f"{i}.in").write_bytes(stdin[i] if isinstance(stdin, list) else stdin)
    files = [[open(folder / f"{i}.{name}", "rb" if name == "in" else "wb")
              for name in ("in", "out", "err")] for i in range(processes)]
    procs = [subprocess.Popen([sys.executable, "-m", "mt_flax", *argv], cwd=ROOT,
                              env=dict(env, MT_FLAX_PROCESS_ID=str(i)), stdin=f[0], stdout=f[1],
                              stderr=f[2]) for i, f in enumerate(files)]
    try:
      status = [p.wait(timeout=600) for p in procs]
    finally:
      for p, f in zip(procs, files):      # never leave a straggler behind
        if p.poll() is None:
          p.kill()
          p.wait()
        for handle in f:
          handle.close()
    return [(code, (folder / f"{i}.out").read_text(), (folder / f"{i}.err").read_text())
            for i, code in enumerate(status)]
  return run

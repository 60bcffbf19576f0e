"""Fixtures of the end-to-end tier.

  ``gcs_emulator``    a GCS emulator on 127.0.0.1 (tools/gcs_emulator.py) for gs:// workdirs
"""
import dataclasses
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

"""Test set-up: 8 simulated CPU devices, set before JAX is imported anywhere."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


# ----------------------------------------------------------------------------- GCS emulator

import dataclasses as _dataclasses  # noqa: E402
import subprocess as _subprocess  # noqa: E402
import sys as _sys  # noqa: E402
import time as _time  # noqa: E402
import urllib.request as _urlrequest  # noqa: E402

import pytest as _pytest  # noqa: E402


@_dataclasses.dataclass(frozen=True)
class GcsEmulator:
  """A running emulator: ``url`` (``$STORAGE_EMULATOR_HOST``) and a ``bucket`` that exists."""
  url: str
  bucket: str

  def path(self, name: str) -> str:
    """``gs://BUCKET/name``."""
    return f"gs://{self.bucket}/{name}"


@_pytest.fixture(scope="session")
def gcs_emulator():
  """gcp-storage-emulator (tests/gcs_emulator.py, in memory) on 127.0.0.1 for the session.

  Sets ``STORAGE_EMULATOR_HOST`` (gcsfs, and through mt_flax.paths tensorstore)
  for this process and its subprocesses; restores the environment afterwards.
  """
  _pytest.importorskip("gcp_storage_emulator", reason="needs gcp-storage-emulator (test extra)")
  import portpicker
  port = portpicker.pick_unused_port()
  url, bucket = f"http://127.0.0.1:{port}", "mt-flax-test"
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcs_emulator.py")
  proc = _subprocess.Popen([_sys.executable, script, str(port), bucket],
                           stdout=_subprocess.DEVNULL, stderr=_subprocess.DEVNULL)
  saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
  try:
    deadline = _time.time() + 120
    while True:
      try:
        _urlrequest.urlopen(url + "/", timeout=5).read()
        break
      except OSError:
        if proc.poll() is not None or _time.time() > deadline:
          raise RuntimeError(f"the GCS emulator did not start on {url}") from None
        _time.sleep(0.2)
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

"""One run per workdir: ``train`` holds ``WORKDIR/train.lock`` while it runs.

- Local workdir: an OS lock (``fcntl.flock``) on the file, held by the process;
  the kernel frees it when the process ends, killed or not, so a local lock is
  never stale. The file records the holder (host, pid, start time).
- ``gs://`` workdir: the lock object is created with a generation precondition
  ("only if absent", through TensorStore's ``gcs`` key-value store) and its
  heartbeat time is rewritten every ``HEARTBEAT_S`` seconds, again conditionally.
  A lock whose heartbeat is older than ``STALE_S`` seconds belongs to a run that
  died; the next run takes it over (conditionally, so only one can).

A run that finds the lock held stops with :class:`WorkdirBusy`, one line naming
the workdir, the holder and how to clear a stale lock.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from typing import Any, Iterator, Optional

from etils import epath

from mt_flax.errors import WorkdirBusy
from mt_flax.paths import LOCK_FILE

HEARTBEAT_S = 60.0
STALE_S = 600.0


def _holder_info() -> dict[str, Any]:
  return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
          "heartbeat": time.time()}


def _describe(holder: dict[str, Any]) -> str:
  started = holder.get("started")
  since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if started else "?"
  return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {since}"


def _parse(raw: bytes) -> dict[str, Any]:
  try:
    holder = json.loads(raw.decode() or "{}")
    return holder if isinstance(holder, dict) else {}
  except (UnicodeDecodeError, json.JSONDecodeError):
    return {}


class LocalLock:
  """An exclusive ``flock`` on ``path`` for the life of this object (or of the process)."""

  def __init__(self, path: str):
    self.path = path
    self._fd: Optional[int] = None

  def acquire(self, workdir: str) -> None:
    import fcntl
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _parse(os.pread(fd, 4096, 0))
      os.close(fd)
      raise WorkdirBusy(
          f"workdir {workdir} is in use by another run ({_describe(holder)}); wait for it to "
          f"finish or stop it (`kill {holder.get('pid', 'PID')}` on {holder.get('host', 'its host')})"
          "; a local lock is freed when its process ends, so there is nothing stale to clear"
      ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_holder_info()).encode(), 0)
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)   # closing the descriptor drops the flock
      self._fd = None


class GenerationLock:
  """A lock object in a TensorStore key-value store, written only if its generation matches.

  ``spec``: a TensorStore kvstore spec (``{"driver": "gcs", "bucket": ..., "path": ...}``
  for gs://; the ``file`` driver behaves the same and is what the tests use).
  """

  def __init__(self, spec: dict, key: str = LOCK_FILE, *, heartbeat_s: float = HEARTBEAT_S,
               stale_s: float = STALE_S):
    import tensorstore as ts
    self._store = ts.KvStore.open(spec).result()
    self.key, self.heartbeat_s, self.stale_s = key, heartbeat_s, stale_s
    self._generation: Optional[bytes] = None
    self._info: dict[str, Any] = {}
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    self.lost = False

  def acquire(self, workdir: str) -> None:
    current = self._store.read(self.key).result()
    if current.state == "value":
      holder = _parse(current.value)
      age = time.time() - float(holder.get("heartbeat", 0))
      if age <= self.stale_s:
        raise WorkdirBusy(
            f"workdir {workdir} is in use by another run ({_describe(holder)}, heartbeat "
            f"{age:.0f}s ago); wait for it, or if that run is gone, wait {self.stale_s:.0f}s "
            f"for its lock to go stale or delete {workdir}/{self.key}")
    self._info = _holder_info()
    written = self._store.write(self.key, json.dumps(self._info).encode(),
                                if_equal=current.stamp.generation).result()
    if not written.generation:      # another run wrote first
      raise WorkdirBusy(f"workdir {workdir} was just locked by another run; "
                        f"see {workdir}/{self.key}")
    self._generation = written.generation
    self._thread = threading.Thread(target=self._beat, name="workdir_lock", daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      self._info["heartbeat"] = time.time()
      written = self._store.write(self.key, json.dumps(self._info).encode(),
                                  if_equal=self._generation).result()
      if not written.generation:    # taken over: this run no longer holds the workdir
        self.lost = True
        return
      self._generation = written.generation

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self._generation is not None and not self.lost:
      self._store.write(self.key, None, if_equal=self._generation).result()
    self._generation = None


def gcs_spec(workdir: str) -> dict:
  """TensorStore kvstore spec of a ``gs://bucket/path`` folder."""
  bucket, _, path = workdir[len("gs://"):].partition("/")
  return {"driver": "gcs", "bucket": bucket, "path": path.rstrip("/") + "/" if path else ""}


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[Any]:
  """Locks ``workdir`` (created if missing) for the ``with`` block.

  Raises:
    WorkdirBusy: another run holds it.
  """
  if str(workdir).startswith("gs://"):
    lock: Any = GenerationLock(gcs_spec(str(workdir)))
  else:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    lock = LocalLock(os.path.join(os.fspath(workdir), LOCK_FILE))
  lock.acquire(str(workdir))
  try:
    yield lock
  finally:
    lock.release()

"""One run per workdir: ``train`` holds ``WORKDIR/train.lock`` while it runs.

- Local workdir: an OS lock (``fcntl.flock``) on the file, held by the process;
  the kernel frees it when the process ends, killed or not, so a local lock is
  never stale. The file records the holder (host, pid, start time).
- ``gs://`` workdir: the lock object is created with a generation precondition
  ("only if absent", through TensorStore's ``gcs`` key-value store) and rewritten
  every ``HEARTBEAT_S`` seconds, again conditionally, so each heartbeat gives it a
  new generation. A run that finds the object waits (one line says whose it is and
  for how long at most): if the generation changes, the holder is alive and this
  run stops with :class:`WorkdirBusy`; if it stays the same for ``STALE_S`` seconds
  of this run's own clock, the holder is gone (killed, preempted) and this run
  takes the lock over, conditionally on that generation, so only one run can and
  the hosts' clocks never have to agree. A restarted run therefore gets through
  after at most ``STALE_S`` seconds.

``HEARTBEAT_S`` = 20 and ``STALE_S`` = 3 periods: a lock needs three missed
heartbeats before it is taken, so a holder rides out a slow or failed write
(retried with backoff), while a restart waits at most a minute, which is short
next to a VM's restart. ``$MT_FLAX_LOCK_HEARTBEAT_S`` sets another period (the
bound follows it). A holder whose heartbeat was taken over (its conditional
write fails, the object is someone else's), or could not be written for
``STALE_S - HEARTBEAT_S`` seconds (one period before another run may take it),
sets ``lost``; training stops at the next step without saving.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable, Iterator, Optional

from etils import epath

from mt_flax.errors import ConfigError, WorkdirBusy, WorkdirLost
from mt_flax.paths import LOCK_FILE

HEARTBEAT_S = 20.0
STALE_PERIODS = 3
STALE_S = STALE_PERIODS * HEARTBEAT_S
HEARTBEAT_ENV = "MT_FLAX_LOCK_HEARTBEAT_S"

_log = logging.getLogger(__name__)


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


def _number(value: Any) -> float:
  try:
    return float(value)
  except (TypeError, ValueError):
    return 0.0


class LocalLock:
  """An exclusive ``flock`` on ``path`` for the life of this object (or of the process)."""
  lost, lost_reason = False, ""     # the kernel's lock cannot be taken over

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
  for gs://; the ``file`` driver behaves the same). ``clock`` (seconds, monotonic) and
  ``sleep`` measure the wait for a holder and the backoff of failed heartbeats; tests
  inject both. :meth:`beat` is one heartbeat; a thread calls it every ``heartbeat_s``.
  ``lost`` (and ``lost_reason``) say that this run no longer holds the lock.
  """

  def __init__(self, spec: dict, key: str = LOCK_FILE, *, heartbeat_s: float = HEARTBEAT_S,
               stale_s: float = STALE_S, clock: Callable[[], float] = time.monotonic,
               sleep: Optional[Callable[[float], Any]] = None):
    import tensorstore as ts
    self._store = ts.KvStore.open(spec).result()
    self.key, self.heartbeat_s, self.stale_s = key, heartbeat_s, stale_s
    self._clock = clock
    self._stop = threading.Event()
    self._sleep = sleep or self._stop.wait    # backoff ends early when released
    self._generation: Optional[bytes] = None
    self._info: dict[str, Any] = {}
    self._renewed = 0.0                       # clock() after the last heartbeat written
    self._thread: Optional[threading.Thread] = None
    self._workdir = ""
    self.lost, self.lost_reason = False, ""

  # -------------------------------------------------------------------------- taking it

  def acquire(self, workdir: str, *, start_heartbeat: bool = True) -> None:
    """Takes the lock: at once if it is free, after :meth:`_wait_out` if it is held.

    Raises:
      WorkdirBusy: the holder's heartbeat advanced, or another run took it first.
    """
    self._workdir = workdir
    current = self._store.read(self.key).result()
    if current.state == "value":
      current = self._wait_out(workdir, current)
    self._info = {**_holder_info(), "token": uuid.uuid4().hex,
                  "heartbeat_s": self.heartbeat_s, "stale_s": self.stale_s}
    written = self._store.write(self.key, json.dumps(self._info).encode(),
                                if_equal=current.stamp.generation).result()
    if not written.generation:      # another run wrote first
      raise WorkdirBusy(f"workdir {workdir} was just locked by another run; "
                        f"see {workdir}/{self.key}")
    self._generation, self._renewed = written.generation, self._clock()
    if start_heartbeat:
      self._thread = threading.Thread(target=self._beat_loop, name="workdir_lock", daemon=True)
      self._thread.start()

  def _wait_out(self, workdir: str, current: Any) -> Any:
    """Watches a held lock object for up to the stale bound; returns the read to overwrite
    (``current`` if its generation never changed, a missing one if it was released)."""
    holder = _parse(current.value)
    bound = max(self.stale_s, _number(holder.get("stale_s")))   # the holder's own, if longer
    _log.warning(f"workdir {workdir} is locked by another run ({_describe(holder)}); waiting up "
                 f"to {bound:.0f}s: taking it over if its heartbeat does not advance, else "
                 "stopping")
    start, poll = self._clock(), self.heartbeat_s / 4
    while (waited := self._clock() - start) < bound:
      self._sleep(min(poll, bound - waited))
      try:
        now = self._store.read(self.key).result()
      except Exception:  # pylint: disable=broad-except  (the conditional write decides)
        continue
      if now.state != "value":
        return now                  # released meanwhile: take it as a free lock
      if now.stamp.generation != current.stamp.generation:
        raise WorkdirBusy(
            f"workdir {workdir} is in use by another run ({_describe(_parse(now.value))}; its "
            f"heartbeat advanced while this run waited {self._clock() - start:.0f}s); wait for "
            f"it to finish or stop it (`kill {holder.get('pid', 'PID')}` on "
            f"{holder.get('host', 'its host')})")
    _log.warning(f"workdir {workdir}: the heartbeat of {_describe(holder)} did not advance for "
                 f"{self._clock() - start:.0f}s; taking its lock over")
    return current

  # -------------------------------------------------------------------------- holding it

  def _beat_loop(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      if not self.beat():
        return

  def beat(self) -> bool:
    """Rewrites the heartbeat, conditionally; returns whether this run still holds the lock.

    A failed write is retried with a growing pause (the first failure is logged once);
    the lock is lost when another run took it over or when no heartbeat was written
    for ``stale_s - heartbeat_s`` seconds.
    """
    give_up, pause, failures = self.stale_s - self.heartbeat_s, self.heartbeat_s / 20, 0
    while not self._stop.is_set():
      self._info["heartbeat"] = time.time()
      try:
        written = self._store.write(self.key, json.dumps(self._info).encode(),
                                    if_equal=self._generation).result()
        if not written.generation and not self._still_mine():
          return False
      except Exception as e:  # pylint: disable=broad-except  (retried, then the lock is lost)
        failures += 1
        if failures == 1:
          _log.warning(f"heartbeat of {self._workdir}/{self.key} failed ({e}); retrying")
        if self._clock() - self._renewed >= give_up:
          return self._lose(f"its heartbeat could not be written for "
                            f"{self._clock() - self._renewed:.0f}s (last error: {e})")
        self._sleep(min(pause, max(give_up - (self._clock() - self._renewed), 0.0)))
        pause = min(2 * pause, self.heartbeat_s / 2)
        continue
      if written.generation:
        self._generation, self._renewed = written.generation, self._clock()
        if failures:
          _log.info(f"heartbeat of {self._workdir}/{self.key} written after {failures} "
                    "failed attempt(s)")
        return True
      # else the object holds this run's token: write again on its generation
    return not self.lost

  def _still_mine(self) -> bool:
    """After a failed precondition: a write reported as failed may have landed (then the object
    holds this run's token: adopt its generation); otherwise another run took the lock."""
    current = self._store.read(self.key).result()
    holder = _parse(current.value) if current.state == "value" else {}
    if holder.get("token") == self._info.get("token"):
      self._generation = current.stamp.generation
      return True
    who = f"another run ({_describe(holder)})" if holder else "another run, which released it"
    return self._lose(f"it was taken over by {who}")

  def _lose(self, reason: str) -> bool:
    self.lost_reason, self.lost = reason, True
    _log.info(f"lost the lock of workdir {self._workdir}: {reason}")   # training says why
    return False

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self._generation is not None and not self.lost:
      try:
        self._store.write(self.key, None, if_equal=self._generation).result()
      except Exception as e:  # pylint: disable=broad-except  (it goes stale: the next run waits)
        _log.warning(f"could not remove {self._workdir}/{self.key} ({e}); the next run takes it "
                     f"over after {self.stale_s:.0f}s")
    self._generation = None


def lost_error(workdir: str, reason: str, when: str) -> WorkdirLost:
  """The one-line error of a run that lost its lock; ``when``: the step or the refused save."""
  return WorkdirLost(f"{when}: this run lost the lock of workdir {workdir} "
                     f"({reason or 'process 0 lost it'}); stopped without saving; the run that "
                     "holds it now trains there (do not restart this one)")


def _heartbeat_s() -> float:
  """``$MT_FLAX_LOCK_HEARTBEAT_S``, else ``HEARTBEAT_S``."""
  value = os.environ.get(HEARTBEAT_ENV, "")
  try:
    seconds = float(value or HEARTBEAT_S)
  except ValueError:
    seconds = 0.0
  if not seconds > 0:
    raise ConfigError(f"${HEARTBEAT_ENV}={value!r}: expected a positive number of seconds")
  return seconds


def gcs_spec(workdir: str) -> dict:
  """TensorStore kvstore spec of a ``gs://bucket/path`` folder."""
  bucket, _, path = workdir[len("gs://"):].partition("/")
  return {"driver": "gcs", "bucket": bucket, "path": path.rstrip("/") + "/" if path else ""}


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[Any]:
  """Locks ``workdir`` (created if missing) for the ``with`` block; yields the lock, whose
  ``lost`` says whether another run took it over.

  Raises:
    WorkdirBusy: another run holds it (a gs:// holder whose heartbeat advanced).
  """
  if str(workdir).startswith("gs://"):
    heartbeat = _heartbeat_s()
    lock: Any = GenerationLock(gcs_spec(str(workdir)), heartbeat_s=heartbeat,
                               stale_s=STALE_PERIODS * heartbeat)
  else:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    lock = LocalLock(os.path.join(os.fspath(workdir), LOCK_FILE))
  lock.acquire(str(workdir))
  try:
    yield lock
  finally:
    lock.release()

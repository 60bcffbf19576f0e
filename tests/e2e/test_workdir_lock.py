"""The gs:// workdir lock against the GCS emulator, on an injected clock and with injected
faults: a restart takes over a holder whose heartbeat stopped within the stale bound; a live
holder makes it stop busy; a failed heartbeat is retried and the lock kept, unless the errors
last too long; a holder that was taken over knows it and saves nothing more. A killed pod run
resumed at once on gs:// is in ``tests/e2e/test_pod.py``.
"""
import json
import logging
import os
import types

import pytest

from mt_flax import checkpoint, paths, train, workdir_lock
from mt_flax.config import load_config
from mt_flax.errors import WorkdirBusy, WorkdirLost
from mt_flax.metrics import MetricWriter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "experiments", "bible_en_es_tiny.py") + ":test"
HEARTBEAT_S, STALE_S = 20.0, 60.0


class Clock:
  """Seconds that pass only when the code under test sleeps; ``during_sleep()`` runs after
  each sleep (what the other run does meanwhile)."""

  def __init__(self):
    self.now, self.slept = 0.0, []
    self.during_sleep = lambda: None

  def __call__(self) -> float:
    return self.now

  def sleep(self, seconds: float) -> None:
    self.now += seconds
    self.slept.append(seconds)
    self.during_sleep()


class Faulty:
  """A kvstore whose next ``failures`` writes raise as a GCS error would; with ``landed``
  each of them is written before it raises (the reply was lost, not the write)."""

  def __init__(self, store, failures: int, landed: bool = False):
    self.store, self.failures, self.landed = store, failures, landed

  def read(self, *args, **kwargs):
    return self.store.read(*args, **kwargs)

  def write(self, *args, **kwargs):
    if self.failures:
      self.failures -= 1
      if self.landed:
        self.store.write(*args, **kwargs).result()
      raise ValueError("UNAVAILABLE: injected fault (HTTP 503)")
    return self.store.write(*args, **kwargs)


def new_lock(gcs, name: str, clock: Clock) -> workdir_lock.GenerationLock:
  """A lock of ``gs://BUCKET/name`` on ``clock``; its heartbeats are the test's calls of beat()."""
  return workdir_lock.GenerationLock(workdir_lock.gcs_spec(gcs.path(name)),
                                     heartbeat_s=HEARTBEAT_S, stale_s=STALE_S, clock=clock,
                                     sleep=clock.sleep)


def holder_token(gcs, name: str) -> str:
  return json.loads(paths.as_path(gcs.path(name) + "/" + paths.LOCK_FILE).read_text())["token"]


def lock_messages(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.name == workdir_lock.__name__
          and r.levelno >= logging.WARNING]


def test_restart_takes_over_a_dead_holder_and_the_old_holder_saves_nothing(
    gcs_emulator, tmp_path, caplog):
  name = "lock_dead_holder"
  old_clock, clock = Clock(), Clock()
  old = new_lock(gcs_emulator, name, old_clock)
  old.acquire(gcs_emulator.path(name), start_heartbeat=False)
  old_token = holder_token(gcs_emulator, name)
  # the old run is SIGKILLed: its object stays, with a heartbeat seconds old
  new = new_lock(gcs_emulator, name, clock)
  new.acquire(gcs_emulator.path(name), start_heartbeat=False)
  assert clock.now == STALE_S                   # watched for the bound, not 10 minutes
  assert max(clock.slept) == HEARTBEAT_S / 4    # looked every quarter period
  messages = lock_messages(caplog)
  assert len(messages) == 2, messages
  assert f"waiting up to {STALE_S:.0f}s" in messages[0] and "pid" in messages[0]
  assert "did not advance for 60s; taking its lock over" in messages[1]
  assert holder_token(gcs_emulator, name) != old_token

  # the old holder (had it lived on): its next heartbeat finds the lock taken ...
  assert not old.beat()
  assert old.lost and "taken over by another run (host" in old.lost_reason
  # ... and its next save is refused, nothing written
  config = load_config(CONFIG)
  saves = checkpoint.Checkpointer(str(tmp_path / "old_run"), config,
                                  lambda: old.lost_reason if old.lost else "")
  with pytest.raises(WorkdirLost, match="saving checkpoint step 8 refused: this run lost the lock"):
    saves.save(8, {"x": 1}, None)
  saves.close()
  assert not (tmp_path / "old_run" / "checkpoints" / "8").exists()
  # the train loop stops at its next check, in one line naming the step
  run = types.SimpleNamespace(lost=lambda: old.lost_reason, workdir=gcs_emulator.path(name),
                              checkpoints=saves)
  with pytest.raises(WorkdirLost, match=r"^step 9: this run lost the lock .*do not restart"):
    train._interrupted(run, types.SimpleNamespace(requested=None), 9)
  # ... and it leaves metrics.jsonl (rewritten whole on gs://) to the new holder
  writer = MetricWriter(gcs_emulator.path(name), resume_step=0)
  writer.write(9, {"loss": 1.0})                # written at once, the next one later
  writer.write(10, {"loss": 1.0})
  before = writer.path.read_text() if writer.path.exists() else None
  writer.discard()
  writer.close()
  assert (writer.path.read_text() if writer.path.exists() else None) == before
  old.release()                                 # leaves the new holder's object alone
  assert new.beat() and not new.lost
  new.release()


def test_a_live_holder_makes_the_new_run_stop_busy(gcs_emulator, caplog):
  name = "lock_live_holder"
  holder_clock, clock = Clock(), Clock()
  holder = new_lock(gcs_emulator, name, holder_clock)
  holder.acquire(gcs_emulator.path(name), start_heartbeat=False)
  clock.during_sleep = lambda: clock.now >= HEARTBEAT_S and holder.beat()   # beats on time
  with pytest.raises(WorkdirBusy, match=r"in use by another run .*heartbeat advanced while "
                                        r"this run waited 20s"):
    new_lock(gcs_emulator, name, clock).acquire(gcs_emulator.path(name), start_heartbeat=False)
  assert clock.now == HEARTBEAT_S
  assert holder.beat() and not holder.lost      # the holder keeps it

  # a holder that finishes while the new run waits: the lock is taken at once
  clock = Clock()
  clock.during_sleep = holder.release
  new = new_lock(gcs_emulator, name, clock)
  new.acquire(gcs_emulator.path(name), start_heartbeat=False)
  assert clock.now == HEARTBEAT_S / 4
  new.release()


@pytest.mark.parametrize("landed", [False, True], ids=["failed", "reply_lost"])
def test_a_transient_heartbeat_error_is_retried_and_the_lock_kept(gcs_emulator, caplog, landed):
  name = f"lock_transient_{landed}"
  clock = Clock()
  holder = new_lock(gcs_emulator, name, clock)
  holder.acquire(gcs_emulator.path(name), start_heartbeat=False)
  holder._store = Faulty(holder._store, failures=3, landed=landed)
  assert holder.beat() and not holder.lost
  assert clock.slept == [1.0, 2.0, 4.0]          # a short, growing pause
  messages = lock_messages(caplog)
  assert len(messages) == 1 and "failed (UNAVAILABLE: injected fault" in messages[0], messages
  # it still holds the lock: another run sees the heartbeat advance and stops busy
  other = Clock()
  other.during_sleep = holder.beat
  with pytest.raises(WorkdirBusy):
    new_lock(gcs_emulator, name, other).acquire(gcs_emulator.path(name), start_heartbeat=False)
  holder.release()


def test_heartbeat_errors_that_last_lose_the_lock_before_another_run_may_take_it(
    gcs_emulator, caplog):
  name = "lock_errors_last"
  clock = Clock()
  holder = new_lock(gcs_emulator, name, clock)
  holder.acquire(gcs_emulator.path(name), start_heartbeat=False)
  holder._store = Faulty(holder._store, failures=1000)
  clock.now += HEARTBEAT_S                      # the thread's period, then it beats
  assert not holder.beat()
  assert holder.lost and "could not be written for 40s" in holder.lost_reason
  assert clock.now == STALE_S - HEARTBEAT_S     # a period before another run may take it
  assert len(lock_messages(caplog)) == 1        # logged once, however many attempts
  holder.release()                              # lost: it leaves the object to the next run
  assert holder._store.store.read(paths.LOCK_FILE).result().state == "value"

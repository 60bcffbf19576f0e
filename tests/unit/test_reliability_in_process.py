"""Reliability pieces that run in this process: the gs:// workdir lock object, atomic
writes on a full disk, waiting for a failed Orbax writer, and small inputs (negative
``--max-examples``, CR-only line ends). The command line under real processes, signals
and full disks is in ``tests/e2e/test_reliability.py``.
"""
import errno
import json
import os
import time

import pytest

from mt_flax import checkpoint, paths, workdir_lock
from mt_flax.commands import evaluate as eval_command
from mt_flax.inference import read_lines


def test_generation_lock_conditional_writes(tmp_path):
  """The gs:// lock object on TensorStore's file store: exclusive, heartbeat, stale takeover."""
  spec = {"driver": "file", "path": str(tmp_path / "bucket") + "/"}
  first = workdir_lock.GenerationLock(spec, heartbeat_s=0.05, stale_s=3600)
  first.acquire("gs://b/run")
  second = workdir_lock.GenerationLock(spec, heartbeat_s=0.2, stale_s=3600)   # sees it beat
  with pytest.raises(workdir_lock.WorkdirBusy, match=f"pid {os.getpid()}"):
    second.acquire("gs://b/run")
  path = tmp_path / "bucket" / paths.LOCK_FILE
  beat = json.loads(path.read_text())["heartbeat"]
  deadline = time.time() + 60
  while json.loads(path.read_text())["heartbeat"] == beat and time.time() < deadline:
    time.sleep(0.05)
  assert json.loads(path.read_text())["heartbeat"] > beat     # the holder refreshes it
  first.release()
  assert not path.exists()                                   # released: the object is gone
  # a holder that died: its object does not change while the next run watches it for
  # stale_s (on the next run's clock, here a counter), so that run takes over
  path.write_text(json.dumps({"host": "gone", "pid": 1, "started": 0, "heartbeat": 0}))
  now = [0.0]
  third = workdir_lock.GenerationLock(spec, stale_s=60, clock=lambda: now[0],
                                      sleep=lambda s: now.__setitem__(0, now[0] + s))
  third.acquire("gs://b/run")
  assert now[0] == 60
  assert json.loads(path.read_text())["pid"] == os.getpid()
  # the dead holder's conditional writes now fail: it cannot take the lock back
  third.release()


# ----------------------------------------------------------------------------- full disk


def test_atomic_write_leaves_nothing_on_a_full_disk(small_disk, fill_disk):
  fill_disk(small_disk)
  target = small_disk / "tokenizer.json"
  with pytest.raises(OSError):
    paths.write_bytes(target, b"x" * (1 << 20))
  assert sorted(os.listdir(small_disk)) == ["filler"]


def test_waiting_for_a_failed_orbax_writer_raises_nothing(small_disk, fill_disk):
  """Orbax's writer threads re-raise their own error from ``join``; training waits for them
  on its way out of a failed save, which must keep the save's one-line error (it did not
  when a writer was still running at that moment: the error became the writer's OSError)."""
  import threading
  from orbax.checkpoint._src.futures import future
  fill_disk(small_disk)
  release = threading.Event()

  def write():
    release.wait(timeout=30)
    with open(small_disk / "late_write", "wb") as f:
      f.write(b"x" * (1 << 20))

  writer = future._SignalingThread(target=write, send_signals=[], receive_signals=[])
  writer.start()
  threading.Timer(0.5, release.set).start()
  assert writer.is_alive()                     # still writing when training waits for it
  checkpoint.join_orbax_threads(timeout=30)    # raised the OSError before
  assert not writer.is_alive()
  with pytest.raises(OSError) as raised:       # the writer did fail, on the full disk
    writer.join(timeout=1)
  assert raised.value.errno == errno.ENOSPC


def test_atomic_write_replaces_whole_file(tmp_path):
  target = tmp_path / "report.json"
  target.write_text("old")
  paths.write_text(target, "new")
  assert target.read_text() == "new" and os.listdir(tmp_path) == ["report.json"]


# ----------------------------------------------------------------------------- small inputs


def test_negative_max_examples_is_one_line(tmp_path, capsys):
  code = eval_command.main(["--workdir", str(tmp_path), "--max-examples", "-3"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and err == ["mt_flax eval: error: --max-examples -3: expected an integer >= 0"]


def test_cr_only_line_ends_are_separate_lines():
  assert read_lines(b"one\rtwo\r\nthree\n\rfive\r")[0] == ["one", "two", "three", "", "five"]

"""The input thread (:class:`mt_flax.data.Prefetcher`): order, the source's state carried with
each batch, at most ``depth`` batches ahead, errors raised where the batch would have been,
and ``close()``. A counting source stands in for the Grain iterator."""
import threading
import time

import jax
import numpy as np
import pytest

from mt_flax.data import DataError, Prefetcher
from mt_flax.data.prefetch import _Worker


class Counting:
  """Batches ``{"x": [i]}`` for i = 0, 1, …, ``n - 1``; state ``{"next": i}``; counts calls.

  ``fail_at``: the call that raises a one-line DataError instead; ``gate``: an Event every
  call waits for (to hold the thread inside the source)."""

  def __init__(self, n=100, fail_at=None, gate=None):
    self.i, self.n, self.fail_at, self.gate = 0, n, fail_at, gate
    self.calls, self.threads = 0, set()

  def __iter__(self):
    return self

  def __next__(self):
    self.threads.add(threading.current_thread().name)
    if self.gate is not None:
      self.gate.wait()
    self.calls += 1
    if self.i == self.fail_at:
      raise DataError(f"train.tsv line {self.i}: expected 2 tab-separated fields")
    if self.i >= self.n:
      raise StopIteration
    self.i += 1
    return {"x": np.array([self.i - 1], np.int32)}

  def get_state(self):
    return {"next": self.i}

  def set_state(self, state):
    self.i = state["next"]


def wait_until(predicate, what, timeout=30.0):
  deadline = time.monotonic() + timeout
  while not predicate():
    assert time.monotonic() < deadline, f"no {what} after {timeout}s"
    time.sleep(0.005)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_order_and_state_of_each_batch(depth):
  """Batches in the source's order, each with the state right after it; the end is the end."""
  source = Counting(n=7)
  with Prefetcher(source, depth=depth) as feed:
    assert feed.get_state() == {"next": 0}
    for i in range(7):
      assert int(next(feed)["x"][0]) == i
      assert feed.get_state() == {"next": i + 1}       # not the batches built ahead
    with pytest.raises(StopIteration):
      next(feed)
    with pytest.raises(StopIteration):
      next(feed)
    assert feed.get_state() == {"next": 7}
  assert ("mt_flax-prefetch" in source.threads) == (depth > 0)


def test_at_most_depth_batches_ahead():
  """The thread builds ``depth`` batches ahead of the one last taken, then waits."""
  source = Counting()
  with Prefetcher(source, depth=3) as feed:
    for taken in range(1, 6):
      next(feed)
      wait_until(lambda: feed.buffered == 3, "3 batches ahead")
      # every slot holds a built batch, so the thread cannot call the source again
      assert source.calls == taken + 3
      assert feed.get_state() == {"next": taken}


def test_place_runs_on_the_thread_and_puts_batches_on_a_device():
  source, placed_on = Counting(), set()

  def place(batch):
    placed_on.add(threading.current_thread().name)
    return jax.device_put(batch, jax.devices()[0])

  with Prefetcher(source, place, depth=2) as feed:
    batch = next(feed)
  assert isinstance(batch["x"], jax.Array) and int(batch["x"][0]) == 0
  assert placed_on == {"mt_flax-prefetch"}


@pytest.mark.parametrize("depth", [0, 2])
def test_an_error_in_the_thread_is_raised_unchanged_after_the_batches_before_it(depth):
  source = Counting(fail_at=3)
  with Prefetcher(source, depth=depth) as feed:
    assert [int(next(feed)["x"][0]) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(DataError) as raised:
      next(feed)
    assert str(raised.value) == "train.tsv line 3: expected 2 tab-separated fields"
    assert feed.get_state() == {"next": 3}       # a checkpoint resumes at the bad batch
    with pytest.raises(DataError):
      next(feed)


def test_an_error_in_place_is_raised_in_the_consumer():
  def place(batch):
    raise ValueError("batch of 3 rows does not split over 2 devices")
  with Prefetcher(Counting(), place, depth=2) as feed:
    with pytest.raises(ValueError, match="^batch of 3 rows does not split over 2 devices$"):
      next(feed)


def test_close_stops_the_thread_and_next_continues_after_the_batch_taken():
  """close() ends the thread and drops the batches built ahead; the source is rewound, so
  the next batch is the one after the batch last taken."""
  source = Counting()
  feed = Prefetcher(source, depth=2)
  assert [int(next(feed)["x"][0]) for _ in range(2)] == [0, 1]
  wait_until(lambda: feed.buffered == 2, "2 batches ahead")
  thread = feed._worker.thread
  feed.close()
  assert not thread.is_alive() and feed.buffered == 0
  feed.close()                                    # twice is fine
  assert int(next(feed)["x"][0]) == 2 and feed.get_state() == {"next": 3}
  feed.close()


def test_close_while_the_thread_waits_in_the_source():
  """A thread inside the source finishes that batch, drops it and ends."""
  gate = threading.Event()
  source = Counting(gate=gate)
  worker = _Worker(source, lambda batch: batch, 1, "mt_flax-prefetch")   # one call at most
  wait_until(lambda: "mt_flax-prefetch" in source.threads, "a call from the thread")
  closer = threading.Thread(target=worker.stop, daemon=True)
  closer.start()
  gate.set()
  closer.join(30)
  assert not closer.is_alive() and not worker.thread.is_alive()
  assert source.calls == 1 and worker.ready.empty()


def test_set_state_drops_what_was_built_and_continues_from_the_state():
  source = Counting()
  with Prefetcher(source, depth=2) as feed:
    next(feed)
    next(feed)
    feed.set_state({"next": 10})
    assert feed.get_state() == {"next": 10}
    assert [int(next(feed)["x"][0]) for _ in range(2)] == [10, 11]
    assert feed.get_state() == {"next": 12}


def test_negative_depth_is_refused():
  with pytest.raises(ValueError, match="prefetch depth=-1"):
    Prefetcher(Counting(), depth=-1)

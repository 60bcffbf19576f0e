"""Input ahead of the device: the next batches built and placed by a background thread.

    feed = Prefetcher(train_iter, place=partitioner.shard_batch, depth=2)
    for batch in feed: ...            # place(next(train_iter)), built while the step runs
    feed.get_state()                  # train_iter's state right after the batch last taken
    feed.close()                      # (or ``with Prefetcher(...) as feed:``)

One thread per process takes batches from the source iterator, reads the source's
state after each (so a checkpoint resumes right after the batch the step consumed,
not after those built ahead) and applies ``place`` (e.g. padding and
``device_put``). At most ``depth`` batches are built or being built ahead of the
one last taken, so at most ``depth`` placed batches wait in device memory.
``depth=0`` does the same work on the calling thread when a batch is taken.

``finish``, if given, is applied by ``next()`` on the calling thread (e.g. the copy to
the devices where that must stay in step order: see ``train._batch_placer``).

``place`` must not start a collective over processes: the thread runs it while the
main thread issues the step's, and two threads interleave them in a different order
on each process. Placing this process's rows with ``jax.device_put`` or
``jax.make_array_from_process_local_data`` (given the global shape) copies to its own
devices only.

An error in the thread (a ``DataError`` from a bad file, say) is raised, the same
object with its message unchanged, by the ``next()`` that would have returned that
batch; the batches before it are returned first.
"""
from __future__ import annotations

import copy
import queue
import threading
from typing import Any, Callable, Iterator, Optional

_END = object()            # the source is exhausted
_JOIN_S = 60.0             # longest close() waits for a batch being built


class _Failed:
  def __init__(self, error: BaseException):
    self.error = error


class Prefetcher:
  """Iterator over ``place(next(source))``, up to ``depth`` batches ahead (see module doc).

  ``source`` has ``get_state()``/``set_state(state)`` (a Grain ``DatasetIterator``);
  ``get_state`` and ``set_state`` here are the source's at the batch last taken.
  """

  def __init__(self, source: Any, place: Callable[[Any], Any] = lambda batch: batch,
               depth: int = 2, name: str = "mt_flax-prefetch",
               finish: Callable[[Any], Any] = lambda batch: batch):
    if int(depth) < 0:
      raise ValueError(f"prefetch depth={depth}: expected 0 (off) or more batches")
    self._source, self._place, self.depth, self._name = source, place, int(depth), name
    self._finish = finish          # applied by next(), on the calling thread
    self._state = copy.deepcopy(source.get_state())
    self._worker: Optional[_Worker] = None
    self._finished: Any = None     # _END or _Failed once handed over
    self._rewind = False           # the source went past the batch last taken (closed)

  # --------------------------------------------------------------------------- iterator

  def __iter__(self) -> Iterator[Any]:
    return self

  def __next__(self) -> Any:
    if self._finished is not None:
      return self._raise(self._finished)
    if self._rewind:
      self._source.set_state(copy.deepcopy(self._state))
      self._rewind = False
    if self.depth == 0:
      try:
        batch = next(self._source)
      except StopIteration:
        self._finished = _END
        raise
      self._state = copy.deepcopy(self._source.get_state())
      return self._finish(self._place(batch))
    if self._worker is None:
      self._worker = _Worker(self._source, self._place, self.depth, self._name)
    item = self._worker.take()
    if item is _END or isinstance(item, _Failed):
      self._finished = item
      return self._raise(item)
    batch, self._state = item
    return self._finish(batch)

  @staticmethod
  def _raise(finished: Any):
    if finished is _END:
      raise StopIteration
    raise finished.error

  @property
  def buffered(self) -> int:
    """Batches built and waiting to be taken."""
    return 0 if self._worker is None else self._worker.ready.qsize()

  # --------------------------------------------------------------------------- state

  def get_state(self) -> Any:
    """The source's state right after the batch last taken (a copy)."""
    return copy.deepcopy(self._state)

  def set_state(self, state: Any) -> None:
    """Drops the batches built ahead; the next batch is the source's from ``state``."""
    self.close()
    self._state, self._finished, self._rewind = copy.deepcopy(state), None, True

  def close(self) -> None:
    """Stops the thread and drops the batches built ahead (their device memory with them).

    Safe to call more than once; a later ``next()`` continues after the batch last taken.
    """
    worker, self._worker = self._worker, None
    if worker is not None:
      worker.stop()
      self._rewind = self._finished is None

  def __enter__(self) -> "Prefetcher":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class _Worker:
  """One background thread and what it shares with the consumer: ``slots`` (batches it may
  still build ahead), ``ready`` (batches built, in order, with the source's state after
  each; then the end or the error) and ``stopping``."""

  def __init__(self, source: Any, place: Callable[[Any], Any], depth: int, name: str):
    self.source, self.place = source, place
    self.slots, self.ready, self.stopping = threading.Semaphore(depth), queue.Queue(), \
        threading.Event()
    self.thread = threading.Thread(target=self._produce, name=name, daemon=True)
    self.thread.start()

  def _produce(self) -> None:
    while True:
      while not self.slots.acquire(timeout=0.1):
        if self.stopping.is_set():
          return
      if self.stopping.is_set():
        return
      try:
        batch = next(self.source)
        state = copy.deepcopy(self.source.get_state())
        item = (self.place(batch), state)
      except StopIteration:
        self.ready.put(_END)
        return
      except BaseException as e:    # handed to the consumer, raised there
        self.ready.put(_Failed(e))
        return
      if self.stopping.is_set():
        return
      self.ready.put(item)

  def take(self) -> Any:
    """The next item; frees its slot for the thread."""
    while True:
      try:
        item = self.ready.get(timeout=1.0)
        break
      except queue.Empty:
        if not self.thread.is_alive() and self.ready.empty():
          return _Failed(RuntimeError(f"{self.thread.name}: the input thread ended without "
                                      "a batch"))
    if item is not _END and not isinstance(item, _Failed):
      self.slots.release()
    return item

  def stop(self) -> None:
    """Ends the thread (after the batch it is building, if any) and drops what it built."""
    self.stopping.set()
    self.thread.join(_JOIN_S)
    while True:
      try:
        self.ready.get_nowait()
      except queue.Empty:
        break

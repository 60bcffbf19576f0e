"""Host-level collectives of the training loop: none in a step between sync points.

``train.train_loop`` runs here over fakes (data, step, metric writer; the real
:class:`checkpoint.Checkpointer` over a fake Orbax manager) as one of two processes:
``jax.process_count()`` says 2 and every gather (``multihost_utils.process_allgather``,
``sync_global_devices``) is counted and answers as if the other process sent this one's
values. Real processes on loopback are in ``tests/e2e/test_multiprocess.py`` and
``tests/e2e/test_pod.py``.
"""
import types

import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils

from mt_flax import checkpoint, data, default_config, sharding, train
from mt_flax.errors import DataError, SaveFailed

ROWS, SRC, TGT = 4, 8, 6


def batch(rows=ROWS, src=SRC, tgt=TGT) -> dict:
  return {"src": np.ones((rows, src), np.int32), "tgt_in": np.ones((rows, tgt), np.int32),
          "tgt_out": np.ones((rows, tgt), np.int32)}


class Batches:
  """An endless stream of one batch shape, checkpointable like the data pipeline's."""

  def __init__(self, shapes=None):
    self.n, self.shapes = 0, shapes or {}

  def __next__(self):
    self.n += 1
    return batch(**self.shapes.get(self.n, {}))

  def get_state(self):
    return {"n": self.n}


class Writer:
  def __init__(self):
    self.rows = []

  def write(self, step, metrics, split="train"):
    self.rows.append((step, split))

  def flush(self):
    pass


class Manager:
  """Orbax's manager as the Checkpointer uses it: a save stays in flight for ``looks`` looks."""

  def __init__(self, directory, looks=2, fail=False):
    self.directory, self.looks, self.fail, self.left = directory, looks, fail, 0
    self.saved, self.looked = [], []

  def save(self, step):
    (self.directory / str(step)).mkdir(parents=True, exist_ok=True)
    self.saved.append(step)
    self.left = self.looks

  def is_saving_in_progress(self):
    self.looked.append(self.saved[-1])
    self.left -= 1
    return self.left > 0

  def wait_until_finished(self):
    self.left = 0
    if self.fail:
      raise OSError("injected write error")

  def all_steps(self):
    return list(self.saved)

  def close(self):
    pass


class Gathers:
  """Every host-level collective, counted: this process's values stand for both processes'."""

  def __init__(self, monkeypatch, processes: int):
    self.calls = []
    monkeypatch.setattr(jax, "process_count", lambda: processes)
    monkeypatch.setattr(multihost_utils, "process_allgather", self.allgather)
    monkeypatch.setattr(multihost_utils, "sync_global_devices", self.sync)

  def allgather(self, x, tiled=False):
    self.calls.append("process_allgather")
    x = np.asarray(x)
    return np.concatenate([x, x]) if tiled else np.stack([x, x])

  def sync(self, name):
    self.calls.append(f"sync_global_devices({name})")


def run_loop(tmp_path, monkeypatch, processes=2, signal_at=None, fail_save=False,
             shapes=None, **settings):
  """Runs ``train_loop``; returns (summary or exception, gathers made before each step's
  train step and at the end, the fake manager, the steps whose metrics were written)."""
  config = default_config.get_config()
  config.update(dict(num_train_steps=12, sync_every_steps=4, checkpoint_every_steps=6,
                     eval_every_steps=100, log_every_steps=1, progress_bar=False, **settings))
  checkpoints = checkpoint.Checkpointer(str(tmp_path), config)
  checkpoints.manager.close()
  manager = checkpoints.manager = Manager(checkpoints.directory, fail=fail_save)
  monkeypatch.setattr(checkpoint, "save", lambda m, step, *a: m.save(step))
  gathers = Gathers(monkeypatch, processes)
  preemption = types.SimpleNamespace(requested=None)
  before = []

  def train_fn(state, b):
    before.append(len(gathers.calls))
    if len(before) == signal_at:
      preemption.requested = "SIGTERM"          # on this process only, mid-step
    return state, {"loss": np.float32(1.0), "grad_norm": np.float32(1.0), "finite": True}

  partitioner = types.SimpleNamespace(shard_batch=lambda b: b, metrics_to_host=lambda m: m,
                                      params_of=lambda s: s, to_checkpoint=lambda s: s)
  writer = Writer()
  place, finish = train._batch_placer(partitioner, frozenset({(ROWS, SRC, TGT)}))
  feed = data.Prefetcher(Batches(shapes), place, 0, finish=finish)   # the order is fixed
  run = train._Run(config, str(tmp_path), partitioner, checkpoints, writer,
                   feed, train_fn, lambda params: {"eval_loss": 1.0}, start=0, verified=True)
  try:
    result = train.train_loop(run, {}, preemption)
  except Exception as e:  # pylint: disable=broad-except
    result = e
  before.append(len(gathers.calls))
  return result, before, manager, writer


def per_step(before: list) -> dict:
  """{step: gathers from its train step to the next step's (the last: to the end)}."""
  return {s: before[s] - before[s - 1] for s in range(1, len(before))}


def test_two_processes_gather_only_at_sync_points_and_saves(tmp_path, monkeypatch):
  summary, before, manager, writer = run_loop(tmp_path, monkeypatch)
  assert summary["step"] == 12 and not summary["preempted"]
  assert before[0] == 1                           # a signal while setting up, agreed once
  gathers = per_step(before)
  # sync points 4, 8, 12 (signals, the lock, the save in flight: one gather); saves at 6
  # and 12 (the lock and the previous save: one gather); the end waits for the last save
  assert gathers == {1: 0, 2: 0, 3: 0, 4: 1, 5: 0, 6: 1, 7: 0, 8: 1, 9: 0, 10: 0, 11: 0,
                     12: 3}
  assert manager.saved == [6, 12]
  # the save in flight is looked at only at the sync points: still saving at 8, done at 12
  assert manager.looked == [6, 6]
  assert [s for s, split in writer.rows if split == "train"] == list(range(1, 13))


def test_one_process_gathers_nothing_and_checks_every_step(tmp_path, monkeypatch):
  summary, before, manager, _ = run_loop(tmp_path, monkeypatch, processes=1, signal_at=5)
  assert before[-1] == 0
  assert summary["step"] == 5 and summary["preempted"] == "SIGTERM"
  assert manager.saved == [5]


def test_a_signal_stops_every_process_at_the_next_sync_point(tmp_path, monkeypatch):
  summary, before, manager, _ = run_loop(tmp_path, monkeypatch, signal_at=5)
  assert summary["step"] == 8 and summary["preempted"] == "SIGTERM"
  assert manager.saved == [6, 8]
  assert per_step(before) == {1: 0, 2: 0, 3: 0, 4: 1, 5: 0, 6: 1, 7: 0, 8: 3}


def test_a_failed_background_save_stops_at_the_next_sync_point(tmp_path, monkeypatch):
  error, before, manager, _ = run_loop(tmp_path, monkeypatch, fail_save=True)
  assert isinstance(error, SaveFailed)
  assert "saving checkpoint step 6 failed: OSError: injected write error" in str(error)
  # still saving at the sync point 8, failed at 12: every process stops before saving step 12
  assert len(before) == 13 and manager.saved == [6]


def test_a_batch_of_an_unagreed_shape_fails_at_once(tmp_path, monkeypatch):
  error, before, _, _ = run_loop(tmp_path, monkeypatch, shapes={3: dict(tgt=7)})
  assert isinstance(error, DataError)
  assert str(error).startswith("a training batch of shapes src (4, 8), tgt_in (4, 7)")
  assert "(4, 8, 6)" in str(error) and len(before) == 3   # steps 1-2 ran


def test_batch_shapes_are_agreed_once(monkeypatch):
  gathers = Gathers(monkeypatch, 2)
  shapes = [types.SimpleNamespace(rows=8, src_len=SRC, tgt_len=TGT)]
  config = default_config.get_config()
  agreed = train._agree_on_shapes(config, shapes, sharding.RowShare.of_process(0, 2))
  assert agreed == frozenset({(ROWS, SRC, TGT)}) and gathers.calls == ["process_allgather"]
  # a process whose data plans other shapes: every process stops before the first step
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: np.stack([np.asarray(x), np.asarray(x) ^ np.uint8(1)]))
  with pytest.raises(DataError, match="training batch shapes .* differ between process 0 and "
                                      "process 1"):
    train._agree_on_shapes(config, shapes, sharding.RowShare.of_process(0, 2))

"""Run logging: ``metrics.jsonl`` (one JSON object per line) and TensorBoard event files.

Train lines: ``{"step", "loss", "nll", "learning_rate", "grad_norm" (with
``log_grad_norm``), "tokens_per_s", "padding_efficiency", "steps_per_s", ...}``; validation lines:
``{"step", "split": "validation", "eval_loss", "eval_accuracy", "eval_perplexity", ...}``.
Only process 0 writes. Every (re)start cuts both back to the step it starts from
(the restored checkpoint's, 0 for a fresh start): lines and TensorBoard events
past it are dropped and the old event files are merged into one, so every step
appears once. On a ``gs://`` workdir (GCS has no append) ``metrics.jsonl`` is
rewritten at most every 30 s and on every flush, and the event files are written
to a local folder and copied to ``workdir/tensorboard/`` on every flush and on close.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
import time
from typing import Any, Iterator, Optional

from etils import epath
from tensorboardX import summary as tb_summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event

from mt_flax import paths
from mt_flax.paths import METRICS_FILE, TENSORBOARD_DIR

TB_FLUSH_S = 30.0


def _clean(value: Any) -> Any:
  """Python scalars for JSON; NaN/inf become strings ("nan", "inf") so lines stay valid JSON."""
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """The rows of ``workdir/metrics.jsonl``: every line that is a JSON object with a ``step``.

  A torn last line (a run killed mid-write) is skipped, as is any other line
  that is not such an object.
  """
  path = paths.as_path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(row, dict) and "step" in row:
      rows.append(row)
  return rows


def _event_records(blob: bytes) -> Iterator[bytes]:
  """The framed records of a TFRecord file (length, crc, data, crc); a torn tail is dropped."""
  at = 0
  while at + 12 <= len(blob):
    (length,) = struct.unpack("<Q", blob[at:at + 8])
    end = at + 12 + length + 4
    if end > len(blob):
      return
    yield blob[at:end]
    at = end


def _record_step(record: bytes) -> int:
  from tensorboardX.proto import event_pb2
  event = event_pb2.Event()
  event.ParseFromString(record[12:-4])
  return int(event.step)


def cut_tensorboard(directory: epath.Path, step: int) -> None:
  """Keeps the events with ``step <= step`` (none when ``step`` is 0), merged into the oldest file."""
  event_files = sorted(directory.glob("events.out.tfevents.*")) if directory.exists() else []
  if not event_files:
    return
  kept = [r for f in event_files for r in _event_records(f.read_bytes())
          if step > 0 and _record_step(r) <= step]
  for f in event_files[1:]:
    f.unlink()
  if kept:
    paths.write_bytes(event_files[0], b"".join(kept))
  else:
    event_files[0].unlink()


class _RewrittenFile:
  """Append-only text file on a store without appends (GCS): keeps the text and rewrites the
  object, at most every ``interval`` seconds on ``flush()`` and always on ``close()``."""

  def __init__(self, path, interval: float = 30.0):
    self.path, self.interval = path, interval
    self._text = path.read_text() if path.exists() else ""
    self._saved_at = 0.0

  def write(self, text: str) -> None:
    self._text += text

  def flush(self, force: bool = False) -> None:
    if force or time.time() - self._saved_at >= self.interval:
      self.path.write_text(self._text)
      self._saved_at = time.time()

  def close(self) -> None:
    self.flush(force=True)


class MetricWriter:
  """Appends metric dicts to ``metrics.jsonl`` and TensorBoard (``<split>/<name>`` scalars).

  Both are written in the calling thread, so a write error (e.g. disk full)
  raises here at once; TensorBoard events are flushed every ``TB_FLUSH_S`` seconds.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: Optional[int] = None):
    """``resume_step``: the step this run starts from; later lines and events are dropped."""
    self.enabled = enabled
    self.path = paths.as_path(workdir) / METRICS_FILE
    self._tb = None
    if not enabled:
      return
    if resume_step is not None:
      self._truncate_after(resume_step)
    remote = paths.is_remote(workdir)
    self._tb_dir = paths.as_path(workdir) / TENSORBOARD_DIR
    if resume_step is not None:
      cut_tensorboard(self._tb_dir, resume_step)
    # Event files are local: a gs:// workdir gets them copied on every flush and on close.
    self._tb_local = tempfile.mkdtemp(prefix="mt_flax_tb_") if remote else None
    folder = self._tb_local or os.fspath(self._tb_dir)
    os.makedirs(folder, exist_ok=True)
    self._tb = EventsWriter(os.path.join(folder, "events"), filename_suffix=f".{time.time_ns()}")
    self._tb_flushed = time.time()
    self._file = _RewrittenFile(self.path) if remote else self.path.open("a")

  def _copy_tensorboard(self) -> None:
    """Copies the local event files of a gs:// workdir to ``workdir/tensorboard/``."""
    if self._tb_local is None:
      return
    self._tb_dir.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(self._tb_local):
      with open(os.path.join(self._tb_local, name), "rb") as f:
        (self._tb_dir / name).write_bytes(f.read())

  def _tb_write(self, step: int, summary: Any) -> None:
    self._tb.write_event(Event(wall_time=time.time(), step=int(step), summary=summary))
    if time.time() - self._tb_flushed > TB_FLUSH_S:
      self._tb.flush()
      self._tb_flushed = time.time()

  def _truncate_after(self, step: int) -> None:
    """Keeps lines with ``step <= step`` (a resumed run re-logs the later ones)."""
    if not self.path.exists():
      return
    text = self.path.read_text()
    keep = [r for r in read_metrics(str(self.path.parent)) if int(r.get("step", 0)) <= step]
    if len(keep) != len(text.splitlines()) or (text and not text.endswith("\n")):
      paths.write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))

  def write(self, step: int, metrics: dict[str, Any], split: str = "train") -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    if split != "train":
      row["split"] = split
    row.update({k: _clean(v) for k, v in metrics.items()})
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        v = _clean(v)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb_write(step, tb_summary.scalar(f"{split}/{k}", v))

  def flush(self) -> None:
    if self.enabled:
      self._file.flush(**({"force": True} if isinstance(self._file, _RewrittenFile) else {}))
      if self._tb is not None:
        self._tb.flush()
        self._copy_tensorboard()

  def discard(self) -> None:
    """Stops without writing anything more to the workdir (what was not written yet is
    dropped): for a run that lost the workdir to another run, whose files these now are."""
    if self.enabled and self._tb is not None:
      self._tb.close()
      if self._tb_local is not None:
        shutil.rmtree(self._tb_local, ignore_errors=True)
    if self.enabled and not isinstance(self._file, _RewrittenFile):
      self._file.close()            # a local file: every line is written already
    self.enabled = False

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()
        self._copy_tensorboard()
        if self._tb_local is not None:
          shutil.rmtree(self._tb_local, ignore_errors=True)

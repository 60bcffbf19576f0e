"""Run logging: ``metrics.jsonl`` (one JSON object per line) and TensorBoard event files.

Train lines: ``{"step", "loss", "nll", "learning_rate", "grad_norm", "tokens_per_s",
"padding_efficiency", "steps_per_s", ...}``; validation lines:
``{"step", "split": "validation", "eval_loss", "eval_accuracy", "eval_perplexity", ...}``.
Only process 0 writes. On resume, lines past the restored step are dropped so
every step appears once.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from typing import Any, Optional

from tensorboardX import SummaryWriter

from mt_flax import paths

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _clean(value: Any) -> Any:
  """Python scalars for JSON; NaN/inf become strings ("nan", "inf") so lines stay valid JSON."""
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def read_metrics(workdir: str) -> list[dict]:
  """All complete JSON lines of ``workdir/metrics.jsonl`` (a torn last line is skipped)."""
  path = paths.as_path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return rows


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
  """Appends metric dicts to ``metrics.jsonl`` and TensorBoard (``<split>/<name>`` scalars)."""

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: Optional[int] = None):
    self.enabled = enabled
    self.path = paths.as_path(workdir) / METRICS_FILE
    self._tb = None
    if not enabled:
      return
    if resume_step is not None:
      self._truncate_after(resume_step)
    self._tb_dir = paths.as_path(workdir) / TENSORBOARD_DIR
    # tensorboardX writes local files: for a gs:// workdir they are written to a local
    # folder and copied to the workdir on every flush and on close.
    self._tb_local = tempfile.mkdtemp(prefix="mt_flax_tb_") if paths.is_remote(workdir) else None
    self._tb = SummaryWriter(self._tb_local or os.fspath(self._tb_dir),
                             purge_step=resume_step, flush_secs=30)
    self._file = _RewrittenFile(self.path) if paths.is_remote(workdir) else self.path.open("a")

  def _copy_tensorboard(self) -> None:
    """Copies the local event files of a gs:// workdir to ``workdir/tensorboard/``."""
    if self._tb_local is None:
      return
    self._tb_dir.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(self._tb_local):
      with open(os.path.join(self._tb_local, name), "rb") as f:
        (self._tb_dir / name).write_bytes(f.read())

  def _truncate_after(self, step: int) -> None:
    """Keeps lines with ``step <= step`` (a resumed run re-logs the later ones)."""
    if not self.path.exists():
      return
    text = self.path.read_text()
    keep = [r for r in read_metrics(str(self.path.parent)) if int(r.get("step", 0)) <= step]
    if len(keep) != len(text.splitlines()) or (text and not text.endswith("\n")):
      self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))

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
          self._tb.add_scalar(f"{split}/{k}", v, int(step))

  def write_text(self, tag: str, text: str, step: int = 0) -> None:
    if self.enabled and self._tb is not None:
      self._tb.add_text(tag, text, step)

  def flush(self) -> None:
    if self.enabled:
      self._file.flush(**({"force": True} if isinstance(self._file, _RewrittenFile) else {}))
      if self._tb is not None:
        self._tb.flush()
        self._copy_tensorboard()

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()
        self._copy_tensorboard()
        if self._tb_local is not None:
          shutil.rmtree(self._tb_local, ignore_errors=True)

"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

Local paths are written to ``NAME.tmp-PID`` beside the target and renamed over
it; the temporary file is removed if the write fails (e.g. disk full). Objects
on ``gs://`` are replaced whole by each upload, so they are written directly.
"""
from __future__ import annotations

import os
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike, epath.Path]


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically."""
  path = epath.Path(path)
  if "://" in str(path):
    path.write_bytes(data)
    return
  tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def write_text(path: PathLike, text: str) -> None:
  """Writes ``text`` (UTF-8) to ``path`` atomically."""
  write_bytes(path, text.encode("utf-8"))

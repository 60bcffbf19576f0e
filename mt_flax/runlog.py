"""The run's log file: third-party output and tracebacks go there, the terminal gets one line.

``train`` writes ``WORKDIR/train.log`` (for a ``gs://`` workdir, a local file in
the temporary folder, named in every error line). :func:`failure_cause` turns
an I/O error into the short cause shown on the terminal.
"""
from __future__ import annotations

import errno
import logging
import os
import sys
import tempfile
import threading
import time
import traceback
from typing import Optional

from mt_flax.paths import LOG_FILE


class _FileHandler(logging.StreamHandler):
  """A log handler that drops records it cannot write (e.g. disk full) instead of printing."""

  def handleError(self, record: logging.LogRecord) -> None:
    del record


def _fileno(stream) -> int:
  try:
    return stream.fileno()
  except (AttributeError, OSError, ValueError):
    return -1


def log_path(workdir: str) -> str:
  """``WORKDIR/train.log``, or a local file in the temporary folder for a remote workdir."""
  if "://" in workdir:
    return os.path.join(tempfile.gettempdir(), f"mt_flax-train-{os.getpid()}.log")
  os.makedirs(workdir, exist_ok=True)
  return os.path.join(workdir, LOG_FILE)


class _OneLine(logging.Formatter):
  def format(self, record: logging.LogRecord) -> str:
    return f"{record.name}: {record.levelname.lower()}: {' '.join(record.getMessage().split())}"


class _Terminal(logging.Handler):
  """Warnings of mt_flax's loggers on ``sys.stderr`` (as it is when each is written), one line
  each; other loggers' (gcsfs, absl, Orbax) only when ``verbose``."""

  def __init__(self, verbose: bool):
    super().__init__(logging.INFO if verbose else logging.WARNING)
    self.verbose = verbose
    self.setFormatter(_OneLine())

  def emit(self, record: logging.LogRecord) -> None:
    if self.verbose or record.name.partition(".")[0] == "mt_flax":
      try:
        sys.stderr.write(self.format(record) + "\n")
      except (ValueError, OSError):
        pass


def terminal_logging(verbose: bool = False) -> None:
  """Log output of a command on the terminal: see :class:`_Terminal`. Replaces the plain stderr
  handler that importing Orbax puts on the root logger (every library's records, bare)."""
  root = logging.getLogger()
  root.handlers = [h for h in root.handlers
                   if type(h) is not logging.StreamHandler and not isinstance(h, _Terminal)]
  root.addHandler(_Terminal(verbose))
  if verbose:
    root.setLevel(logging.INFO)


class LogRouting:
  """Sends third-party output to ``path`` so the terminal shows one-line errors.

  Python logging (absl, Orbax), warnings, exceptions in threads and "Exception
  ignored" reports (asyncio at shutdown) go to the file; warnings of mt_flax's
  own loggers also reach the terminal, one line each. When ``sys.stderr`` is
  the process's own stderr (the command line), file descriptor 2 (XLA's C++
  logging) goes there too while ``sys.stderr`` keeps the terminal; that routing
  lasts until the process ends. Otherwise everything is undone on exit.
  """

  def __init__(self, path: str):
    self.path = path
    self.file = open(path, "a", encoding="utf-8", buffering=1)   # pylint: disable=consider-using-with
    self.file.write(f"==== pid {os.getpid()}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    self.permanent = sys.stderr is sys.__stderr__ and _fileno(sys.stderr) == 2
    self._saved = (list(logging.root.handlers), logging.root.level, sys.unraisablehook,
                   threading.excepthook)

  def __enter__(self) -> "LogRouting":
    handler = _FileHandler(self.file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.root.handlers = [handler]
    logging.root.setLevel(logging.WARNING)
    logging.captureWarnings(True)
    sys.unraisablehook = self._unraisable
    threading.excepthook = lambda a: self.write_exception(
        f"exception in thread {a.thread.name if a.thread else '?'}", a.exc_value)
    if self.permanent:
      sys.stderr.flush()
      terminal = os.dup(2)
      os.dup2(self.file.fileno(), 2)
      sys.stderr = os.fdopen(terminal, "w", buffering=1, encoding="utf-8",
                             errors="backslashreplace")
    self._ours = logging.StreamHandler(sys.stderr)
    self._ours.setFormatter(_OneLine())
    self._ours.setLevel(logging.WARNING)
    logging.getLogger("mt_flax").addHandler(self._ours)
    return self

  def _unraisable(self, info) -> None:
    self.write_exception(f"{info.err_msg or 'Exception ignored in'}: {info.object!r}",
                         info.exc_value)

  def write_exception(self, title: str, error: Optional[BaseException]) -> None:
    """Appends ``title`` and the traceback of ``error`` (dropped if the file cannot take it)."""
    try:
      text = "".join(traceback.format_exception(error)) if error is not None else ""
      self.file.write(title + "\n" + text)
    except (ValueError, OSError):   # the file is closed or the disk is full
      pass

  def __exit__(self, *exc) -> None:
    if self.permanent:
      return
    logging.getLogger("mt_flax").removeHandler(self._ours)
    logging.captureWarnings(False)
    handlers, level, sys.unraisablehook, threading.excepthook = self._saved
    logging.root.handlers = handlers
    logging.root.setLevel(level)
    self.file.close()


def failure_cause(error: Optional[BaseException], where: str) -> str:
  """A short cause of a failure: "no space left on device in WHERE", or its type and first words."""
  seen, e = [], error
  while e is not None and len(seen) < 8:
    seen.append(e)
    e = e.__cause__ or e.__context__
  text = " ".join(" ".join(str(x).split()) for x in seen)
  if any(getattr(x, "errno", None) == errno.ENOSPC for x in seen) or \
      "No space left on device" in text:
    return f"no space left on device in {where}"
  if error is None:
    return "another process reported a failure"
  return f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"

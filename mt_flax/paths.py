"""One path type for local folders and ``gs://`` buckets: ``etils.epath.Path``.

Every workdir, data and report path goes through :func:`as_path`. ``gs://``
paths are read and written through gcsfs (fsspec), without TensorFlow; Orbax
and TFDS use the same ``epath`` paths, and Orbax's array store (tensorstore)
talks to GCS itself.

Writes of whole files go through :func:`write_bytes` / :func:`write_text`:
a reader sees the old file or the whole new one, never a part (local files are
written beside the target and renamed over it; the temporary file is removed
if the write fails, e.g. on a full disk; ``gs://`` objects are replaced whole
by each upload, so they are written directly).

A local GCS emulator is used by setting ``STORAGE_EMULATOR_HOST`` (e.g.
``http://127.0.0.1:9023``), which gcsfs reads; importing this module then sets
``TENSORSTORE_GCS_HTTP_URL`` to the same address unless it is already set, so
checkpoints go to the emulator too.

The names of the files and folders a run writes are defined here, once, and
imported wherever they are read or written.
"""
from __future__ import annotations

import os

from etils import epath

# ----------------------------------------------------------------------------- names in a workdir
CONFIG_FILE = "config.json"         # the resolved config of the run
RUN_FILE = "run.json"               # the devices the run was made on
GIT_FILE = "git_commit.txt"         # the commit of the code that trained
COMMIT_FILE = "GIT_COMMIT"          # in a source tree without .git (the TPU archive): its commit
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DONE_FILE = "DONE"                  # written when training reaches num_train_steps
METRICS_FILE = "metrics.jsonl"      # one JSON object per logged step
TENSORBOARD_DIR = "tensorboard"
LOG_FILE = "train.log"              # third-party output and tracebacks of train
LOCK_FILE = "train.lock"            # held by the one process that trains in the workdir
CHECKPOINT_DIR = "checkpoints"
UNREADABLE_DIR = "checkpoints_unreadable"
AVERAGED_DIR = "averaged"           # params only (python -m mt_flax average), never a training state
AVERAGED_INFO = "averaged.json"     # which steps were averaged
TOKENIZER_DIR = "tokenizer"
TOKENIZER_INFO = "tokenizer.json"   # in TOKENIZER_DIR: what the tokenizer was trained on
EVAL_DIR = "eval"                   # eval/<split>/: the reports of python -m mt_flax eval
# in an eval report folder
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
SLICE_CHART = "bleu_by_slice.png"
# in a sweep folder and its trial workdirs
SWEEP_FILE = "sweep.json"           # the config, its digest and the trials
TRIAL_FILE = "sweep_trial.json"     # per trial workdir: overrides and attempt times
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
TENSORSTORE_GCS_ENV = "TENSORSTORE_GCS_HTTP_URL"


def use_gcs_emulator_for_tensorstore() -> None:
  """Points tensorstore at ``$STORAGE_EMULATOR_HOST`` unless ``$TENSORSTORE_GCS_HTTP_URL`` is set."""
  host = os.environ.get(EMULATOR_ENV, "")
  if host and not os.environ.get(TENSORSTORE_GCS_ENV):
    os.environ[TENSORSTORE_GCS_ENV] = host if "://" in host else f"http://{host}"


use_gcs_emulator_for_tensorstore()


def is_remote(path: str | os.PathLike) -> bool:
  """True for a URL-like path (``gs://...``), False for a local one."""
  return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
  """``path`` as an ``epath.Path``: local paths made absolute (``~`` expanded), URLs as they are."""
  if is_remote(path):
    return epath.Path(os.fspath(path))
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically (see the module docstring)."""
  path = as_path(path)
  if is_remote(path):
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


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes ``text`` (UTF-8) to ``path`` atomically."""
  write_bytes(path, text.encode("utf-8"))


def source_commit(root: str = SOURCE_ROOT) -> str:
  """The source tree's commit (``-dirty`` with uncommitted changes); without ``.git``, what
  its ``GIT_COMMIT`` file says (the TPU archive carries one); else ``unknown``."""
  import subprocess
  try:
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                         text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return sha + ("-dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    pass
  try:
    with open(os.path.join(root, COMMIT_FILE)) as f:
      return f.read().strip() or "unknown"
  except OSError:
    return "unknown"


COMPILATION_CACHE = os.path.expanduser("~/.cache/mt_flax/jax_compilation_cache")


def use_compilation_cache(config) -> str:
  """Points JAX's persistent compilation cache at ``config.compilation_cache_dir`` (gs:// ok),
  else ``$JAX_COMPILATION_CACHE_DIR``, else ``COMPILATION_CACHE``; returns the folder.
  ``train`` and every command that loads a trained run use it, so a repeated command
  loads its compiled programs instead of compiling them again."""
  import jax
  folder = (config.compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR")
            or COMPILATION_CACHE)
  jax.config.update("jax_compilation_cache_dir", folder)
  return folder

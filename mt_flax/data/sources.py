"""Where raw sentence pairs come from: TFDS builders read as array_record.

`config.data.name` names a TFDS builder: one of ours (`spa_eng`, `bible_en_es`)
or any TFDS translation dataset such as `wmt14_translate/de-en`.
`config.data.src_lang` / `config.data.tgt_lang` pick the direction. A builder is
prepared (downloaded, parsed, written as array_record) on first use into
`config.data.tfds_data_dir` ("" = TFDS default, i.e. `$TFDS_DATA_DIR` or
`~/tensorflow_datasets`). Downloaded archives may instead be put in a folder
named by `config.data.manual_dir` or the environment variable
`MT_FLAX_MANUAL_DIR` (the config key wins).
"""
from __future__ import annotations

import contextlib
import difflib
import fcntl
import hashlib
import os
import sys
import urllib.parse
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mt_flax import paths
from mt_flax.data.downloads import manual_dir
from mt_flax.data.overlap import sentence_key
from mt_flax.errors import DataError

SPLITS = ("train", "validation", "test")
OUR_BUILDERS = ("spa_eng", "bible_en_es")
LOCAL_TFDS_COPIES = os.path.expanduser("~/.cache/mt_flax/tfds")


def tfds_data_dir(config: ml_collections.ConfigDict) -> str | None:
  """`data.tfds_data_dir`, or None for the TFDS default (`$TFDS_DATA_DIR`, ~/tensorflow_datasets).

  A gs:// folder (in the config or `$TFDS_DATA_DIR`) is read through a copy of
  the dataset's prepared files on this host (array_record reads local files
  only without TensorFlow); see `local_copy`.
  """
  folder = config.data.tfds_data_dir or os.environ.get("TFDS_DATA_DIR", "")
  if folder and paths.is_remote(folder):
    return local_copy(folder, config.data.name)
  return os.fspath(paths.as_path(folder)) if config.data.tfds_data_dir else None


def _files(folder: epath.Path):
  """Every file under `folder` (GCS paths do not glob recursively)."""
  for child in folder.iterdir():
    if child.is_dir():
      yield from _files(child)
    else:
      yield child


def local_copy(remote_dir: str, name: str, cache: str | None = None) -> str:
  """Copies `remote_dir/<name>/` (prepared TFDS files) under `cache`; returns the local data dir.

  Files already copied with the same size are kept; each file is written to a
  temporary name and renamed, so processes sharing a host can copy at once.
  """
  key = urllib.parse.quote(remote_dir.rstrip("/"), safe="")
  local_root = epath.Path(cache or LOCAL_TFDS_COPIES) / key
  source = epath.Path(remote_dir) / name
  if not source.exists():
    raise DataError(f"{source} does not exist; expected {name} prepared there "
                    "(copy ~/tensorflow_datasets/NAME to the bucket)")
  for path in _files(source):
    target = local_root / name / os.fspath(path)[len(os.fspath(source)) + 1:]
    size = path.stat().length
    if target.exists() and target.stat().length == size:
      continue
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{target.name}.{os.getpid()}.partial"
    partial.write_bytes(path.read_bytes())
    partial.rename(target)
  return os.fspath(local_root)


def _register_builders() -> None:
  """Imports our builders and TFDS's translation builders so TFDS knows their names."""
  from mt_flax.data import bible, spa_eng  # noqa: F401  (registration on import)
  try:
    import tensorflow_datasets.translate  # noqa: F401
  except ImportError:
    pass


def _known_names() -> list[str]:
  from tensorflow_datasets.core import registered
  return sorted(set(registered.list_imported_builders()) | set(OUR_BUILDERS))


def get_builder(config: ml_collections.ConfigDict, *, prepare: bool = True
                ) -> tfds.core.DatasetBuilder:
  """The TFDS builder named by `config.data.name`, prepared as array_record if needed.

  Raises:
    DataError: unknown name, missing data offline, or a failed preparation.
  """
  _register_builders()
  name = config.data.name
  builder = _builder(name, config)
  if prepare and not builder.is_prepared():
    with _one_preparer(builder):
      if not builder.is_prepared():
        _prepare(builder, name, config)
        return builder
    builder = _builder(name, config)   # prepared by another process while this one waited
  return builder


def _builder(name: str, config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  try:
    return tfds.builder(name, data_dir=tfds_data_dir(config), file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError:
    base = name.split("/")[0]
    near = difflib.get_close_matches(base, _known_names(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(near)}?" if near else (
        f"expected {', '.join(OUR_BUILDERS)} or a TFDS dataset such as wmt14_translate/de-en")
    raise DataError(f"unknown dataset data.name={name!r}; {hint}") from None
  except ValueError as e:
    raise DataError(f"data.name={name!r}: {_first_line(e)}") from None


@contextlib.contextmanager
def _one_preparer(builder: tfds.core.DatasetBuilder):
  """Holds a lock per local data dir so that runs started together (sweep trials, test
  workers) prepare a dataset once: the others wait, then find it prepared."""
  folder = os.fspath(builder.data_dir)
  if paths.is_remote(folder):
    yield
    return
  locks = os.path.join(os.path.dirname(LOCAL_TFDS_COPIES), "locks")
  os.makedirs(locks, exist_ok=True)
  key = hashlib.sha1(os.path.realpath(folder).encode()).hexdigest()[:16]
  with open(os.path.join(locks, f"prepare-{key}.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    yield


def _prepare(builder: tfds.core.DatasetBuilder, name: str, config) -> None:
  if not sys.stderr.isatty():        # no progress-bar frames in logs
    tfds.disable_progress_bar()
  try:
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir(config)))
  except DataError:
    raise
  except ModuleNotFoundError as e:
    raise DataError(f"{name}: preparing the dataset needs the Python package {e.name!r}, "
                    f"which is not installed (pip install {e.name})") from e
  except Exception as e:  # a third-party builder failing deep inside TFDS
    raise DataError(f"{name}: preparing the dataset in {builder.data_dir} failed: "
                    f"{type(e).__name__}: {_first_line(e)}") from e


def languages(builder: tfds.core.DatasetBuilder) -> tuple[str, ...]:
  """The language keys of a translation builder's records, e.g. ("en", "es")."""
  features = builder.info.features
  if isinstance(features, tfds.features.Translation):
    return tuple(features.languages)
  if builder.info.supervised_keys:
    return tuple(builder.info.supervised_keys)
  if isinstance(features, tfds.features.FeaturesDict):
    return tuple(k for k, v in features.items() if isinstance(v, tfds.features.Text))
  return ()


def check_direction(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder
                    ) -> tuple[str, str]:
  """Validates `data.src_lang`/`data.tgt_lang` against the builder; returns them."""
  langs = languages(builder)
  src, tgt = config.data.src_lang, config.data.tgt_lang
  for key, lang in (("data.src_lang", src), ("data.tgt_lang", tgt)):
    if lang not in langs:
      raise DataError(f"{key}={lang!r} is not a language of {config.data.name} "
                      f"(it has {', '.join(langs) or 'no text features'})")
  if src == tgt:
    raise DataError(f"data.src_lang and data.tgt_lang are both {src!r}")
  return src, tgt


def data_source(config: ml_collections.ConfigDict, split: str) -> Sequence[dict[str, Any]]:
  """Random-access records of `split` (dicts of bytes), read with `tfds.data_source`.

  Raises:
    DataError: unknown or empty split, or data not stored as array_record.
  """
  builder = get_builder(config)
  check_direction(config, builder)
  splits = builder.info.splits
  empty = split in (builder.info.metadata or {}).get("empty_splits", [])
  if split not in splits and not empty:
    raise DataError(f"{config.data.name} has no split {split!r} "
                    f"(it has {', '.join(sorted(splits.keys()))})")
  if empty or splits[split].num_examples == 0:
    raise DataError(f"{config.data.name} split {split!r} is empty (0 examples in "
                    f"{builder.data_dir})")
  try:
    return tfds.data_source(config.data.name, split=split, data_dir=tfds_data_dir(config),
                            download=False)
  except ValueError as e:
    raise DataError(f"{config.data.name} in {builder.data_dir} cannot be read as "
                    f"array_record ({_first_line(e)}); rebuild it with file_format="
                    "array_record (see README, 'Preparing TFDS translation datasets')") from None


def split_sizes(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Number of pairs in each split of the prepared dataset."""
  builder = get_builder(config)
  sizes = {name: 0 for name in (builder.info.metadata or {}).get("empty_splits", [])}
  sizes.update({name: int(info.num_examples) for name, info in builder.info.splits.items()})
  return {name: sizes[name] for name in sorted(sizes, key=_split_order)}


def _split_order(name: str) -> tuple[int, str]:
  return (SPLITS.index(name) if name in SPLITS else len(SPLITS), name)


def report(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What the builder recorded while preparing (malformed lines, skipped verses), if any."""
  builder = get_builder(config)
  metadata = builder.info.metadata
  return dict(metadata) if metadata else {}


def read_texts(records: Sequence[dict[str, Any]], src_lang: str, tgt_lang: str
               ) -> list[tuple[str, str]]:
  """Decodes records (dicts of UTF-8 bytes) into (source, target) strings."""
  def text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
  return [(text(r[src_lang]), text(r[tgt_lang])) for r in records]


def load_pairs(config: ml_collections.ConfigDict, split: str) -> list[tuple[str, str]]:
  """All (source text, target text) pairs of `split` in the configured direction.

  The order is the stored order of the array_record files (deterministic).
  """
  if split not in SPLITS:
    raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}")
  source = data_source(config, split)
  src, tgt = config.data.src_lang, config.data.tgt_lang
  pairs: list[tuple[str, str]] = []
  for start in range(0, len(source), 8192):
    pairs.extend(read_texts(read_records(source, start, start + 8192), src, tgt))
  return pairs


def train_sources_held_out(config: ml_collections.ConfigDict,
                           records: Sequence[Any]) -> np.ndarray:
  """[len(records)] bool over the train split: pairs whose source sentence is also a
  validation or test source (compared by :func:`mt_flax.data.overlap.sentence_key`).

  Our builders split leak-free by construction (all False, nothing read); for any other
  TFDS dataset the training pipeline leaves these pairs out, so that no held-out source
  was seen in training.
  """
  out = np.zeros(len(records), bool)
  if config.data.name.split("/")[0].split(":")[0] in OUR_BUILDERS:
    return out
  sizes = split_sizes(config)
  held_out = {sentence_key(src) for split in ("validation", "test") if sizes.get(split)
              for src, _ in load_pairs(config, split)}
  src, tgt = config.data.src_lang, config.data.tgt_lang
  for start in range(0, len(records), 8192):
    texts = read_texts(read_records(records, start, start + 8192), src, tgt)
    out[start:start + len(texts)] = [sentence_key(s) in held_out for s, _ in texts]
  return out


def read_records(source: Sequence[Any], start: int, stop: int) -> list[Any]:
  """Records [start, stop) of a data source, read in one call when it can (much faster).

  Raises:
    DataError: a prepared file is damaged (named, with the folder to delete).
  """
  indices = list(range(start, min(stop, len(source))))
  try:
    if hasattr(source, "__getitems__"):
      return source.__getitems__(indices)
    return [source[i] for i in indices]
  except RuntimeError as e:
    path = _damaged_file(source, indices)
    if path is None:
      raise
    raise DataError(f"{path} is damaged ({_first_line(e)}); delete the prepared dataset folder "
                    f"{os.path.dirname(path)} and run again to prepare it again") from None


def _damaged_file(source: Any, indices: Sequence[int]) -> str | None:
  """The first file holding some of ``indices`` of a TFDS data source that cannot be read."""
  info = getattr(source, "dataset_info", None)
  if info is None:
    return None
  end = 0
  for instruction in info.splits[source.split].file_instructions:
    begin, end = end, end + instruction.take
    inside = [i for i in indices if begin <= i < end]
    try:
      if inside:
        source.__getitems__(inside)
    except RuntimeError:
      return instruction.filename
  return None


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__

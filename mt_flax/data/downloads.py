"""Downloaded archives of our TFDS builders (the manual folder, or a download), and what
the builders share (:class:`OurBuilder`).

An archive is looked for first in the manual folder (`data.manual_dir`, else
the environment variable `MT_FLAX_MANUAL_DIR`, else TFDS's
`<tfds_data_dir>/downloads/manual`) and downloaded only when it is not there.
The builders (`bible`, `spa_eng`) import this module; `sources` imports the
builders, so the imports point one way.
"""
from __future__ import annotations

import inspect
import os
import socket
import urllib.parse

import ml_collections
import tensorflow_datasets as tfds
from etils import epath

from mt_flax import paths
from mt_flax.errors import DataError

MANUAL_DIR_ENV = "MT_FLAX_MANUAL_DIR"


def manual_dir(config: ml_collections.ConfigDict) -> str | None:
  """The folder holding downloaded archives: `data.manual_dir`, else `$MT_FLAX_MANUAL_DIR`."""
  folder = config.data.manual_dir or os.environ.get(MANUAL_DIR_ENV, "")
  return os.fspath(paths.as_path(folder)) if folder else None


def manual_folder(dl_manager: tfds.download.DownloadManager) -> epath.Path:
  """The folder where TFDS looks for manually downloaded files."""
  try:
    return dl_manager.manual_dir
  except (AssertionError, ValueError):
    configured = getattr(dl_manager, "_manual_dir", None)
    return epath.Path(configured) if configured else dl_manager.download_dir / "manual"


def unreachable(url: str, timeout_s: float = 5.0) -> str | None:
  """Why `url`'s host cannot be reached now ("no network: ..."), or None if it can.

  A quick check that spares the download manager's retries when offline.
  """
  parts = urllib.parse.urlsplit(url)
  port = parts.port or (443 if parts.scheme == "https" else 80)
  try:
    with socket.create_connection((parts.hostname, port), timeout=timeout_s):
      return None
  except OSError as e:
    return f"no network: {parts.hostname}: {e.strerror or type(e).__name__}"


def locate(dl_manager: tfds.download.DownloadManager, filename: str, url: str | list[str],
           dataset: str, hint: str = "") -> epath.Path:
  """A local copy of `filename` from the manual folder, else downloaded from `url`.

  Raises:
    DataError: neither a local copy nor a download; says which file to put where.
  """
  folder = manual_folder(dl_manager)
  local = folder / filename
  if local.exists():
    return local
  urls = [url] if isinstance(url, str) else list(url)
  reasons = []
  for candidate in urls:
    problem = unreachable(candidate)
    if problem:
      reasons.append(problem)
      continue
    try:
      return epath.Path(dl_manager.download(candidate))
    except Exception as e:  # HTTP error, broken transfer: try the next URL
      reasons.append(f"{type(e).__name__}")
  raise DataError(
      f"{dataset}: {filename} not found in {folder} and downloading {urls[0]} failed "
      f"({'; '.join(reasons)}); put {filename} into {folder}, or into a folder named by "
      f"data.manual_dir or ${MANUAL_DIR_ENV}{hint}")


class OurBuilder:
  """Mixed into our builders, before ``tfds.core.GeneratorBasedBuilder``."""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # The builder's own file; TFDS's own lookup goes through package resources, which needs
    # the `importlib_resources` backport on some installs.
    return epath.Path(inspect.getfile(cls))

  def _nonempty_splits(self, by_split: dict[str, list]) -> dict:
    """The generators of the splits with examples: TFDS writes no empty split, so the
    metadata (``empty_splits``) names the empty ones."""
    self.info.metadata["empty_splits"] = [n for n, items in by_split.items() if not items]
    return {name: self._generate_examples(items) for name, items in by_split.items() if items}

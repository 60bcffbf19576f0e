"""Prepared TFDS data on gs:// (a GCS emulator) is read through a per-host local copy."""
import os

import pytest
from etils import epath

from mt_flax.config import with_defaults
from mt_flax.data import sources

LOCAL = os.path.expanduser("~/tensorflow_datasets/bible_en_es")


def upload(local: str, remote: epath.Path) -> int:
  count = 0
  for folder, _, names in os.walk(local):
    for name in names:
      target = remote / os.path.relpath(os.path.join(folder, name), local)
      target.parent.mkdir(parents=True, exist_ok=True)
      with open(os.path.join(folder, name), "rb") as f:
        target.write_bytes(f.read())
      count += 1
  return count


@pytest.mark.skipif(not os.path.isdir(LOCAL), reason="needs the prepared bible_en_es dataset")
def test_tfds_data_dir_on_gcs_reads_the_same_pairs(gcs_emulator, tmp_path, monkeypatch):
  remote = gcs_emulator.path("tensorflow_datasets")
  assert upload(LOCAL, epath.Path(remote) / "bible_en_es") >= 4
  monkeypatch.setattr(sources, "LOCAL_TFDS_COPIES", str(tmp_path / "copies"))
  config = with_defaults({"data": {"name": "bible_en_es"}})
  want = sources.load_pairs(config, "validation")
  config.data.tfds_data_dir = remote
  local = sources.tfds_data_dir(config)
  assert local.startswith(str(tmp_path / "copies"))
  assert sources.load_pairs(config, "validation") == want
  # $TFDS_DATA_DIR on gs:// too, and a second call reuses the copy
  config.data.tfds_data_dir = ""
  monkeypatch.setenv("TFDS_DATA_DIR", remote)
  assert sources.tfds_data_dir(config) == local
  with pytest.raises(sources.DataError, match="does not exist"):
    sources.local_copy(gcs_emulator.path("nothing_here"), "bible_en_es")


def test_compilation_cache_on_gcs_is_written_then_read(gcs_emulator):
  """``compilation_cache_dir=gs://...``: a second process loads the program the first compiled."""
  import subprocess
  import sys
  folder = gcs_emulator.path("jax_cache")
  script = (
      "import sys, jax, jax.numpy as jnp\n"
      "from jax._src import monitoring\n"
      "from mt_flax.paths import use_compilation_cache\n"
      "from mt_flax.config import with_defaults\n"
      "hits = []\n"
      "monitoring.register_event_listener(lambda e, **kw: hits.append(e) "
      "if e == '/jax/compilation_cache/cache_hits' else None)\n"
      "print(use_compilation_cache(with_defaults({'compilation_cache_dir': sys.argv[1]})))\n"
      "jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((32, 32))).block_until_ready()\n"
      "print(len(hits))\n")
  runs = [subprocess.run([sys.executable, "-c", script, folder], capture_output=True, text=True,
                         env={**gcs_emulator.env(), "JAX_PLATFORMS": "cpu",
                              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
          for _ in range(2)]
  assert [r.returncode for r in runs] == [0, 0], runs[-1].stderr
  (first, first_hits), (second, second_hits) = (r.stdout.split() for r in runs)
  assert first == second == folder
  assert int(first_hits) == 0 and int(second_hits) >= 1
  assert any(p.name.startswith("jit__lambda") for p in epath.Path(folder).iterdir())

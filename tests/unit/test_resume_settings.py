"""Resuming a workdir refuses changed batch settings, with one line naming key and values."""
import json

import pytest

from mt_flax import train
from mt_flax.config import ConfigError, with_defaults


def base_config():
  return with_defaults({"batch_tokens": 4096})


@pytest.mark.parametrize("key,value,message", [
    ("batch_tokens", 8192, "batch_tokens: 4096 -> 8192"),
    ("grad_accum_steps", 2, "grad_accum_steps: 1 -> 2"),
    ("parallelism", "pmap", "parallelism: 'jit' -> 'pmap'"),
    ("mesh.fsdp", 2, "mesh.fsdp: 1 -> 2"),
    ("data.batching", "pack", "data.batching: 'bucket' -> 'pack'"),
])
def test_changed_batch_setting_is_refused(tmp_path, key, value, message):
  train.write_run_info(str(tmp_path), base_config())
  changed = base_config()
  section, _, leaf = key.rpartition(".")
  (changed[section] if section else changed)[leaf] = value
  with pytest.raises(ConfigError) as err:
    train.write_run_info(str(tmp_path), changed)
  text = str(err.value)
  assert message in text and "\n" not in text
  # the workdir keeps the settings it was made with
  assert json.loads((tmp_path / "config.json").read_text())["batch_tokens"] == 4096


def test_changed_process_count_is_refused(tmp_path):
  train.write_run_info(str(tmp_path), base_config())
  run = json.loads((tmp_path / train.RUN_FILE).read_text())
  assert run == {"process_count": 1, "device_count": 8}
  (tmp_path / train.RUN_FILE).write_text(json.dumps({**run, "process_count": 2}))
  with pytest.raises(ConfigError, match="process_count: 2 -> 1"):
    train.write_run_info(str(tmp_path), base_config())


def test_same_settings_and_moved_data_resume(tmp_path):
  train.write_run_info(str(tmp_path), base_config())
  moved = base_config()
  moved.data.tfds_data_dir = "gs://bucket/tensorflow_datasets"
  moved.num_train_steps = 5000              # training length may change on resume
  train.write_run_info(str(tmp_path), moved)
  assert json.loads((tmp_path / "config.json").read_text())["num_train_steps"] == 5000


def test_prefetch_depth_may_change_on_resume(tmp_path):
  """How far ahead batches are built changes no batch; a workdir made before the key
  existed resumes too."""
  train.write_run_info(str(tmp_path), base_config())
  saved = json.loads((tmp_path / "config.json").read_text())
  del saved["data"]["prefetch"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  deeper = base_config()
  deeper.data.prefetch = 0
  train.write_run_info(str(tmp_path), deeper)
  assert json.loads((tmp_path / "config.json").read_text())["data"]["prefetch"] == 0

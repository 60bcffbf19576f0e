"""Resuming a workdir refuses changed batch settings, with one line naming key and values,
and accepts other processes and devices that make the same global batches."""
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


@pytest.mark.parametrize("saved,batching,message", [
    ({"process_count": 2, "device_count": 8, "batch_shards": 8}, "bucket", None),
    # made where mesh.data=-1 was 4 devices: global batches of other rows
    ({"process_count": 1, "device_count": 4, "batch_shards": 4}, "bucket",
     "batch_shards: 4 -> 8"),
    # packed batches hold a data state per process group
    ({"process_count": 2, "device_count": 8, "batch_shards": 8}, "pack", "process_count: 2 -> 1"),
    # a run.json saved before batch_shards was
    ({"process_count": 2, "device_count": 8}, "bucket", "process_count: 2 -> 1"),
])
def test_another_layout_resumes_with_the_same_global_batches(tmp_path, saved, batching,
                                                              message):
  """The run in this process (1 x 8 devices, mesh.data=-1: 8 batch shards) resumes a workdir
  made on the ``saved`` layout when its batch shards, hence its global batches, are the same,
  then records its own layout; otherwise it is refused in one line."""
  config = base_config()
  config.data.batching = batching
  train.write_run_info(str(tmp_path), config)
  run_file = tmp_path / train.RUN_FILE
  assert json.loads(run_file.read_text()) == {"process_count": 1, "device_count": 8,
                                              "batch_shards": 8}
  run_file.write_text(json.dumps(saved))
  if message is None:
    train.write_run_info(str(tmp_path), config)
    assert json.loads(run_file.read_text())["process_count"] == 1
    return
  with pytest.raises(ConfigError) as err:
    train.write_run_info(str(tmp_path), config)
  text = str(err.value)
  assert message in text and "batch_shards (the mesh's data x fsdp" in text and "\n" not in text
  assert json.loads(run_file.read_text()) == saved


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

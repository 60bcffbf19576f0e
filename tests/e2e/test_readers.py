"""What a run writes opens with the tools' own readers, in scripts that never import mt_flax.

- TensorBoard's ``EventAccumulator`` reads the training and validation scalars;
- plain Orbax restores a checkpoint's parameters into a tree whose leaves are mt_flax's;
- ``tfds.data_source`` opens the prepared dataset.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flax import linen as nn
import jax

READ_TENSORBOARD = r'''
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
out = {tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
assert "mt_flax" not in sys.modules
print(json.dumps(out))
'''

RESTORE_ORBAX = r'''
import sys
import numpy as np
import jax
import orbax.checkpoint as ocp
checkpointer = ocp.StandardCheckpointer()
# The run was saved sharded over 8 devices; this process has one: restore onto it.
meta = checkpointer.metadata(sys.argv[1])
meta = getattr(meta, "item_metadata", meta)
meta = getattr(meta, "tree", meta)
one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
tree = checkpointer.restore(sys.argv[1], target)
flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
np.savez(sys.argv[2], **flat)
assert "mt_flax" not in sys.modules
'''

OPEN_TFDS = r'''
import json, sys
import tensorflow_datasets as tfds
source = tfds.data_source(sys.argv[1], data_dir=sys.argv[2])
first = source["train"][0]
print(json.dumps({"splits": {k: len(v) for k, v in source.items()},
                  "keys": sorted(first), "en": first["en"].decode()}))
assert "mt_flax" not in sys.modules and "tensorflow" not in sys.modules
'''


def _script(tmp_path: Path, text: str, *args: str) -> str:
  path = tmp_path / "read.py"
  path.write_text(text)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run([sys.executable, str(path), *args], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_tensorboard_reads_the_training_scalars(trained_run, tmp_path):
  scalars = json.loads(_script(tmp_path, READ_TENSORBOARD,
                               os.path.join(trained_run, "tensorboard")).strip().splitlines()[-1])
  rows = [json.loads(line) for line in Path(trained_run, "metrics.jsonl").read_text().splitlines()]
  train = {r["step"]: r["loss"] for r in rows if "loss" in r and "split" not in r}
  valid = {r["step"]: r["eval_loss"] for r in rows if r.get("split") == "validation"}
  assert train and valid
  board_train = dict(map(tuple, scalars["train/loss"]))
  board_valid = dict(map(tuple, scalars["validation/eval_loss"]))
  for step, loss in train.items():
    assert board_train[step] == pytest.approx(loss, rel=1e-6)
  for step, loss in valid.items():
    assert board_valid[step] == pytest.approx(loss, rel=1e-6)


def test_plain_orbax_restores_the_parameters(trained_run, loaded_run, tmp_path):
  folder = Path(trained_run, "checkpoints", str(loaded_run.step), "params")
  _script(tmp_path, RESTORE_ORBAX, str(folder), str(tmp_path / "params.npz"))
  restored = dict(np.load(tmp_path / "params.npz"))
  ours = {"/".join(k.key for k in path): np.asarray(leaf) for path, leaf in
          jax.tree_util.tree_flatten_with_path(nn.meta.unbox(loaded_run.params))[0]}
  assert sorted(restored) == sorted(ours)
  for name, value in ours.items():
    assert restored[name].shape == value.shape and restored[name].dtype == value.dtype, name
    np.testing.assert_array_equal(restored[name], value, err_msg=name)


def test_tfds_data_source_opens_the_prepared_dataset(trained_run, tmp_path):
  data = json.loads(Path(trained_run, "config.json").read_text())["data"]
  data_dir = (data["tfds_data_dir"] or os.environ.get("TFDS_DATA_DIR")
              or os.path.expanduser("~/tensorflow_datasets"))
  found = json.loads(_script(tmp_path, OPEN_TFDS, data["name"], data_dir).strip().splitlines()[-1])
  assert set(found["splits"]) == {"train", "validation", "test"}
  assert all(n > 0 for n in found["splits"].values())
  assert {"en", "es"} <= set(found["keys"]) and found["en"].strip()

"""Orbax checkpoints: exact round trip of sharded state, retention, corrupt steps, inference."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mt_flax import checkpoint, sharding, steps
from mt_flax.model import Transformer, TransformerConfig

V = 40


@pytest.fixture(scope="module")
def trained():
  """A sharded (fsdp x tensor) state after 2 real updates, its partitioner, model and config."""
  model = Transformer(TransformerConfig(src_vocab_size=V, tgt_vocab_size=V, d_model=16,
                                        num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                                        mlp_dim=32, dropout_rate=0.1))
  config = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, warmup_steps=2, num_train_steps=10, grad_clip_norm=1.0,
      best_metric="eval_loss", best_mode="min", model=dict(d_model=16)))
  opt = steps.make_optimizer(config)
  part = sharding.JitPartitioner(sharding.make_mesh(dict(data=2, fsdp=2, tensor=2)))
  part.setup(functools.partial(steps.init_boxed_state, model, opt), jax.random.key(3))
  state = part.init_state(jax.random.key(3))
  step = part.compile_train_step(steps.make_train_step(model, opt, jit=False))
  rng = np.random.default_rng(0)
  batch = {"src": rng.integers(1, V, (8, 6)).astype(np.int32),
           "tgt_in": rng.integers(1, V, (8, 5)).astype(np.int32),
           "tgt_out": rng.integers(1, V, (8, 5)).astype(np.int32)}
  for _ in range(2):
    state, _ = step(state, part.shard_batch(batch))
  return part, model, config, state


def save_steps(workdir, trained, plan, keep=2):
  """Saves ``plan`` = [(step, metrics or None), ...]; returns the manager."""
  part, _, config, state = trained
  manager = checkpoint.make_manager(workdir, keep=keep, best_metric="eval_loss", best_mode="min")
  for step, metrics in plan:
    checkpoint.save(manager, step, state.replace(step=jnp.asarray(step, jnp.int32)),
                    {"epoch": 0, "batch": step}, config, metrics)
  manager.wait_until_finished()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config.to_dict(), f)
  return manager


def assert_same_tree(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_round_trip_is_exact_and_keeps_shardings(tmp_path, trained):
  part, _, _, state = trained
  manager = save_steps(str(tmp_path), trained, [(7, None)])
  restored, data_state, step = checkpoint.restore_latest_good(manager, part.abstract_state())
  assert step == 7 and int(restored.step) == 7
  assert data_state == {"epoch": 0, "batch": 7}
  assert_same_tree(restored.params, state.params)
  assert_same_tree(restored.opt_state, state.opt_state)
  np.testing.assert_array_equal(restored.rng, state.rng)
  for got, want in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
    assert got.sharding.spec == want.sharding.spec
  saved_config = json.loads((tmp_path / "checkpoints" / "7" / "config" / "metadata").read_text())
  assert saved_config["learning_rate"] == 1e-3


def test_keeps_last_k_and_the_best(tmp_path, trained):
  plan = [(1, {"eval_loss": 3.0}), (2, None), (3, {"eval_loss": 2.0}), (4, None),
          (5, {"eval_loss": 2.5}), (6, None)]
  manager = save_steps(str(tmp_path), trained, plan, keep=2)
  assert manager.all_steps() == [3, 5, 6]      # best (3) and the last two
  assert manager.best_step() == 3
  _, _, step = checkpoint.restore_for_inference(str(tmp_path), "best")
  assert step == 3
  _, _, step = checkpoint.restore_for_inference(str(tmp_path), "latest")
  assert step == 6


@pytest.mark.parametrize("damage", ["garbage", "truncate", "delete"])
def test_unreadable_newest_checkpoint_falls_back(tmp_path, trained, capfd, damage):
  part, _, _, state = trained
  manager = save_steps(str(tmp_path), trained, [(4, None), (8, None)])
  files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "checkpoints" / "8" / "params")
           for f in fs]
  for path in files:
    if damage == "garbage":
      with open(path, "wb") as f:
        f.write(b"not a checkpoint")
    elif damage == "truncate":
      os.truncate(path, os.path.getsize(path) // 2)
    else:
      os.remove(path)
  restored, data_state, step = checkpoint.restore_latest_good(manager, part.abstract_state())
  assert step == 4 and data_state == {"epoch": 0, "batch": 4}
  assert_same_tree(restored.params, state.params)
  err = capfd.readouterr().err
  assert "checkpoint step 8" in err and "unreadable" in err
  assert manager.all_steps() == [4]
  assert (tmp_path / "checkpoints_unreadable" / "8").is_dir()   # set aside, not deleted


def test_partial_save_directory_is_ignored(tmp_path, trained):
  part, _, _, _ = trained
  manager = save_steps(str(tmp_path), trained, [(4, None)])
  # what a process killed mid-save leaves behind: an uncommitted temporary step directory
  (tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-1234").mkdir()
  manager = checkpoint.make_manager(str(tmp_path))
  _, _, step = checkpoint.restore_latest_good(manager, part.abstract_state())
  assert step == 4


def test_restore_for_inference_gives_usable_params(tmp_path, trained):
  _, model, _, state = trained
  save_steps(str(tmp_path), trained, [(2, {"eval_loss": 1.0})])
  config, params, step = checkpoint.restore_for_inference(str(tmp_path))
  assert step == 2 and config.learning_rate == 1e-3
  leaf = jax.tree.leaves(params)[0]
  assert len(leaf.sharding.device_set) == 1                    # whole arrays on one device
  src = jnp.array([[5, 6, 7, 3, 0]], jnp.int32)
  tgt = jnp.array([[2, 9, 10, 0]], jnp.int32)
  apply = jax.jit(model.apply)
  got = apply({"params": params}, src, tgt)
  want = apply({"params": jax.device_get(state.params)}, src, tgt)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_missing_workdir_or_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
    checkpoint.restore_for_inference(str(tmp_path / "nope"))
  with pytest.raises(checkpoint.CheckpointError, match="no config.json"):
    checkpoint.restore_for_inference(str(tmp_path))
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoints"):
    checkpoint.restore_for_inference(str(tmp_path))
  with pytest.raises(ValueError, match="which="):
    checkpoint.restore_for_inference(str(tmp_path), "first")


def rewrite_saved_param(step_dir, name: str, value: float) -> None:
  """Writes ``value`` into element [0, 0] of the saved param ``name`` (e.g.
  ``decoder_0.mlp.Dense_0.kernel``) through TensorStore: the files stay readable,
  only the values differ."""
  import tensorstore as ts
  array = ts.open({"driver": "zarr", "kvstore": {
      "driver": "ocdbt", "base": f"file://{step_dir}/params/", "path": f"{name}/"}}).result()
  array[0, 0] = value


@pytest.mark.parametrize("damage", ["finite", "nan"])
def test_damaged_params_fail_verification(tmp_path, trained, capfd, damage):
  """A changed value that Orbax reads without complaint is caught by the saved digests."""
  part, _, _, state = trained
  manager = save_steps(str(tmp_path), trained, [(4, None), (8, {"eval_loss": 1.0})])
  step_dir = tmp_path / "checkpoints" / "8"
  rewrite_saved_param(step_dir, "decoder_0.mlp.Dense_0.kernel",
                      0.25 if damage == "finite" else float("nan"))
  expected = "failed verification"

  # inference (read-only): one line, falls back to step 4
  _, params, step = checkpoint.restore_for_inference(str(tmp_path), "best")
  assert step == 4
  assert_same_tree(params, jax.device_get(state.params))
  err = capfd.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "step 8" in err[0] and expected in err[0], err
  if damage == "finite":
    assert "params/decoder_0/mlp/Dense_0/kernel differs from the digest" in err[0]

  # training: one line, set aside, previous step restored
  restored, _, step = checkpoint.restore_latest_good(manager, part.abstract_state())
  assert step == 4
  assert_same_tree(restored.params, state.params)
  err = capfd.readouterr().err.strip().splitlines()
  assert len(err) == 1 and expected in err[0] and "moved to" in err[0], err
  assert manager.all_steps() == [4]
  assert (tmp_path / "checkpoints_unreadable" / "8").is_dir()


def test_non_finite_params_fail_without_digests_and_none_good_is_one_error(tmp_path, trained,
                                                                          capfd):
  """A checkpoint saved without digests is still refused when its params hold NaN."""
  part, _, _, state = trained
  manager = save_steps(str(tmp_path), trained, [(8, None)])
  rewrite_saved_param(tmp_path / "checkpoints" / "8", "decoder_0.mlp.Dense_0.kernel", float("inf"))
  import shutil
  shutil.rmtree(tmp_path / "checkpoints" / "8" / "digests")
  with pytest.raises(checkpoint.CheckpointError, match="no good checkpoint"):
    checkpoint.restore_for_inference(str(tmp_path), "latest")
  capfd.readouterr()
  with pytest.raises(checkpoint.CheckpointError, match=r"no good checkpoint .*step\(s\) 8"):
    checkpoint.restore_latest_good(manager, part.abstract_state())
  err = capfd.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "NaN or inf" in err[0], err


def test_fingerprints_ignore_sharding_and_catch_any_changed_bit():
  """A fingerprint is of the global array: the same under any sharding; one flipped bit, two
  swapped rows or a changed dtype change it; NaN/inf are found in the same pass."""
  rng = np.random.default_rng(1)
  tree = {"w": rng.standard_normal((16, 12)).astype(np.float32),
          "h": rng.standard_normal((8, 4)).astype(jnp.bfloat16),
          "count": np.arange(5, dtype=np.int32), "mask": np.array([True, False, True])}
  base, non_finite = checkpoint.check_tree(jax.tree.map(jnp.asarray, tree), "p")
  assert non_finite == [] and len(base) == 4 and all(len(v) == 16 for v in base.values())
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
  spec = jax.sharding.PartitionSpec
  sharded = {"w": jax.device_put(tree["w"], jax.sharding.NamedSharding(mesh, spec("a", "b"))),
             "h": jax.device_put(tree["h"], jax.sharding.NamedSharding(mesh, spec("b"))),
             "count": tree["count"], "mask": tree["mask"]}
  assert checkpoint.check_tree(sharded, "p")[0] == base
  flipped = tree["w"].copy()
  flipped.view(np.uint32)[3, 5] ^= 1                     # the lowest mantissa bit
  swapped = tree["w"][[1, 0] + list(range(2, 16))]
  for changed in (flipped, swapped, tree["w"].astype(np.float64).astype(np.float32) + 0.0):
    digest = checkpoint.check_tree({**tree, "w": changed}, "p")[0]["p/w"]
    assert (digest != base["p/w"]) == (not np.array_equal(changed, tree["w"]))
  assert checkpoint.check_tree({**tree, "w": tree["w"].astype(jnp.bfloat16)}, "p")[0][
      "p/w"] != base["p/w"]
  broken = tree["w"].copy()
  broken[2, 2] = np.inf
  assert checkpoint.check_tree({**tree, "w": broken}, "p")[1] == ["p/w"]

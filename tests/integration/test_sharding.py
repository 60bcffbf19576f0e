"""Parallel modes on 8 simulated CPU devices match a single-device run."""
import functools
from typing import Optional

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mt_flax import sharding, steps
from mt_flax.model import Transformer, TransformerConfig

V = 48
NUM_STEPS = 3


def tiny_model(dropout: float) -> Transformer:
  return Transformer(TransformerConfig(
      src_vocab_size=V, tgt_vocab_size=V, d_model=32, num_heads=4, num_encoder_layers=1,
      num_decoder_layers=1, mlp_dim=64, dropout_rate=dropout))


def make_batch(seed: int, rows: int = 16, s_len: int = 11, t_len: int = 9) -> dict:
  """Ragged real rows (src, BOS+y, y+EOS), 0 = pad."""
  rng = np.random.default_rng(seed)
  batch = {k: np.zeros((rows, n), np.int32)
           for k, n in (("src", s_len), ("tgt_in", t_len), ("tgt_out", t_len))}
  for r in range(rows):
    n, m = rng.integers(2, s_len + 1), rng.integers(2, t_len + 1)
    batch["src"][r, :n] = rng.integers(4, V, n)
    y = rng.integers(4, V, m - 1)
    batch["tgt_in"][r, :m] = np.concatenate([[2], y])
    batch["tgt_out"][r, :m] = np.concatenate([y, [3]])
  return batch


BATCHES = [make_batch(i) for i in range(NUM_STEPS)]


def run(partitioner, dropout: float, accum: int = 1, out: Optional[dict] = None
        ) -> tuple[list[float], dict, dict]:
  """Losses of NUM_STEPS updates, final params (host) and eval sums on the first batch.

  ``out``, if given, receives the final device ``state`` and the ``model``.
  """
  model = tiny_model(dropout)
  cfg = ml_collections.ConfigDict(dict(learning_rate=2e-3, warmup_steps=2, num_train_steps=10,
                                       grad_clip_norm=1.0, weight_decay=0.01))
  opt = steps.make_optimizer(cfg)
  partitioner.setup(functools.partial(steps.init_boxed_state, model, opt), jax.random.key(0))
  state = partitioner.init_state(jax.random.key(0))
  train = partitioner.compile_train_step(steps.make_train_step(
      model, opt, label_smoothing=0.1, grad_accum_steps=accum, jit=False))
  evaluate = partitioner.compile_eval_step(steps.make_eval_step(model, jit=False))
  losses = []
  for b in BATCHES:
    state, m = train(state, partitioner.shard_batch(b))
    losses.append(float(partitioner.metrics_to_host(m)["loss"]))
  sums = partitioner.metrics_to_host(evaluate(partitioner.params_of(state),
                                              partitioner.shard_batch(BATCHES[0])))
  if out is not None:
    out.update(state=state, model=model)
  return losses, jax.device_get(partitioner.to_checkpoint(state).params), sums


def single():
  return sharding.JitPartitioner(sharding.make_mesh(dict(data=1, fsdp=1, tensor=1),
                                                    jax.devices()[:1]))


@pytest.fixture(scope="module")
def reference():
  """Single-device runs, with and without dropout."""
  return {d: run(single(), d) for d in (0.0, 0.1)}


def assert_close(got, want):
  losses, params, sums = got
  np.testing.assert_allclose(losses, want[0], rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
               params, want[1])
  for k in sums:
    np.testing.assert_allclose(sums[k], want[2][k], rtol=2e-5)


@pytest.mark.parametrize("mesh,dropout,accum", [
    (dict(data=8, fsdp=1, tensor=1), 0.1, 1),    # pure data parallel
    (dict(data=2, fsdp=4, tensor=1), 0.0, 2),    # FSDP, with gradient accumulation
], ids=["data", "fsdp_accum"])
def test_jit_mesh_matches_single_device(reference, mesh, dropout, accum):
  assert jax.device_count() == 8
  got = run(sharding.JitPartitioner(sharding.make_mesh(mesh)), dropout, accum)
  assert_close(got, reference[dropout])   # dropout masks do not depend on the sharding


def test_fsdp_tensor_mesh_shards_activations(reference, capfd):
  """data=2 x fsdp=2 x tensor=2: logical constraints are live and cost no rematerialization.

  XLA reports an "Involuntary full rematerialization" on stderr when it can
  only reshard a tensor by replicating it; the compiles here must not.
  """
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  part, out = sharding.JitPartitioner(mesh), {}
  got = run(part, 0.1, out=out)
  # the encoder output, computed under the partitioner's context
  encode = jax.jit(part.in_context(lambda p, src: out["model"].apply(
      {"params": p}, src, method="encode")),
      in_shardings=(part.state_shardings.params, part.batch_sharding))
  src = part.shard_batch({"src": BATCHES[0]["src"]})["src"]
  lowered = encode.lower(out["state"].params, src)
  encoded = lowered.compile()(out["state"].params, src)
  assert "Involuntary full rematerialization" not in capfd.readouterr().err
  assert_close(got, reference[0.1])
  # an activation: batch split over data x fsdp, replicated over tensor
  assert encoded.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None, None)),
                                           encoded.ndim)
  assert "sharding_constraint" in lowered.as_text()
  # parameters and Adam moments stay where their logical axes put them
  state = out["state"]
  kernel = state.params["encoder_0"]["mlp"]["Dense_0"]["kernel"]
  assert kernel.sharding.spec == P("fsdp", "tensor")
  assert kernel.addressable_shards[0].data.shape == (16, 32)      # (32 / fsdp, 64 / tensor)
  adam = next(s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
              if hasattr(s, "mu"))
  assert adam.mu["encoder_0"]["self_attn"]["query"]["kernel"].sharding.spec == \
      P("fsdp", "tensor", None)


def test_pmap_matches_single_device(reference):
  # pmap draws dropout per device, so compare without dropout
  assert_close(run(sharding.PmapPartitioner(), dropout=0.0), reference[0.0])


def test_parameters_follow_logical_axes():
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  part = sharding.JitPartitioner(mesh)
  model = Transformer(TransformerConfig(src_vocab_size=50, tgt_vocab_size=50, d_model=32,
                                        num_heads=4, num_encoder_layers=1, num_decoder_layers=1,
                                        mlp_dim=64))
  opt = steps.make_optimizer(ml_collections.ConfigDict(dict(
      learning_rate=1e-3, warmup_steps=1, num_train_steps=2)))
  part.setup(functools.partial(steps.init_boxed_state, model, opt), jax.random.key(0))
  specs = jax.tree.map(lambda s: s.spec, part.state_shardings)
  layer = specs.params["encoder_0"]
  assert layer["mlp"]["Dense_0"]["kernel"] == P("fsdp", "tensor")        # (embed, mlp)
  assert layer["self_attn"]["query"]["kernel"] == P("fsdp", "tensor", None)  # (embed, heads, kv)
  assert specs.params["src_embed"]["embedding"]["embedding"] == P("tensor", "fsdp")
  # Adam moments follow their parameters; the step counter is replicated.
  adam = next(s for s in jax.tree.leaves(specs.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
              if hasattr(s, "mu"))
  assert adam.mu["encoder_0"]["mlp"]["Dense_0"]["kernel"] == P("fsdp", "tensor")
  assert adam.nu["encoder_0"]["self_attn"]["query"]["kernel"] == P("fsdp", "tensor", None)
  assert specs.step == P()


def test_indivisible_dimensions_stay_replicated():
  mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2))
  spec = sharding._divisible_spec((50, 30), P("tensor", "fsdp"), mesh)
  assert spec == P("tensor", None)        # 30 is not divisible by fsdp=4


def test_mesh_shape_resolution_and_errors():
  assert sharding.mesh_shape(dict(data=-1, fsdp=1, tensor=1), 8) == (8, 1, 1)
  assert sharding.mesh_shape(dict(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="uses 4 devices; expected 8"):
    sharding.mesh_shape(dict(data=2, fsdp=2, tensor=1), 8)
  with pytest.raises(ValueError, match="not divisible"):
    sharding.mesh_shape(dict(data=-1, fsdp=3, tensor=1), 8)
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.mesh_shape(dict(data=-1, fsdp=-1, tensor=1), 8)


def test_batch_rows_must_split_over_devices():
  with pytest.raises(ValueError, match="does not split over 8 devices"):
    sharding.PmapPartitioner().shard_batch(make_batch(0, rows=12))
  # single process: helpers are the identity
  b = make_batch(0)
  part = sharding.JitPartitioner(sharding.make_mesh(dict(data=4, fsdp=1, tensor=2)))
  assert sharding.common_batch_shape(b) is b and part.rows.take(b) is b
  assert part.rows == sharding.RowShare((0, 1, 2, 3), 4)     # one process holds every row
  assert sharding.any_process(True) and not sharding.any_process(False)

"""Pure train/eval steps: loss, schedule, optimizer, accumulation, dropout RNG."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mt_flax import steps
from mt_flax.model import Transformer, TransformerConfig

V = 40


def tiny_model(dropout: float = 0.0) -> Transformer:
  return Transformer(TransformerConfig(
      src_vocab_size=V, tgt_vocab_size=V, d_model=16, num_heads=2, num_encoder_layers=1,
      num_decoder_layers=1, mlp_dim=32, dropout_rate=dropout))


def train_config(**kw) -> ml_collections.ConfigDict:
  base = dict(learning_rate=3e-3, warmup_steps=4, num_train_steps=50, schedule="rsqrt",
              grad_clip_norm=1.0, weight_decay=0.0)
  base.update(kw)
  return ml_collections.ConfigDict(base)


@pytest.fixture(scope="module")
def setup():
  """One tiny model (no dropout), optimizer, jitted train step and initial state.

  The train step donates its state argument: pass it ``fresh(state)``.
  """
  model = tiny_model()
  cfg = train_config()
  opt = steps.make_optimizer(cfg)
  step = steps.make_train_step(model, opt, label_smoothing=0.1,
                               learning_rate_fn=steps.make_schedule(cfg))
  return model, opt, step, steps.create_train_state(model, opt, jax.random.key(0))


def fresh(state):
  return jax.tree.map(jnp.copy, state)


def make_batch(seed: int, rows: int = 8, s_len: int = 9, t_len: int = 7) -> dict:
  """Real token rows with ragged padding: src [B,S], tgt_in (BOS+y) and tgt_out (y+EOS) [B,T]."""
  rng = np.random.default_rng(seed)
  src = np.zeros((rows, s_len), np.int32)
  tgt_in = np.zeros((rows, t_len), np.int32)
  tgt_out = np.zeros((rows, t_len), np.int32)
  for r in range(rows):
    n, m = rng.integers(2, s_len + 1), rng.integers(2, t_len + 1)
    src[r, :n] = rng.integers(4, V, n)
    y = rng.integers(4, V, m - 1)
    tgt_in[r, :m] = np.concatenate([[2], y])
    tgt_out[r, :m] = np.concatenate([y, [3]])
  return {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out}


def test_token_losses_match_explicit_smoothed_target():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, V)).astype(np.float32) * 3
  labels = rng.integers(0, V, (3, 5))
  eps = 0.1
  loss, nll, _ = steps.token_losses(jnp.asarray(logits), jnp.asarray(labels), eps)
  logp = jax.nn.log_softmax(logits, -1)
  target = np.full((3, 5, V), eps / V)
  np.put_along_axis(target, labels[..., None], 1 - eps + eps / V, axis=-1)
  np.testing.assert_allclose(loss, -(target * logp).sum(-1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(nll, -np.take_along_axis(logp, labels[..., None], -1)[..., 0],
                             rtol=1e-5, atol=1e-5)
  plain, same, _ = steps.token_losses(jnp.asarray(logits), jnp.asarray(labels), 0.0)
  np.testing.assert_array_equal(plain, same)


def explicit_smoothed_loss(logits, labels, eps):
  """Reference: cross-entropy against the explicit smoothed target, by plain autodiff."""
  logp = jax.nn.log_softmax(logits, -1)
  target = (1 - eps) * jax.nn.one_hot(labels, logits.shape[-1]) + eps / logits.shape[-1]
  return -(target * logp).sum(-1), -jnp.take_along_axis(logp, labels[..., None], -1)[..., 0]


@pytest.mark.parametrize("with_bias, length", [(False, 6), (True, 7)])
def test_output_loss_sums_match_autodiff_in_any_chunking(monkeypatch, with_bias, length):
  """Chunked sums and their written gradients equal plain autodiff through whole logits,
  whether the positions split evenly, unevenly or not at all."""
  rng = np.random.default_rng(1)
  b, d = 4, 8
  states = jnp.asarray(rng.normal(size=(b, length, d)).astype(np.float32))
  kernel = jnp.asarray(rng.normal(size=(d, V)).astype(np.float32))
  bias = jnp.asarray(rng.normal(size=(V,)).astype(np.float32)) if with_bias else None
  labels = jnp.asarray(rng.integers(0, V, (b, length)))
  logits = states @ kernel + (0 if bias is None else bias)
  labels = labels.at[0].set(jnp.argmax(logits[0], -1))     # some correct predictions
  weights = jnp.asarray(rng.uniform(size=(b, length)).astype(np.float32)).at[1, -2:].set(0.0)
  args = (0, 1, 2) if with_bias else (0, 1)

  def reference(h, w, c, eps):
    loss, nll = explicit_smoothed_loss(h @ w + (0 if c is None else c), labels, eps)
    return jnp.sum(weights * loss), jnp.sum(weights * nll)

  for chunk_positions in (1, 3, length):
    monkeypatch.setattr(steps, "LOSS_CHUNK_BYTES", chunk_positions * b * V * 4)
    assert steps._time_chunk(b, length, V) == -(-length // -(-length // chunk_positions))
    for eps in (0.0, 0.1):
      ours = lambda h, w, c: steps.output_loss_sums(h, w, c, labels, weights, eps)[0]
      want = jax.grad(lambda h, w, c: reference(h, w, c, eps)[0], argnums=args)(
          states, kernel, bias)
      got = jax.grad(ours, argnums=args)(states, kernel, bias)
      for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
      loss, nll, correct = steps.output_loss_sums(states, kernel, bias, labels, weights, eps)
      np.testing.assert_allclose([loss, nll], reference(states, kernel, bias, eps), rtol=1e-5)
      top1 = (jnp.argmax(logits, -1) == labels).astype(np.float32)
      np.testing.assert_allclose(correct, jnp.sum(weights * top1), rtol=1e-6)
  # The metric sums carry no gradient (only the loss sum is differentiable).
  nll_grad = jax.grad(lambda h: steps.output_loss_sums(h, kernel, bias, labels, weights)[1])
  assert not np.any(nll_grad(states))


def test_loss_chunks_stay_few_for_long_rows_and_large_batches():
  assert steps._time_chunk(4096, 256, 32000) == 32        # 8 chunks, not 256
  assert steps._time_chunk(8, 32, 8000) == 32              # small logits: one chunk


def test_token_accuracy_has_no_argmax_and_shares_ties():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(4, 6, V)).astype(np.float32) * 3)
  labels = jnp.asarray(rng.integers(0, V, (4, 6)))
  labels = labels.at[0].set(jnp.argmax(logits[0], -1))
  _, _, correct = steps.token_losses(logits, labels, 0.1)
  np.testing.assert_array_equal(correct, (jnp.argmax(logits, -1) == labels).astype(np.float32))
  assert float(correct[0].sum()) == 6.0
  # Tied maxima share the credit: all-equal logits are right 1/V of the time.
  _, _, tied = steps.token_losses(jnp.zeros((2, 3, V)), labels[:2, :3], 0.1)
  np.testing.assert_allclose(tied, 1.0 / V, rtol=1e-6)


def test_a_perfect_smoothed_prediction_scores_loss_zero(setup):
  eps = 0.1
  target = np.full((2, 3, V), eps / V)
  labels = np.array([[5, 6, 7], [8, 9, 10]])
  np.put_along_axis(target, labels[..., None], 1 - eps + eps / V, axis=-1)
  loss, nll, _ = steps.token_losses(jnp.log(jnp.asarray(target, jnp.float32)), labels, eps)
  np.testing.assert_allclose(loss, steps.smoothing_constant(eps, V), rtol=1e-5)
  np.testing.assert_allclose(nll, -np.log(1 - eps + eps / V), rtol=1e-5)
  assert steps.smoothing_constant(0.0, V) == 0.0
  # The logged train loss is the summed smoothed loss per token minus that constant; nll is plain.
  model, opt, step, state = setup
  batch = make_batch(8)
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  _, sums = steps.loss_sums(state.params, batch, rng, model=model, label_smoothing=eps)
  _, m = step(fresh(state), batch)
  tokens = float(sums["tokens"])
  assert float(m["loss"]) == pytest.approx(float(sums["loss"]) / tokens
                                           - steps.smoothing_constant(eps, V), rel=1e-5)
  assert float(m["nll"]) == pytest.approx(float(sums["nll"]) / tokens, rel=1e-5)


def test_loss_and_gradients_ignore_pad_targets(setup):
  model, _, _, state = setup
  fn = functools.partial(steps.loss_sums, model=model, label_smoothing=0.1)
  grad_fn = jax.jit(jax.grad(fn, has_aux=True))
  batch = make_batch(1)
  grads, sums = grad_fn(state.params, batch, jax.random.key(1))
  # Extending every row with extra pad columns changes neither sums nor gradients.
  padded = {k: np.pad(v, [(0, 0), (0, 5)]) for k, v in batch.items()}
  grads2, sums2 = grad_fn(state.params, padded, jax.random.key(1))
  assert float(sums["tokens"]) == float((batch["tgt_out"] != 0).sum())
  for k in sums:
    np.testing.assert_allclose(sums[k], sums2[k], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, grads2)


def test_schedules():
  rsqrt = steps.make_schedule(train_config(warmup_steps=10, learning_rate=1.0))
  lrs = np.array([float(rsqrt(i)) for i in range(40)])
  np.testing.assert_allclose(lrs[:10], np.arange(1, 11) / 10, rtol=1e-6)   # linear warmup
  assert lrs.argmax() == 9
  np.testing.assert_allclose(lrs[39], np.sqrt(10 / 40), rtol=1e-6)         # inverse sqrt
  cos = steps.make_schedule(train_config(warmup_steps=10, learning_rate=2.0, schedule="cosine",
                                         num_train_steps=30, min_learning_rate_ratio=0.1))
  vals = np.array([float(cos(i)) for i in range(30)])
  assert vals.argmax() == 9 and np.all(np.diff(vals[9:]) <= 1e-7)
  np.testing.assert_allclose(vals[-1], 0.2, rtol=1e-5)                      # floor at the end
  with pytest.raises(ValueError, match="schedule"):
    steps.make_schedule(train_config(schedule="linear"))


def test_train_step_learns_and_reports_metrics(setup):
  _, _, step, state = setup
  state = fresh(state)
  batch = make_batch(2)
  losses = []
  for i in range(30):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
    if i == 0:
      assert float(m["learning_rate"]) == pytest.approx(3e-3 / 4)
      assert float(m["tokens"]) == (batch["tgt_out"] != 0).sum()
      assert float(m["finite"]) == 1.0 and float(m["grad_norm"]) > 0
  assert int(state.step) == 30
  assert losses[-1] < 0.6 * losses[0]


def test_train_step_without_the_gradient_norm_makes_the_same_update(setup):
  model, opt, step, state0 = setup
  quiet = steps.make_train_step(model, opt, label_smoothing=0.1, grad_norm=False,
                                learning_rate_fn=steps.make_schedule(train_config()))
  batch = make_batch(4)
  (a, ma), (b, mb) = step(fresh(state0), batch), quiet(fresh(state0), batch)
  assert "grad_norm" in ma and "grad_norm" not in mb and float(mb["finite"]) == 1.0
  assert float(ma["loss"]) == pytest.approx(float(mb["loss"]), rel=1e-6)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9)
  # a non-finite loss is still caught
  nan = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), state0.params)
  _, m = quiet(fresh(state0).replace(params=nan), batch)
  assert float(m["finite"]) == 0.0


def test_gradient_accumulation_matches_full_batch(setup):
  model, opt, full_step, state0 = setup
  batch = make_batch(3, rows=8)
  accum_step = steps.make_train_step(model, opt, label_smoothing=0.1, grad_accum_steps=4,
                                     learning_rate_fn=steps.make_schedule(train_config()))
  results = []
  for step in (full_step, accum_step):
    state = fresh(state0)
    for _ in range(3):
      state, m = step(state, batch)
    results.append((float(m["loss"]), state.params))
  assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               results[1][1], results[0][1])
  with pytest.raises(ValueError, match="grad_accum_steps=4"):
    accum_step(state, make_batch(3, rows=6))


def test_dropout_rng_comes_from_seed_and_step():
  model = tiny_model(dropout=0.3)
  opt = steps.make_optimizer(train_config())
  step = jax.jit(steps.make_train_step(model, opt, jit=False))
  batch = make_batch(4)
  state = steps.create_train_state(model, opt, jax.random.key(0))
  _, m_a = step(state, batch)
  _, m_b = step(state, batch)
  assert float(m_a["loss"]) == float(m_b["loss"])                 # same (seed, step): same masks
  _, m_c = step(state.replace(step=state.step + 7), batch)
  assert float(m_a["loss"]) != float(m_c["loss"])                 # another step: other masks
  # eval has no dropout: repeated evaluation is identical
  eval_step = steps.make_eval_step(model)
  assert jax.device_get(eval_step(state.params, batch)) == jax.device_get(
      eval_step(state.params, batch))


def test_weight_decay_spares_vectors(setup):
  _, _, _, state = setup
  opt = steps.make_optimizer(train_config(weight_decay=0.5, grad_clip_norm=0.0))
  opt_state = jax.jit(opt.init)(state.params)
  zero_grads = jax.tree.map(jnp.zeros_like, state.params)
  updates, _ = jax.jit(opt.update)(zero_grads, opt_state, state.params)
  for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
    assert (np.abs(np.asarray(u)).max() > 0) == (u.ndim >= 2), jax.tree_util.keystr(path)


def test_eval_step_and_metrics(setup):
  model, _, _, state = setup
  batch = make_batch(5)
  eval_step = steps.make_eval_step(model)
  sums = jax.device_get(eval_step(state.params, batch))
  assert sums["tokens"] == (batch["tgt_out"] != 0).sum()
  m = steps.eval_metrics(sums)
  assert m["eval_loss"] == pytest.approx(sums["nll"] / sums["tokens"])
  assert m["eval_perplexity"] == pytest.approx(np.exp(m["eval_loss"]))
  assert 0.0 <= m["eval_accuracy"] <= 1.0
  assert m["eval_loss"] == pytest.approx(np.log(V), rel=0.2)       # untrained: near uniform


def test_non_finite_loss_is_flagged(setup):
  _, _, step, state = setup
  bad = fresh(state).replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
  _, m = step(bad, make_batch(6))
  assert float(m["finite"]) == 0.0


def test_loss_chunks_off_the_cpu_hold_one_devices_rows():
  """Under a mesh the logits budget counts the rows one device holds: Transformer base at
  64 x 64 bf16 tokens per chip and a 32k vocabulary makes two chunks on any number of chips."""
  from mt_flax import sharding
  assert steps._time_chunk(64, 64, 32000, 2, steps.DEVICE_LOSS_CHUNK_BYTES) == 32
  assert steps._time_chunk(8, 96, 8000, 4, steps.DEVICE_LOSS_CHUNK_BYTES) == 96
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))
  rows = jax.device_count() * 64
  seen = []
  partitioner = sharding.JitPartitioner(mesh)
  jax.jit(partitioner.in_context(lambda: seen.append(steps._rows_per_device(rows))))()
  assert seen == [64] and steps._rows_per_device(rows) == rows

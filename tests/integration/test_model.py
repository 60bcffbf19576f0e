"""The Transformer against its masks: every invariance of ``mt_flax.invariance`` (the same
checks ``audit`` runs on trained models) on two model variants and three length pairs,
plus what those checks do not cover: packing, the Keras cross-mask bug, jit and grad,
dropout, bfloat16 and configuration errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mt_flax import invariance, masks
from mt_flax.model import Attention, Transformer, TransformerConfig, count_params

V = 48
ATOL = 2e-5
LENGTHS = [(5, 9), (9, 5), (7, 7)]  # (T_src, T_tgt): shorter, longer, equal

CONFIGS = {
    "pre_ln_shared": dict(share_embeddings=True, tie_output=True),
    "post_ln_learned_separate": dict(pre_ln=False, positions="learned", src_vocab_size=V + 7),
}


# Every length pair on the first variant; the second (post-LN, learned positions, separate
# vocabularies) on the pair where the source is longer than the target.
CASES = [("pre_ln_shared", *lengths) for lengths in LENGTHS] + [("post_ln_learned_separate", 9, 5)]


@pytest.fixture(scope="module")
def models(tiny_model):
  return {name: tiny_model(**overrides) for name, overrides in CONFIGS.items()}


def logits_of(model, params, src, tgt, **kw):
  return np.asarray(model.apply({"params": params}, jnp.asarray(src), jnp.asarray(tgt), **kw))


def valid(tokens):
  return np.asarray(tokens) != 0


@pytest.mark.parametrize("variant,s_len,t_len", CASES)
def test_every_invariance_holds(models, ragged_batch, variant, s_len, t_len):
  model, params = models[variant]
  src, tgt = ragged_batch(s_len * 10 + t_len, rows=4, s_len=s_len, t_len=t_len)
  results = invariance.run_checks(model, params, src, tgt)
  assert [r.name for r in results] == list(invariance.CHECKS)
  for r in results:
    assert r.passed, r.line()


@pytest.mark.parametrize("variant,s_len,t_len", CASES)
def test_packed_row_equals_pairs_alone(models, ragged_batch, variant, s_len, t_len):
  model, params = models[variant]
  src, tgt = ragged_batch(7, rows=2, s_len=s_len, t_len=t_len)
  ns, nt = valid(src).sum(1), valid(tgt).sum(1)
  row_s, row_t = int(ns.sum()) + 2, int(nt.sum()) + 3  # some trailing padding too
  p_src, p_tgt = np.zeros((1, row_s), np.int32), np.zeros((1, row_t), np.int32)
  s_seg, t_seg = np.zeros_like(p_src), np.zeros_like(p_tgt)
  s_pos, t_pos = np.zeros_like(p_src), np.zeros_like(p_tgt)
  so = to = 0
  for k in range(2):
    p_src[0, so:so + ns[k]], s_seg[0, so:so + ns[k]] = src[k, :ns[k]], k + 1
    s_pos[0, so:so + ns[k]] = np.arange(ns[k])
    p_tgt[0, to:to + nt[k]], t_seg[0, to:to + nt[k]] = tgt[k, :nt[k]], k + 1
    t_pos[0, to:to + nt[k]] = np.arange(nt[k])
    so, to = so + ns[k], to + nt[k]
  packed = logits_of(model, params, p_src, p_tgt, src_segments=s_seg, tgt_segments=t_seg,
                     src_positions=s_pos, tgt_positions=t_pos)
  to = 0
  for k in range(2):
    alone = logits_of(model, params, src[k:k + 1, :ns[k]], tgt[k:k + 1, :nt[k]])
    np.testing.assert_allclose(packed[0, to:to + nt[k]], alone[0], atol=ATOL)
    to += nt[k]


# --- The Keras bug: the target padding mask fed to cross-attention. ---------------------------

def test_keras_bug_is_a_shape_error_when_lengths_differ(tiny_model, ragged_batch,
                                                       keras_cross_mask, monkeypatch):
  model, params = tiny_model()
  src, tgt = ragged_batch(9, rows=2, s_len=5, t_len=8)
  logits_of(model, params, src, tgt)  # the correct mask works
  monkeypatch.setattr(masks, "cross_mask", keras_cross_mask)
  with pytest.raises((TypeError, ValueError)):
    logits_of(model, params, src, tgt)


def test_keras_bug_silently_changes_outputs_when_lengths_are_equal(tiny_model, ragged_batch,
                                                                  keras_cross_mask, monkeypatch):
  model, params = tiny_model()
  src, tgt = ragged_batch(10, rows=4, s_len=7, t_len=7)
  src[0, 2:], tgt[0, 6:] = 0, 0   # source shorter than target in row 0
  src[1, :], tgt[1, 3:] = 9, 0    # source longer than target in row 1
  right = logits_of(model, params, src, tgt)
  monkeypatch.setattr(masks, "cross_mask", keras_cross_mask)
  wrong = logits_of(model, params, src, tgt)
  m = valid(tgt)
  assert np.abs(wrong[m] - right[m]).max() > 1e-2


def test_attention_rejects_a_cross_mask_of_the_wrong_key_length():
  cfg = TransformerConfig(src_vocab_size=V, tgt_vocab_size=V, d_model=16, num_heads=2)
  attn = Attention(cfg, cross=True)
  x, kv = jnp.ones((2, 4, 16)), jnp.ones((2, 6, 16))
  params = attn.init(jax.random.PRNGKey(0), x, kv, jnp.ones((2, 1, 4, 6), bool), train=False)
  with pytest.raises((TypeError, ValueError)):
    attn.apply(params, x, kv, jnp.ones((2, 1, 4, 4), bool), train=False)


# --- jit, grad, dtypes, dropout. ---------------------------------------------------------------

def test_jit_and_grad_through_the_model(tiny_model, ragged_batch):
  model, params = tiny_model(share_embeddings=True, tie_output=True, dropout_rate=0.1)
  src, tgt = ragged_batch(11, rows=3, s_len=6, t_len=5)
  labels = np.where(tgt != 0, (tgt + 1) % V, 0)

  def loss(p, rng):
    logits = model.apply({"params": p}, src, tgt, train=True, rngs={"dropout": rng})
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1)[..., 0]
    return jnp.sum(nll * (labels != 0)) / jnp.sum(labels != 0)

  value, grads = jax.jit(jax.value_and_grad(loss))(params, jax.random.PRNGKey(1))
  assert np.isfinite(value)
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree_util.tree_leaves(grads)]
  assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) >= len(norms) - 1
  np.testing.assert_allclose(jax.jit(lambda p: model.apply({"params": p}, src, tgt))(params),
                             logits_of(model, params, src, tgt), atol=ATOL)


def test_dropout_is_active_only_in_training(tiny_model, ragged_batch):
  model, params = tiny_model(dropout_rate=0.1, attention_dropout_rate=0.2)
  src, tgt = ragged_batch(12, rows=2, s_len=6, t_len=6)
  a = logits_of(model, params, src, tgt, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
  b = logits_of(model, params, src, tgt, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  assert not np.allclose(a, b)
  np.testing.assert_allclose(logits_of(model, params, src, tgt),
                             logits_of(model, params, src, tgt), atol=0)


def test_bfloat16_compute_stays_close_to_float32(tiny_model, ragged_batch):
  model32, params = tiny_model()
  model16 = Transformer(model32.config.__class__(**{**model32.config.__dict__,
                                                    "dtype": "bfloat16"}))
  src, tgt = ragged_batch(13, rows=3, s_len=6, t_len=6)
  l32 = logits_of(model32, params, src, tgt)
  l16 = logits_of(model16, params, src, tgt)
  assert l16.dtype == np.float32  # logits come back in float32 for the loss
  assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.float32
  m = valid(tgt)
  scale = np.abs(l32[m]).max()
  assert np.abs(l16[m] - l32[m]).max() < 0.05 * scale
  p32 = jax.nn.softmax(l32[m])
  p16 = jax.nn.softmax(l16[m])
  assert float(jnp.abs(p32 - p16).sum(-1).max()) < 0.1


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="divisible"):
    TransformerConfig(src_vocab_size=V, tgt_vocab_size=V, d_model=30, num_heads=4)
  with pytest.raises(ValueError, match="share_embeddings"):
    TransformerConfig(src_vocab_size=V, tgt_vocab_size=V + 1, share_embeddings=True)
  with pytest.raises(ValueError, match="unknown model config keys"):
    TransformerConfig.from_config({"d_modle": 8}, V, V)


def test_shared_embeddings_and_tied_output_share_one_table(tiny_model):
  _, shared = tiny_model(share_embeddings=True, tie_output=True)
  _, separate = tiny_model()
  assert "tgt_embed" not in shared and "logits_dense" not in shared
  assert "tgt_embed" in separate and "logits_dense" in separate
  assert count_params(shared) < count_params(separate)

"""Invariance tests of the Transformer: each one fails if a mask is wrong."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mt_flax import masks
from mt_flax.model import Attention, Transformer, TransformerConfig, count_params, init_params

V = 60
ATOL = 2e-5
LENGTHS = [(5, 9), (9, 5), (7, 7)]  # (T_src, T_tgt): shorter, longer, equal

CONFIGS = {
    "pre_ln_shared": dict(share_embeddings=True, tie_output=True),
    "post_ln_learned_separate": dict(pre_ln=False, positions="learned", src_vocab_size=V + 7),
}


def make_model(**overrides):
  base = dict(src_vocab_size=V, tgt_vocab_size=V, d_model=32, num_heads=4, num_encoder_layers=2,
              num_decoder_layers=2, mlp_dim=64, dropout_rate=0.1, max_len=64)
  base.update(overrides)
  cfg = TransformerConfig(**base)
  model = Transformer(cfg)
  params = nn.meta.unbox(init_params(model, jax.random.PRNGKey(0)))
  return model, params


@pytest.fixture(scope="module", params=list(CONFIGS))
def model_and_params(request):
  return make_model(**CONFIGS[request.param])


def ragged_pairs(seed: int, batch: int, s_len: int, t_len: int):
  """Random src [B, S] and tgt_in [B, T] (BOS first), each row with its own valid length."""
  rng = np.random.default_rng(seed)
  src = np.zeros((batch, s_len), np.int32)
  tgt = np.zeros((batch, t_len), np.int32)
  for b in range(batch):
    n = rng.integers(1, s_len + 1)
    m = rng.integers(2, t_len + 1)
    src[b, :n] = rng.integers(4, V, n)
    tgt[b, 0] = 2
    tgt[b, 1:m] = rng.integers(4, V, m - 1)
  return src, tgt


def logits_of(model, params, src, tgt, **kw):
  return np.asarray(model.apply({"params": params}, jnp.asarray(src), jnp.asarray(tgt), **kw))


def valid(tokens):
  return np.asarray(tokens) != 0


@pytest.mark.parametrize("s_len,t_len", LENGTHS)
def test_causality(model_and_params, s_len, t_len):
  model, params = model_and_params
  src, tgt = ragged_pairs(1, 4, s_len, t_len)
  tgt[:, :] = np.where(tgt == 0, 7, tgt)  # full-length targets: every position is valid
  base = logits_of(model, params, src, tgt)
  for t in range(t_len - 1):
    changed = tgt.copy()
    changed[:, t + 1:] = (changed[:, t + 1:] + 11) % (V - 4) + 4
    out = logits_of(model, params, src, changed)
    np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], atol=ATOL)
    assert not np.allclose(out[:, t + 1:], base[:, t + 1:], atol=1e-3)


@pytest.mark.parametrize("s_len,t_len", LENGTHS)
def test_more_source_padding_changes_nothing(model_and_params, s_len, t_len):
  model, params = model_and_params
  src, tgt = ragged_pairs(2, 4, s_len, t_len)
  base = logits_of(model, params, src, tgt)
  longer = np.pad(src, [(0, 0), (0, 6)])
  out = logits_of(model, params, longer, tgt)
  m = valid(tgt)
  np.testing.assert_allclose(out[m], base[m], atol=ATOL)


@pytest.mark.parametrize("s_len,t_len", LENGTHS)
def test_encoder_output_at_padded_source_is_never_read(model_and_params, s_len, t_len):
  model, params = model_and_params
  src, tgt = ragged_pairs(3, 4, s_len, t_len)
  src = np.pad(src, [(0, 0), (0, 3)])  # every row has some padding
  encoded = model.apply({"params": params}, src, method=Transformer.encode)
  noise = 1e3 * jax.random.normal(jax.random.PRNGKey(5), encoded.shape)
  noisy = jnp.where(valid(src)[..., None], encoded, noise)
  dec = lambda e: np.asarray(model.apply({"params": params}, e, src, tgt,
                                         method=Transformer.decode))
  base, out = dec(encoded), dec(noisy)
  m = valid(tgt)
  np.testing.assert_allclose(out[m], base[m], atol=ATOL)
  # The noise itself is big enough to matter where the mask lets it through.
  noisy_valid = jnp.where(valid(src)[..., None], noise, encoded)
  assert not np.allclose(dec(noisy_valid)[m], base[m], atol=1e-2)


@pytest.mark.parametrize("s_len,t_len", LENGTHS)
def test_more_target_padding_changes_nothing(model_and_params, s_len, t_len):
  model, params = model_and_params
  src, tgt = ragged_pairs(4, 4, s_len, t_len)
  base = logits_of(model, params, src, tgt)
  out = logits_of(model, params, src, np.pad(tgt, [(0, 0), (0, 5)]))
  m = valid(tgt)
  np.testing.assert_allclose(out[:, :t_len][m], base[m], atol=ATOL)


@pytest.mark.parametrize("s_len,t_len", LENGTHS)
def test_batch_independence(model_and_params, s_len, t_len):
  model, params = model_and_params
  src, tgt = ragged_pairs(5, 4, s_len, t_len)
  base = logits_of(model, params, src, tgt)
  other_src, other_tgt = ragged_pairs(6, 4, s_len, t_len)
  src[2], tgt[2] = other_src[2], other_tgt[2]
  out = logits_of(model, params, src, tgt)
  for i in (0, 1, 3):
    m = valid(tgt[i])
    np.testing.assert_allclose(out[i][m], base[i][m], atol=ATOL)
  assert not np.allclose(out[2], base[2], atol=1e-3)


@pytest.mark.parametrize("s_len,t_len", LENGTHS)
def test_packed_row_equals_pairs_alone(model_and_params, s_len, t_len):
  model, params = model_and_params
  src, tgt = ragged_pairs(7, 2, s_len, t_len)
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


def test_cached_decoding_matches_full_decoder(model_and_params):
  model, params = model_and_params
  src, tgt = ragged_pairs(8, 3, 6, 7)
  tgt[:, :] = np.where(tgt == 0, 9, tgt)
  full = logits_of(model, params, src, tgt)
  v = {"params": params}
  encoded = model.apply(v, src, method=Transformer.encode)
  _, cache = model.apply(v, encoded, src, jnp.zeros_like(tgt), decode=True,
                         method=Transformer.decode, mutable=["cache"])
  steps = []
  for t in range(tgt.shape[1]):
    out, cache = model.apply({**v, **cache}, None, src, tgt[:, t:t + 1], decode=True,
                             method=Transformer.decode, mutable=["cache"])
    steps.append(np.asarray(out[:, 0]))
  np.testing.assert_allclose(np.stack(steps, 1), full, atol=ATOL)


# --- The Keras bug: the target padding mask fed to cross-attention. ---------------------------

def keras_cross_mask(tgt, src, tgt_segments=None, src_segments=None):
  """What the Keras example does: the decoder's own padding mask, [B, 1, T, T]."""
  return masks.padding_mask(tgt != 0, tgt != 0)


def test_keras_bug_is_a_shape_error_when_lengths_differ(monkeypatch):
  model, params = make_model()
  src, tgt = ragged_pairs(9, 2, 5, 8)
  logits_of(model, params, src, tgt)  # the correct mask works
  monkeypatch.setattr(masks, "cross_mask", keras_cross_mask)
  with pytest.raises((TypeError, ValueError)):
    logits_of(model, params, src, tgt)


def test_keras_bug_silently_changes_outputs_when_lengths_are_equal(monkeypatch):
  model, params = make_model()
  src, tgt = ragged_pairs(10, 4, 7, 7)
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

def test_jit_and_grad_through_the_model():
  model, params = make_model(share_embeddings=True, tie_output=True)
  src, tgt = ragged_pairs(11, 3, 6, 5)
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


def test_dropout_is_active_only_in_training():
  model, params = make_model(attention_dropout_rate=0.2)
  src, tgt = ragged_pairs(12, 2, 6, 6)
  a = logits_of(model, params, src, tgt, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
  b = logits_of(model, params, src, tgt, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  assert not np.allclose(a, b)
  np.testing.assert_allclose(logits_of(model, params, src, tgt),
                             logits_of(model, params, src, tgt), atol=0)


def test_bfloat16_compute_stays_close_to_float32():
  model32, params = make_model()
  model16 = Transformer(model32.config.__class__(**{**model32.config.__dict__,
                                                    "dtype": "bfloat16"}))
  src, tgt = ragged_pairs(13, 3, 6, 6)
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


def test_shared_embeddings_and_tied_output_share_one_table():
  _, shared = make_model(share_embeddings=True, tie_output=True)
  _, separate = make_model()
  assert "tgt_embed" not in shared and "logits_dense" not in shared
  assert "tgt_embed" in separate and "logits_dense" in separate
  assert count_params(shared) < count_params(separate)

"""The structured attention paths equal the dense-mask reference.

Splash runs here in interpret mode (the TPU kernel's program, interpreted on CPU):
slow, so shapes are tiny and each case is one compile of values and gradients.
cuDNN cannot run on CPU; its arguments (lengths from tokens) and its refusals are
tested instead.
"""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mt_flax import attention, invariance, masks, sharding
from mt_flax.errors import ConfigError
from mt_flax.model import Transformer, TransformerConfig

# Interpret-mode splash and XLA sum in different orders: float32 rounding, nothing more.
RTOL, ATOL = 1e-5, 1e-5
HEADS, HEAD_DIM = 2, 8


def packed_tokens(length: int) -> tuple[np.ndarray, np.ndarray]:
  """Tokens and segment ids ``[2, length]``: row 0 one padded pair, row 1 two pairs then padding."""
  tokens, segments = np.zeros((2, length), np.int32), np.zeros((2, length), np.int32)
  tokens[0, :length - 3], segments[0, :length - 3] = 5, 1
  first, second = length // 2, length - 2
  tokens[1, :second], segments[1, :first], segments[1, first:second] = 7, 1, 2
  return tokens, segments


CASES = {  # name: (query length, key length, causal)
    "encoder-self": (7, 7, False),
    "decoder-self": (9, 9, True),
    "cross": (9, 6, False),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_splash_equals_dense_values_and_gradients(name, packed):
  t, s, causal = CASES[name]
  q_tok, q_seg = packed_tokens(t)
  k_tok, k_seg = (q_tok, q_seg) if t == s else packed_tokens(s)
  segments = dict(q_segments=q_seg, k_segments=k_seg) if packed else {}
  structure = masks.attention_structure(q_tok, k_tok, causal=causal, **segments)
  rng = np.random.default_rng(t + s)
  q, k, v = (jnp.asarray(rng.normal(size=(2, n, HEADS, HEAD_DIM)), jnp.float32)
             for n in (t, s, s))
  real = jnp.asarray(q_tok != 0)[:, :, None, None]       # padded query rows are read by nobody
  cotangent = jnp.asarray(rng.normal(size=q.shape), jnp.float32) * real

  def values_and_grads(implementation):
    out, pullback = jax.vjp(lambda *a: attention.attend(*a, structure, implementation), q, k, v)
    return (out * real, *pullback(cotangent))

  dense = values_and_grads("xla")
  for got, want in zip(jax.jit(lambda: values_and_grads("splash"))(), dense):
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  assert float(jnp.abs(dense[2]).max()) > 0        # the keys do receive gradient


def test_splash_under_a_mesh_runs_per_device():
  """Under a mesh, splash runs on each device's rows and heads (XLA cannot split a
  Mosaic kernel); 2 batch ways x 2 head ways give the dense values."""
  tokens, segments = packed_tokens(7)
  structure = masks.attention_structure(tokens, tokens, causal=True, q_segments=segments,
                                        k_segments=segments)
  q = jnp.asarray(np.random.default_rng(1).normal(size=(2, 7, HEADS, HEAD_DIM)), jnp.float32)
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 1, 2), sharding.MESH_AXES)

  def on_mesh(q):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
        nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
      return attention.attend(q, q, q, structure, "splash")

  heads = NamedSharding(mesh, P(sharding.BATCH_AXES, None, "tensor", None))
  out = jax.jit(on_mesh, in_shardings=heads)(q)
  assert "shard_map" in str(jax.make_jaxpr(on_mesh)(q))
  dense = attention.attend(q, q, q, structure, "xla")
  real = (tokens != 0)
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(dense)[real], rtol=RTOL, atol=ATOL)


def test_structure_gives_the_dense_masks():
  src, src_seg = packed_tokens(6)
  tgt, tgt_seg = packed_tokens(9)
  for seg in (False, True):
    s_seg, t_seg = (src_seg, tgt_seg) if seg else (None, None)
    structure = lambda q, k, causal, q_seg, k_seg: masks.structure_mask(
        masks.attention_structure(q, k, causal=causal, q_segments=q_seg, k_segments=k_seg))
    np.testing.assert_array_equal(structure(src, src, False, s_seg, s_seg),
                                  masks.encoder_self_mask(src, s_seg))
    np.testing.assert_array_equal(structure(tgt, tgt, True, t_seg, t_seg),
                                  masks.decoder_self_mask(tgt, t_seg))
    np.testing.assert_array_equal(structure(tgt, src, False, t_seg, s_seg),
                                  masks.cross_mask(tgt, src, t_seg, s_seg))


def test_mask_audit_passes_with_splash(tiny_model, ragged_batch):
  layers = dict(d_model=16, num_heads=HEADS, num_encoder_layers=1, num_decoder_layers=1,
                mlp_dim=32)
  reference, params = tiny_model(**layers)
  model = Transformer(TransformerConfig(**{**reference.config.__dict__, "attention": "splash"}))
  src, tgt = ragged_batch(3, rows=3, s_len=6, t_len=9)
  for result in invariance.run_checks(model, params, src, tgt):
    assert result.passed, result.line()
  tokens, segments = packed_tokens(9)
  packed = dict(src_segments=segments, tgt_segments=segments)
  logits = [jax.jit(lambda p, m=m: m.apply({"params": p}, tokens, tokens, **packed))(params)
            for m in (reference, model)]
  real = tokens != 0
  np.testing.assert_allclose(logits[1][real], logits[0][real], rtol=RTOL, atol=ATOL)


def test_cudnn_lengths_count_real_tokens():
  tokens, segments = packed_tokens(7)
  structure = masks.attention_structure(tokens, tokens[:, :5], causal=True)
  q_len, kv_len = attention.cudnn_lengths(structure)
  np.testing.assert_array_equal(q_len, [4, 5])
  np.testing.assert_array_equal(kv_len, [4, 5])


def test_cudnn_refusals_are_one_line():
  tokens, _ = packed_tokens(4)
  structure = masks.attention_structure(tokens, tokens, causal=False)
  q = jnp.zeros((2, 4, HEADS, HEAD_DIM), jnp.bfloat16)
  with pytest.raises(ConfigError, match="model.attention='cudnn' needs a GPU") as e:
    attention.attend(q, q, q, structure, "cudnn")
  assert "\n" not in str(e.value) and "'xla', 'cudnn', 'splash'" in str(e.value)
  base = dict(src_vocab_size=8, tgt_vocab_size=8, d_model=8, num_heads=2)
  with pytest.raises(ConfigError, match="model.attention='flash'.*'xla', 'cudnn', 'splash'"):
    TransformerConfig(**base, attention="flash")
  with pytest.raises(ConfigError, match="model.dtype bfloat16 or float16"):
    TransformerConfig(**base, attention="cudnn")


def test_cudnn_takes_packed_rows_to_xla_with_one_notice(monkeypatch, caplog):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  attention._warn_packed_once.cache_clear()
  tokens, segments = packed_tokens(5)
  structure = masks.attention_structure(tokens, tokens, causal=True, q_segments=segments,
                                        k_segments=segments)
  q = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, HEADS, HEAD_DIM)), jnp.float32)
  with caplog.at_level(logging.WARNING, logger="mt_flax.attention"):
    outs = [attention.attend(q, q, q, structure, "cudnn") for _ in range(2)]
  assert sum("packed rows" in r.getMessage() for r in caplog.records) == 1
  dense = attention.dense_attention(q, q, q, masks.structure_mask(structure))
  np.testing.assert_array_equal(outs[0], dense)


def test_dense_attention_equals_jax_in_values_and_gradients_with_fully_masked_rows():
  """The reference path (float32 softmax over scores kept in the compute dtype, its own
  gradient) equals ``jax.nn.dot_product_attention``, also where a query row sees no key."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 5, HEADS, HEAD_DIM)), jnp.float32) for _ in "qkv")
  mask = jnp.asarray(rng.random((2, 1, 5, 5)) > 0.3).at[:, :, 0].set(False)
  ours = lambda q, k, v: attention.dense_attention(q, k, v, mask)
  ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask)
  np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-6)
  grads = [jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
           for f in (ours, ref)]
  for got, want in zip(*grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # bfloat16: the weights come out in bfloat16, normalised in float32 before rounding
  weights = attention.masked_softmax(jnp.einsum("btnh,bsnh->bnts", q, k).astype(jnp.bfloat16),
                                     mask, HEAD_DIM ** -0.5)
  assert weights.dtype == jnp.bfloat16
  np.testing.assert_allclose(jnp.sum(weights.astype(jnp.float32), -1), 1.0, atol=2e-2)

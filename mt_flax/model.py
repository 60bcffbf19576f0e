"""Encoder-decoder Transformer in ``flax.linen`` with an incremental-decoding cache.

All masking goes through :mod:`mt_flax.masks`; the masks are built once per
call at the top of the encoder/decoder and carried unchanged through every
layer: dense boolean masks for ``attention="xla"``, or their
:class:`~mt_flax.masks.Structure` for the fused kernels of :mod:`mt_flax.attention`
(incremental decoding always uses the dense masks). Parameters carry logical
axis names (``vocab``, ``embed``, ``heads``, ``kv``, ``mlp``) so that
:mod:`mt_flax.sharding` can map them onto a mesh.

Incremental decoding (used by :mod:`mt_flax.decode`)::

    enc = model.apply(v, src, method=Transformer.encode)
    # 1) allocate the cache: self-attention K/V slots for max_len steps, and
    #    the cross-attention K/V of the encoder output, computed once.
    _, cache = model.apply(v, enc, src, jnp.zeros((B, max_len), jnp.int32),
                           decode=True, method=Transformer.decode,
                           mutable=["cache"])
    # 2) one token per call; the cache index advances by one.
    logits, cache = model.apply({**v, **cache}, None, src, tok,   # tok [B, 1]
                                decode=True, method=Transformer.decode,
                                mutable=["cache"])
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mt_flax import attention, masks
from mt_flax.errors import ConfigError

Array = jnp.ndarray


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyperparameters of :class:`Transformer`.

  ``share_embeddings`` uses one embedding table for source and target (needs
  equal vocabulary sizes); ``tie_output`` projects decoder states to logits
  with the transpose of the target embedding.
  """
  src_vocab_size: int
  tgt_vocab_size: int
  d_model: int = 512
  num_heads: int = 8
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  mlp_dim: int = 2048
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.0
  share_embeddings: bool = False
  tie_output: bool = False
  pre_ln: bool = True
  positions: str = "sinusoidal"   # "sinusoidal" or "learned"
  max_len: int = 1024             # longest position for learned positions
  dtype: str = "float32"          # compute dtype, e.g. "bfloat16"
  param_dtype: str = "float32"
  attention: str = "xla"          # "xla" (dense mask), "cudnn" (GPU) or "splash" (TPU)

  def __post_init__(self):
    if self.d_model % self.num_heads:
      raise ValueError(f"model.d_model={self.d_model} must be divisible by "
                       f"model.num_heads={self.num_heads}")
    if self.positions not in ("sinusoidal", "learned"):
      raise ValueError(f"model.positions={self.positions!r}: expected 'sinusoidal' or 'learned'")
    if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
      raise ValueError("model.share_embeddings needs equal source and target vocabulary "
                       f"sizes, got {self.src_vocab_size} and {self.tgt_vocab_size}")
    for field in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, field))
      except TypeError:
        raise ValueError(f"model.{field}={getattr(self, field)!r} is not a dtype name") from None
    if self.attention not in attention.IMPLEMENTATIONS:
      raise ConfigError(f"model.attention={self.attention!r}: expected one of "
                        f"{attention.NAMES}")
    if self.attention == "cudnn" and jnp.dtype(self.dtype) not in (jnp.bfloat16, jnp.float16):
      raise ConfigError(f"model.attention='cudnn' needs model.dtype bfloat16 or float16, "
                        f"got {self.dtype!r}")

  @classmethod
  def from_config(cls, model_cfg: Any, src_vocab_size: int, tgt_vocab_size: int,
                  **overrides) -> "TransformerConfig":
    """Builds from a ``config.model`` ConfigDict (or dict) plus vocabulary sizes."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = dict(model_cfg)
    unknown = sorted(set(values) - fields)
    if unknown:
      raise ValueError(f"unknown model config keys {unknown}; expected some of {sorted(fields)}")
    values.update(src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size, **overrides)
    return cls(**values)

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self):
    return jnp.dtype(self.param_dtype)


def sinusoidal_positions(positions: Array, d_model: int) -> Array:
  """Sinusoidal encodings (Vaswani et al. 2017). ``[B, T]`` ints -> ``[B, T, D]`` float32."""
  half = d_model // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
  angles = positions.astype(jnp.float32)[..., None] * freqs
  enc = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  if d_model % 2:
    enc = jnp.pad(enc, [(0, 0)] * (enc.ndim - 1) + [(0, 1)])
  return enc


class _LogicalKernel(nn.LogicallyPartitioned):
  """A logically partitioned kernel that ``DenseGeneral`` may see flattened.

  ``DenseGeneral`` initialises its kernel flat (2-D) and reshapes it; unboxing
  the flat value under a mesh would constrain it with the full-rank names, so a
  value whose rank differs from its names is returned unconstrained.
  """

  def unbox(self, apply_constraint: bool = True) -> Any:
    if jnp.ndim(self.value) != len(self.names):
      return self.value
    return super().unbox(apply_constraint)


def _matrix_dot_general(lhs: Array, rhs: Array, dimension_numbers, precision=None,
                        preferred_element_type=None) -> Array:
  """``lax.dot_general`` for the dense layers; on the CPU as one 2-D matrix product.

  The attention and MLP projections contract the trailing axes of ``lhs`` with
  the leading axes of ``rhs`` (``[B, T, D] x [D, N, H]``, ``[B, T, N, H] x [N, H, D]``,
  ``[B, T, D] x [D, F]``). Written over 3-D activations or several contracting
  axes, the backward products contract two axes at once and XLA's CPU backend
  copies a transposed kernel or gradient for them on every step; reshaped to
  ``[rows, K] x [K, cols]`` (free for row-major arrays) it does not. On a TPU the
  opposite holds: its tiled layouts make those reshapes copies, so other platforms
  keep ``lax.dot_general`` (``jax.lax.platform_dependent`` picks one when lowering).
  Same values, same parameters.
  """
  plain = lambda a, b: jax.lax.dot_general(a, b, dimension_numbers, precision=precision,
                                           preferred_element_type=preferred_element_type)
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  k = len(lhs_contract)
  if (lhs_batch or rhs_batch or tuple(lhs_contract) != tuple(range(lhs.ndim - k, lhs.ndim))
      or tuple(rhs_contract) != tuple(range(k))):
    return plain(lhs, rhs)

  def flat(a, b):
    inner = int(np.prod(b.shape[:k]))
    out = jnp.matmul(a.reshape(-1, inner), b.reshape(inner, -1), precision=precision,
                     preferred_element_type=preferred_element_type)
    return out.reshape(a.shape[:a.ndim - k] + b.shape[k:])

  return jax.lax.platform_dependent(lhs, rhs, cpu=flat, default=plain)


def _float32_dot_general(lhs: Array, rhs: Array, dimension_numbers, precision=None) -> Array:
  """``lax.dot_general`` summing in float32 whatever the operands' dtype: the logits."""
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=jnp.float32)


def _dense_init(axes):
  init = nn.initializers.xavier_uniform()
  return lambda key, shape, dtype=jnp.float32: _LogicalKernel(init(key, shape, dtype), axes)


class Attention(nn.Module):
  """Multi-head attention; masking only through ``mask``: a dense boolean mask, or
  a :class:`~mt_flax.masks.Structure` for ``config.attention`` (with attention
  dropout in training, the structure's dense mask on the reference path).

  With ``decode=True`` it keeps a cache: self-attention stores keys/values per
  step, cross-attention stores the keys/values of the encoder output once.
  """
  config: TransformerConfig
  cross: bool = False

  @nn.compact
  def __call__(self, x: Array, kv: Optional[Array], mask: Array, *, train: bool,
               decode: bool = False, index: Optional[Array] = None) -> Array:
    """x: ``[B, T, D]`` queries; kv: ``[B, S, D]`` (cross) or None (self); mask
    ``[B|1, 1, T, S]`` or a Structure."""
    cfg = self.config
    n, h = cfg.num_heads, cfg.d_model // cfg.num_heads
    proj = lambda name: nn.DenseGeneral(
        (n, h), dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, use_bias=False,
        kernel_init=_dense_init(("embed", "heads", "kv")), dot_general=_matrix_dot_general,
        name=name)
    q = proj("query")(x)
    source = x if not self.cross else kv

    if not decode:
      k, v = proj("key")(source), proj("value")(source)
    elif self.cross:
      if self.has_variable("cache", "cached_key"):
        k, v = self.get_variable("cache", "cached_key"), self.get_variable("cache", "cached_value")
      else:  # allocating the cache: project the encoder output once
        k, v = proj("key")(kv), proj("value")(kv)
        self.put_variable("cache", "cached_key", k)
        self.put_variable("cache", "cached_value", v)
    else:
      initialised = self.has_variable("cache", "cached_key")
      k_new, v_new = proj("key")(x), proj("value")(x)
      ck = self.variable("cache", "cached_key", jnp.zeros_like, k_new)
      cv = self.variable("cache", "cached_value", jnp.zeros_like, v_new)
      if initialised:
        if x.shape[1] != 1:
          raise ValueError(f"incremental decoding takes one token per call, got {x.shape[1]}")
        start = (0, index, 0, 0)
        ck.value = jax.lax.dynamic_update_slice(ck.value, k_new.astype(ck.value.dtype), start)
        cv.value = jax.lax.dynamic_update_slice(cv.value, v_new.astype(cv.value.dtype), start)
        k, v = ck.value, cv.value
      else:
        k, v = k_new, v_new

    dropout = cfg.attention_dropout_rate if train else 0.0
    structured = isinstance(mask, masks.Structure)
    if structured and dropout == 0.0:
      out = attention.attend(q, k, v, mask, cfg.attention)
    else:
      drop = None
      if dropout > 0.0:
        rng = self.make_rng("dropout")
        drop = lambda weights: apply_dropout(weights, dropout, rng)
      out = attention.dense_attention(q, k, v, masks.structure_mask(mask) if structured else mask,
                                      drop)
    return nn.DenseGeneral(cfg.d_model, axis=(-2, -1), dtype=cfg.compute_dtype,
                           param_dtype=cfg.params_dtype, use_bias=False,
                           kernel_init=_dense_init(("heads", "kv", "embed")),
                           dot_general=_matrix_dot_general, name="out")(out)


def _mix32(x: Array) -> Array:
  """A bijective avalanche mix of uint32 words (xor-shift-multiply, "lowbias32")."""
  x = x ^ (x >> 16)
  x = x * np.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * np.uint32(0x846CA68B)
  return x ^ (x >> 16)


def dropout_keep_mask(rng: jax.Array, shape: tuple[int, ...], rate: float) -> Array:
  """Boolean keep mask of ``shape``, each entry True with probability ``1 - rate``.

  Counter-based: two 32-bit seeds drawn from ``rng`` (one small Threefry call)
  key a hash of each entry's flat index, ``mix(mix(index ^ s0) + s1)``, and an
  entry is kept when the hash is at least ``rate * 2**32``. Every entry is an
  elementwise function of iotas, so XLA fuses the mask into its consumer; the
  mask is a pure function of ``(rng, shape)``, so equal keys give equal masks.
  """
  size = int(np.prod(shape, dtype=np.int64))
  if size >= 2 ** 32:
    raise ValueError(f"dropout mask of shape {shape} has {size} entries; at most 2**32 - 1")
  seeds = jax.random.bits(rng, (2,), jnp.uint32)
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * np.uint32(stride)
    stride *= shape[dim]
  threshold = np.uint32(min(round(rate * 2.0 ** 32), 2 ** 32 - 1))
  return _mix32(_mix32(index ^ seeds[0]) + seeds[1]) >= threshold


def apply_dropout(x: Array, rate: float, rng: jax.Array) -> Array:
  """``x`` with entries zeroed at ``rate`` and the rest scaled by ``1 / (1 - rate)``."""
  if rate <= 0.0:
    return x
  if rate >= 1.0:
    return jnp.zeros_like(x)
  keep = dropout_keep_mask(rng, x.shape, rate)
  return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - rate), x.dtype), jnp.zeros((), x.dtype))


class Dropout(nn.Module):
  """Dropout drawing its mask from :func:`dropout_keep_mask` with the ``dropout`` RNG stream."""
  rate: float

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    if deterministic or self.rate <= 0.0:
      return x
    return apply_dropout(x, self.rate, self.make_rng("dropout"))


class MLP(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    cfg = self.config
    y = nn.Dense(cfg.mlp_dim, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                 kernel_init=_dense_init(("embed", "mlp")), dot_general=_matrix_dot_general,
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(x)
    y = Dropout(cfg.dropout_rate)(nn.relu(y), deterministic=not train)
    return nn.Dense(cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                    kernel_init=_dense_init(("mlp", "embed")), dot_general=_matrix_dot_general,
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(y)


def _layer_norm(cfg: TransformerConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


def _sublayer(cfg: TransformerConfig, x: Array, f, name: str, train: bool) -> Array:
  """``x + dropout(f(LN(x)))`` (pre-LN) or ``LN(x + dropout(f(x)))`` (post-LN)."""
  norm = _layer_norm(cfg, f"{name}_norm")
  drop = Dropout(cfg.dropout_rate)
  if cfg.pre_ln:
    return x + drop(f(norm(x)), deterministic=not train)
  return norm(x + drop(f(x), deterministic=not train))


class EncoderLayer(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, *, train: bool) -> Array:
    cfg = self.config
    attn, mlp = Attention(cfg, name="self_attn"), MLP(cfg, name="mlp")
    x = _sublayer(cfg, x, lambda y: attn(y, None, mask, train=train), "self_attn", train)
    return _sublayer(cfg, x, lambda y: mlp(y, train=train), "mlp", train)


class DecoderLayer(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, encoded: Optional[Array], self_mask: Array, cross_mask: Array, *,
               train: bool, decode: bool = False, index: Optional[Array] = None) -> Array:
    cfg = self.config
    self_attn = Attention(cfg, name="self_attn")
    cross_attn = Attention(cfg, cross=True, name="cross_attn")
    mlp = MLP(cfg, name="mlp")
    x = _sublayer(cfg, x, lambda y: self_attn(y, None, self_mask, train=train, decode=decode,
                                              index=index), "self_attn", train)
    x = _sublayer(cfg, x, lambda y: cross_attn(y, encoded, cross_mask, train=train,
                                               decode=decode), "cross_attn", train)
    return _sublayer(cfg, x, lambda y: mlp(y, train=train), "mlp", train)


class Embedder(nn.Module):
  """Token embedding scaled by sqrt(D), plus sinusoidal or learned positions."""
  config: TransformerConfig
  vocab_size: int

  def setup(self):
    cfg = self.config
    self.embedding = nn.Embed(
        self.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(stddev=cfg.d_model ** -0.5), ("vocab", "embed")))
    if cfg.positions == "learned":
      self.pos_embedding = nn.Embed(
          cfg.max_len, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
          embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                      (None, "embed")))

  def __call__(self, tokens: Array, positions: Array) -> Array:
    """tokens, positions: int ``[B, T]`` -> ``[B, T, D]``."""
    cfg = self.config
    # The lookup reads a table gathered along ``embed``: a gather from a table
    # split along ``embed`` into rows split along ``batch`` (both on ``fsdp``)
    # is a resharding XLA can only do by replicating the whole result.
    table = nn.with_logical_constraint(
        jnp.asarray(self.embedding.embedding, cfg.compute_dtype), ("vocab", None))
    x = jnp.take(table, tokens, axis=0) * jnp.sqrt(cfg.d_model).astype(cfg.compute_dtype)
    if cfg.positions == "learned":
      pos = self.pos_embedding(positions)
    else:
      pos = sinusoidal_positions(positions, cfg.d_model).astype(cfg.compute_dtype)
    return x + pos

  def attend(self, x: Array) -> Array:
    """Tied output projection: ``[B, T, D]`` -> float32 logits ``[B, T, V]``, the products
    in the compute dtype and their sums in float32."""
    dtype = self.config.compute_dtype
    table = jnp.asarray(self.embedding.embedding, dtype)
    return jnp.dot(jnp.asarray(x, dtype), table.T, preferred_element_type=jnp.float32)


class DecodeIndex(nn.Module):
  """Holds the position of the next token in incremental decoding (``cache/index``)."""

  @nn.compact
  def __call__(self) -> tuple[Optional[Array], bool]:
    """Returns (index, stepping); index is None while the cache is being allocated."""
    stepping = self.has_variable("cache", "index")
    var = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    if not stepping:
      return None, False
    index = var.value
    var.value = index + 1
    return index, True


def _default_positions(tokens: Array, positions: Optional[Array]) -> Array:
  if positions is not None:
    return positions
  return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


class Transformer(nn.Module):
  """Encoder-decoder Transformer for translation.

  ``__call__(src [B, S], tgt_in [B, T])`` -> logits ``[B, T, V_tgt]`` (float32).
  """
  config: TransformerConfig

  def setup(self):
    cfg = self.config
    self.src_embed = Embedder(cfg, cfg.src_vocab_size)
    self.tgt_embed = (self.src_embed if cfg.share_embeddings
                      else Embedder(cfg, cfg.tgt_vocab_size))
    self.encoder_layers = [EncoderLayer(cfg, name=f"encoder_{i}")
                           for i in range(cfg.num_encoder_layers)]
    self.decoder_layers = [DecoderLayer(cfg, name=f"decoder_{i}")
                           for i in range(cfg.num_decoder_layers)]
    self.embed_dropout = Dropout(cfg.dropout_rate)
    self.decode_index = DecodeIndex()
    if cfg.pre_ln:
      self.encoder_norm = _layer_norm(cfg, "encoder_norm")
      self.decoder_norm = _layer_norm(cfg, "decoder_norm")
    if not cfg.tie_output:
      self.logits_dense = nn.Dense(
          cfg.tgt_vocab_size, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
          kernel_init=_dense_init(("embed", "vocab")), dot_general=_float32_dot_general,
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)))

  def encode(self, src: Array, *, train: bool = False, src_segments: Optional[Array] = None,
             src_positions: Optional[Array] = None) -> Array:
    """src: int ``[B, S]`` -> encoder output ``[B, S, D]`` (compute dtype)."""
    if self.config.attention == "xla":
      mask = masks.encoder_self_mask(src, src_segments)
    else:
      mask = masks.attention_structure(src, src, causal=False, q_segments=src_segments,
                                       k_segments=src_segments)
    x = self.src_embed(src, _default_positions(src, src_positions))
    x = self.embed_dropout(x, deterministic=not train)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    for layer in self.encoder_layers:
      x = layer(x, mask, train=train)
    return self.encoder_norm(x) if self.config.pre_ln else x

  def decode(self, encoded: Optional[Array], src: Array, tgt_in: Array, *, train: bool = False,
             src_segments: Optional[Array] = None, tgt_segments: Optional[Array] = None,
             tgt_positions: Optional[Array] = None, decode: bool = False,
             project: bool = True) -> Array:
    """Decoder. encoded ``[B, S, D]``, src ``[B, S]`` (gives the cross mask), tgt_in ``[B, T]``.

    Returns float32 logits ``[B, T, V_tgt]`` (the output layer's products in the compute
    dtype, summed in float32, as the loss makes them), or with ``project=False`` the
    states the output layer reads ``[B, T, D]`` (compute dtype). With
    ``decode=True`` see the module docstring: the first call allocates the
    cache, later calls take one token ``[B, 1]`` each (``encoded`` may then be None).
    """
    index = None
    if decode:
      index, stepping = self.decode_index()
      if stepping:
        if tgt_segments is not None:
          raise ValueError("incremental decoding does not take packed rows")
        cache_len = self.variables["cache"]["decoder_0"]["self_attn"]["cached_key"].shape[1]
        self_mask = masks.cache_self_mask(index, cache_len)
        tgt_positions = jnp.full(tgt_in.shape, index, jnp.int32)
    if decode or self.config.attention == "xla":
      if index is None:
        self_mask = masks.decoder_self_mask(tgt_in, tgt_segments)
      cross = masks.cross_mask(tgt_in, src, tgt_segments, src_segments)
    else:
      self_mask = masks.attention_structure(tgt_in, tgt_in, causal=True,
                                            q_segments=tgt_segments, k_segments=tgt_segments)
      cross = masks.attention_structure(tgt_in, src, causal=False, q_segments=tgt_segments,
                                        k_segments=src_segments)

    x = self.tgt_embed(tgt_in, _default_positions(tgt_in, tgt_positions))
    x = self.embed_dropout(x, deterministic=not train)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    for layer in self.decoder_layers:
      x = layer(x, encoded, self_mask, cross, train=train, decode=decode, index=index)
    if self.config.pre_ln:
      x = self.decoder_norm(x)
    if not project:
      return x
    logits = self.tgt_embed.attend(x) if self.config.tie_output else self.logits_dense(x)
    return logits.astype(jnp.float32)

  def output_layer(self) -> tuple[Array, Optional[Array]]:
    """The output layer as (kernel ``[D, V_tgt]``, bias ``[V_tgt]`` or None), compute dtype:
    logits = states @ kernel (+ bias), as :meth:`decode` computes them."""
    dtype = self.config.compute_dtype
    if self.config.tie_output:
      return jnp.asarray(self.tgt_embed.embedding.embedding, dtype).T, None
    dense = self.logits_dense.variables["params"]
    return jnp.asarray(dense["kernel"], dtype), jnp.asarray(dense["bias"], dtype)

  def states_and_output_layer(self, src: Array, tgt_in: Array, *, train: bool = False,
                              src_segments: Optional[Array] = None,
                              tgt_segments: Optional[Array] = None,
                              src_positions: Optional[Array] = None,
                              tgt_positions: Optional[Array] = None):
    """Like ``__call__`` but stops before the logits: (states ``[B, T, D]``, (kernel, bias)),
    so a loss can apply the output layer a few positions at a time."""
    encoded = self.encode(src, train=train, src_segments=src_segments,
                          src_positions=src_positions)
    states = self.decode(encoded, src, tgt_in, train=train, src_segments=src_segments,
                         tgt_segments=tgt_segments, tgt_positions=tgt_positions, project=False)
    return states, self.output_layer()

  def __call__(self, src: Array, tgt_in: Array, *, train: bool = False,
               src_segments: Optional[Array] = None, tgt_segments: Optional[Array] = None,
               src_positions: Optional[Array] = None,
               tgt_positions: Optional[Array] = None) -> Array:
    """src ``[B, S]``, tgt_in ``[B, T]`` -> logits ``[B, T, V_tgt]``."""
    encoded = self.encode(src, train=train, src_segments=src_segments,
                          src_positions=src_positions)
    return self.decode(encoded, src, tgt_in, train=train, src_segments=src_segments,
                       tgt_segments=tgt_segments, tgt_positions=tgt_positions)


def init_params(model: Transformer, rng: jax.Array, batch: int = 1, length: int = 8):
  """Initialises ``model`` on dummy tokens; returns the (logically boxed) params tree."""
  src = jnp.ones((batch, length), jnp.int32)
  return model.init(rng, src, src)["params"]


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.meta.unbox(params))))

"""Attention implementations that take who-attends-to-whom as structure, not a dense mask.

``config.model.attention`` picks one:

- ``"xla"`` (default): :func:`dense_attention` with the dense boolean mask of
  :mod:`mt_flax.masks`, the reference every other implementation must equal.
- ``"cudnn"`` (GPU, bfloat16/float16): cuDNN's fused kernel given query and key
  lengths and a causal flag. It has no segment ids, so packed rows take the
  ``"xla"`` path (logged once).
- ``"splash"`` (TPU): the Pallas splash-attention kernel given segment ids and a
  causal or full block mask; on any other backend it runs in interpret mode
  (slow, for tests).

All three read the same :class:`mt_flax.masks.Structure`; the model still takes the
dense path for incremental decoding (the key/value cache) and for attention
dropout, which the fused kernels do not have.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from mt_flax import masks
from mt_flax.errors import ConfigError

Array = jnp.ndarray
IMPLEMENTATIONS = ("xla", "cudnn", "splash")
NAMES = ", ".join(map(repr, IMPLEMENTATIONS))
# Splash tiles queries and keys in blocks of a multiple of 128 (the TPU lane width).
SPLASH_LANES = 128

_log = logging.getLogger(__name__)


def attend(q: Array, k: Array, v: Array, structure: masks.Structure,
           implementation: str) -> Array:
  """Softmax attention of q ``[B, T, N, H]`` over k, v ``[B, S, N, H]`` -> ``[B, T, N, H]``.

  Values at real query positions equal the dense-mask path; padded query rows
  are finite and read by nothing. The backend is checked here, when traced, so
  that building a config starts no backend (multi-process runs must start it last).
  """
  if implementation == "cudnn" and jax.default_backend() != "gpu":
    raise ConfigError(f"model.attention='cudnn' needs a GPU, this backend is "
                      f"{jax.default_backend()}; expected one of {NAMES} ('splash' on TPU)")
  if implementation == "splash":
    return splash(q, k, v, structure)
  if implementation == "cudnn" and not structure.packed:
    q_len, kv_len = cudnn_lengths(structure)
    return jax.nn.dot_product_attention(q, k, v, query_seq_lengths=q_len,
                                        key_value_seq_lengths=kv_len,
                                        is_causal=structure.causal, implementation="cudnn")
  if implementation == "cudnn":
    _warn_packed_once()
  return dense_attention(q, k, v, masks.structure_mask(structure))


def dense_attention(q: Array, k: Array, v: Array, mask: Array,
                    dropout: Callable[[Array], Array] | None = None) -> Array:
  """Softmax attention of q ``[B, T, N, H]`` over k, v ``[B, S, N, H]`` where the boolean
  ``mask`` ``[B|1, 1|N, T, S]`` is True; ``dropout`` (optional) maps the weights.

  The scores and weights ``[B, N, T, S]`` are kept in the compute dtype (half the bytes
  in bfloat16), while the softmax and its gradient compute in float32 from them
  (:func:`masked_softmax`). A row with no True entry gets uniform weights (it is padding,
  read by nothing).
  """
  scores = jnp.einsum("btnh,bsnh->bnts", q, k)
  weights = masked_softmax(scores, mask, q.shape[-1] ** -0.5)
  if dropout is not None:
    weights = dropout(weights)
  return jnp.einsum("bnts,bsnh->btnh", weights, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def masked_softmax(scores: Array, mask: Array, scale: float) -> Array:
  """``softmax(scale * scores)`` over the last axis where ``mask``, in float32, returned in
  the dtype of ``scores``; the gradient too is computed in float32 from that result."""
  return _masked_softmax_fwd(scores, mask, scale)[0]


def _masked_softmax_fwd(scores, mask, scale):
  z = jnp.where(mask, scores.astype(jnp.float32) * scale, jnp.finfo(jnp.float32).min / 2)
  z = jnp.exp(z - jnp.max(z, axis=-1, keepdims=True))
  weights = (z / jnp.sum(z, axis=-1, keepdims=True)).astype(scores.dtype)
  return weights, (weights, mask)


def _masked_softmax_bwd(scale, residuals, d_weights):
  weights, mask = residuals
  p, dp = weights.astype(jnp.float32), d_weights.astype(jnp.float32)
  d_scores = p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True)) * scale
  # masked scores are constants: no gradient (a row with every key masked has p > 0)
  return jnp.where(mask, d_scores, 0.0).astype(weights.dtype), None


masked_softmax.defvjp(_masked_softmax_fwd, _masked_softmax_bwd)


@functools.cache
def _warn_packed_once() -> None:
  _log.warning("model.attention='cudnn' has no segment ids: packed rows use the 'xla' "
               "attention with a dense mask")


def cudnn_lengths(structure: masks.Structure) -> tuple[Array, Array]:
  """Query and key lengths ``[B]`` int32: the real tokens of each row.

  cuDNN masks every position at or past a row's length, which is the token
  mask exactly when padding is at the end of a row, as batches are built.
  """
  count = lambda ids, pad: jnp.sum(ids != pad, axis=-1, dtype=jnp.int32)
  return count(structure.q_ids, masks.QUERY_PAD), count(structure.kv_ids, masks.KEY_PAD)


def _round_up(length: int) -> int:
  return -(-length // SPLASH_LANES) * SPLASH_LANES


def _block(length: int) -> int:
  """The largest of 512, 256, 128 that divides ``length`` (a multiple of 128)."""
  return next(b for b in (512, 256, SPLASH_LANES) if length % b == 0)


@functools.lru_cache(maxsize=64)
def _splash_kernel(causal: bool, heads: int, q_len: int, kv_len: int, interpret: bool):
  """A splash kernel for one row ``[N, q_len, H]``, kept for every later trace."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  shape = (q_len, kv_len)
  mask = sa.CausalMask(shape) if causal else sa.FullMask(shape)
  bq, bkv = _block(q_len), _block(kv_len)
  blocks = sa.BlockSizes(block_q=bq, block_kv=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                         use_fused_bwd_kernel=True)   # one backward kernel, not two
  with jax.ensure_compile_time_eval():  # concrete tables, whatever trace first asks
    return sa.make_splash_mha(sa.MultiHeadMask([mask] * heads), block_sizes=blocks,
                              head_shards=1, q_seq_shards=1, interpret=interpret)


def splash(q: Array, k: Array, v: Array, structure: masks.Structure) -> Array:
  """Splash attention: q ``[B, T, N, H]``, k/v ``[B, S, N, H]`` -> ``[B, T, N, H]``.

  Rows are padded to a multiple of 128 with the pad ids of :mod:`mt_flax.masks`,
  which match nothing, so added and padded keys are never read. Lowered for TPU
  it is the Mosaic kernel, for any other platform the same kernel interpreted.
  A Mosaic kernel cannot be partitioned by XLA: under a mesh (see
  :meth:`mt_flax.sharding.JitPartitioner.in_context`) each device runs it on its own
  rows and heads, as the logical axis rules shard them.
  """
  run = functools.partial(_splash_rows, causal=structure.causal)
  args = (q, k, v, structure.q_ids, structure.kv_ids)
  if jax.sharding.get_abstract_mesh().empty:
    return run(*args)
  heads = nn.logical_to_mesh_axes(("batch", "length", "heads", "kv"))
  rows = nn.logical_to_mesh_axes(("batch", "length"))
  return jax.shard_map(run, in_specs=(heads, heads, heads, rows, rows), out_specs=heads,
                       check_vma=False)(*args)


def _splash_rows(q: Array, k: Array, v: Array, q_ids: Array, kv_ids: Array, *,
                 causal: bool) -> Array:
  """:func:`splash` on one device's rows and heads."""
  from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds
  t, s, h = q.shape[1], k.shape[1], q.shape[-1]
  tp, sp = _round_up(t), _round_up(s)
  rows = lambda x, n, fill=0: jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2),
                                      constant_values=fill)
  heads_first = lambda x, n: rows(x, n).transpose(0, 2, 1, 3)
  ids = SegmentIds(rows(q_ids, tp, masks.QUERY_PAD), rows(kv_ids, sp, masks.KEY_PAD))
  args = (heads_first(q / jnp.sqrt(h).astype(q.dtype), tp), heads_first(k, sp),
          heads_first(v, sp), ids)

  def run(interpret: bool):
    kernel = _splash_kernel(causal, q.shape[2], tp, sp, interpret)
    return lambda *a: jax.vmap(kernel)(*a)

  out = jax.lax.platform_dependent(*args, tpu=run(False), default=run(True))
  return out.transpose(0, 2, 1, 3)[:, :t]

"""Pure attention-mask builders.

Every mask is a boolean array, True = the query may attend to the key, with
shape broadcastable to ``[B, H, T_q, T_k]`` (the head axis is always 1). Token
id 0 is padding. Three masks, three jobs:

=============  ======  =============  ======================================
attention      query   key            mask
=============  ======  =============  ======================================
encoder self   source  source         source padding
decoder self   target  target         target padding AND causal
decoder cross  target  encoder output **source** padding, ``[B, 1, T_tgt, T_src]``
=============  ======  =============  ======================================

Packed rows (several pairs in one row) AND a block-diagonal segment mask into
each of them. Incremental decoding uses :func:`cache_self_mask` over the
key/value cache, while cross-attention is still masked by the source padding.

A query row that is padding masks every key; attention then yields a finite,
ignored value (see ``mt_flax.model``), never NaN.

The same masks as structure, for fused kernels that take ids rather than a
dense mask (:mod:`mt_flax.attention`): a :class:`Structure` holds one id per
query and per key, and a causal flag; a query may attend to a key when their
ids are equal (and, if causal, the key is not later). Real tokens carry their
segment id (1 when unpacked); padding carries ``QUERY_PAD`` as a query and
``KEY_PAD`` as a key, which equal no id, so a padded key is never read and a
padded query reads nothing. :func:`structure_mask` turns it back into the dense
mask, equal to the builders above.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax.numpy as jnp

from mt_flax.special_ids import PAD_ID

Array = jnp.ndarray


def padding_mask(q_valid: Array, k_valid: Array) -> Array:
  """Outer AND of query and key validity.

  Args:
    q_valid: bool ``[B, T_q]``, True at real (non-pad) query positions.
    k_valid: bool ``[B, T_k]``, True at real key positions.
  Returns:
    bool ``[B, 1, T_q, T_k]``.
  """
  return q_valid[:, None, :, None] & k_valid[:, None, None, :]


def causal_mask(length: int) -> Array:
  """Look-ahead mask: query i may attend to keys j <= i. bool ``[1, 1, L, L]``."""
  idx = jnp.arange(length)
  return (idx[:, None] >= idx[None, :])[None, None]


def segment_mask(q_segments: Array, k_segments: Array) -> Array:
  """Block-diagonal mask for packed rows: attend only within the same segment.

  Args:
    q_segments: int ``[B, T_q]`` segment id of each query (1, 2, ...; 0 = pad).
    k_segments: int ``[B, T_k]`` segment id of each key.
  Returns:
    bool ``[B, 1, T_q, T_k]``.
  """
  return q_segments[:, None, :, None] == k_segments[:, None, None, :]


def _with_segments(mask: Array, q_segments: Optional[Array],
                   k_segments: Optional[Array]) -> Array:
  if (q_segments is None) != (k_segments is None):
    raise ValueError("segment ids must be given for both queries and keys, or neither")
  if q_segments is None:
    return mask
  return mask & segment_mask(q_segments, k_segments)


def encoder_self_mask(src: Array, src_segments: Optional[Array] = None) -> Array:
  """Encoder self-attention: source padding (and segments). ``[B, 1, S, S]``.

  Args:
    src: int ``[B, S]`` source tokens, 0 = pad.
    src_segments: optional int ``[B, S]`` segment ids of packed rows.
  """
  valid = src != PAD_ID
  return _with_segments(padding_mask(valid, valid), src_segments, src_segments)


def decoder_self_mask(tgt: Array, tgt_segments: Optional[Array] = None) -> Array:
  """Decoder self-attention: target padding AND causal (and segments). ``[B, 1, T, T]``.

  Args:
    tgt: int ``[B, T]`` decoder input tokens (BOS-shifted target), 0 = pad.
    tgt_segments: optional int ``[B, T]`` segment ids of packed rows.
  """
  valid = tgt != PAD_ID
  mask = padding_mask(valid, valid) & causal_mask(tgt.shape[1])
  return _with_segments(mask, tgt_segments, tgt_segments)


def cross_mask(tgt: Array, src: Array, tgt_segments: Optional[Array] = None,
               src_segments: Optional[Array] = None) -> Array:
  """Decoder cross-attention: keys are the encoder output, so the **source** padding.

  Args:
    tgt: int ``[B, T]`` decoder input tokens (the queries).
    src: int ``[B, S]`` source tokens (the keys).
    tgt_segments, src_segments: optional segment ids ``[B, T]`` and ``[B, S]``.
  Returns:
    bool ``[B, 1, T, S]``.
  """
  mask = padding_mask(tgt != PAD_ID, src != PAD_ID)
  return _with_segments(mask, tgt_segments, src_segments)


def cache_self_mask(step: Array, cache_len: int) -> Array:
  """Self-attention mask of incremental decoding at step ``step``.

  The query is the token at position ``step``; the keys are the ``cache_len``
  cache slots, of which slots ``0..step`` are filled.

  Args:
    step: int scalar (may be traced), the current position.
    cache_len: static length L of the key/value cache.
  Returns:
    bool ``[1, 1, 1, L]``.
  """
  return (jnp.arange(cache_len) <= step)[None, None, None, :]


QUERY_PAD = -1   # the structure id of a padded query
KEY_PAD = -2     # the structure id of a padded key


class Structure(NamedTuple):
  """Who attends to whom, as ids: query i may attend to key j iff
  ``q_ids[b, i] == kv_ids[b, j]`` (and ``j <= i`` when ``causal``).

  Attributes:
    q_ids: int ``[B, T_q]``, segment id of each real query, ``QUERY_PAD`` at padding.
    kv_ids: int ``[B, T_k]``, segment id of each real key, ``KEY_PAD`` at padding.
    causal: static; adds the look-ahead mask (self-attention only).
    packed: static; whether rows hold several segments (kernels that take only
      lengths cannot express that).
  """
  q_ids: Array
  kv_ids: Array
  causal: bool
  packed: bool


def _ids(tokens: Array, segments: Optional[Array], pad: int) -> Array:
  real = jnp.ones_like(tokens) if segments is None else segments
  return jnp.where(tokens != PAD_ID, real, pad).astype(jnp.int32)


def attention_structure(q_tokens: Array, k_tokens: Array, *, causal: bool,
                        q_segments: Optional[Array] = None,
                        k_segments: Optional[Array] = None) -> Structure:
  """The structure of one attention from its query and key tokens (and segments).

  Encoder self: ``(src, src)``; decoder self: ``(tgt, tgt, causal=True)``; decoder
  cross: ``(tgt, src)``, the **source** padding on the keys, as in :func:`cross_mask`.

  Args:
    q_tokens: int ``[B, T_q]``, 0 = pad.
    k_tokens: int ``[B, T_k]``, 0 = pad.
    causal: whether to add the look-ahead mask (needs ``T_q == T_k``).
    q_segments, k_segments: optional int segment ids of packed rows, both or neither.
  """
  if (q_segments is None) != (k_segments is None):
    raise ValueError("segment ids must be given for both queries and keys, or neither")
  return Structure(_ids(q_tokens, q_segments, QUERY_PAD), _ids(k_tokens, k_segments, KEY_PAD),
                   causal, q_segments is not None)


def structure_mask(structure: Structure) -> Array:
  """The dense mask of ``structure``: bool ``[B, 1, T_q, T_k]``."""
  mask = segment_mask(structure.q_ids, structure.kv_ids)
  return mask & causal_mask(mask.shape[-1]) if structure.causal else mask

"""Mask builders against brute-force Python references on random ragged batches."""
import itertools

import jax
import numpy as np
import pytest

from mt_flax import masks

SHAPES = [(5, 9), (9, 5), (7, 7)]  # (T_q, T_k): shorter, longer, equal


def ragged(rng: np.random.Generator, batch: int, length: int, min_len: int = 1) -> np.ndarray:
  """Random tokens in [4, 50) with a random valid length per row, 0-padded."""
  out = np.zeros((batch, length), np.int32)
  for b in range(batch):
    n = rng.integers(min_len, length + 1)
    out[b, :n] = rng.integers(4, 50, n)
  return out


def segments_of(rng: np.random.Generator, tokens: np.ndarray) -> np.ndarray:
  """Random non-decreasing segment ids 1, 2, ... over the valid prefix of each row."""
  seg = np.zeros_like(tokens)
  for b, row in enumerate(tokens):
    n = int((row != 0).sum())
    cuts = np.sort(rng.integers(0, n + 1, 2))
    seg[b, :n] = 1 + (np.arange(n) >= cuts[0]) + (np.arange(n) >= cuts[1])
  return seg


def ref_mask(q_tokens, k_tokens, *, causal=False, q_seg=None, k_seg=None):
  """Brute force: one nested loop per (b, i, j), straight from the definitions."""
  batch, tq = q_tokens.shape
  tk = k_tokens.shape[1]
  out = np.zeros((batch, 1, tq, tk), bool)
  for b, i, j in itertools.product(range(batch), range(tq), range(tk)):
    ok = q_tokens[b, i] != 0 and k_tokens[b, j] != 0
    if causal:
      ok = ok and j <= i
    if q_seg is not None:
      ok = ok and q_seg[b, i] == k_seg[b, j]
    out[b, 0, i, j] = ok
  return out


@pytest.mark.parametrize("tq,tk", SHAPES)
def test_padding_and_cross_mask_match_reference(tq, tk):
  rng = np.random.default_rng(tq * 100 + tk)
  tgt, src = ragged(rng, 6, tq), ragged(rng, 6, tk)
  expected = ref_mask(tgt, src)
  np.testing.assert_array_equal(masks.padding_mask(tgt != 0, src != 0), expected)
  got = masks.cross_mask(tgt, src)
  assert got.shape == (6, 1, tq, tk) and got.dtype == bool
  np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("tq,tk", SHAPES)
def test_segment_mask_matches_reference(tq, tk):
  rng = np.random.default_rng(7 + tq + tk)
  tgt, src = ragged(rng, 5, tq, min_len=3), ragged(rng, 5, tk, min_len=3)
  tseg, sseg = segments_of(rng, tgt), segments_of(rng, src)
  expected = np.zeros((5, 1, tq, tk), bool)
  for b, i, j in itertools.product(range(5), range(tq), range(tk)):
    expected[b, 0, i, j] = tseg[b, i] == sseg[b, j]
  np.testing.assert_array_equal(masks.segment_mask(tseg, sseg), expected)
  np.testing.assert_array_equal(masks.cross_mask(tgt, src, tseg, sseg),
                                ref_mask(tgt, src, q_seg=tseg, k_seg=sseg))


@pytest.mark.parametrize("length", [1, 4, 9])
def test_encoder_and_decoder_self_masks_match_reference(length):
  rng = np.random.default_rng(length)
  tokens = ragged(rng, 6, length)
  seg = segments_of(rng, tokens)
  np.testing.assert_array_equal(masks.encoder_self_mask(tokens), ref_mask(tokens, tokens))
  np.testing.assert_array_equal(masks.decoder_self_mask(tokens),
                                ref_mask(tokens, tokens, causal=True))
  np.testing.assert_array_equal(masks.encoder_self_mask(tokens, seg),
                                ref_mask(tokens, tokens, q_seg=seg, k_seg=seg))
  np.testing.assert_array_equal(masks.decoder_self_mask(tokens, seg),
                                ref_mask(tokens, tokens, causal=True, q_seg=seg, k_seg=seg))


def test_causal_mask_is_lower_triangular():
  m = np.asarray(masks.causal_mask(6))
  assert m.shape == (1, 1, 6, 6)
  for i, j in itertools.product(range(6), range(6)):
    assert m[0, 0, i, j] == (j <= i)


def test_cache_self_mask_opens_one_slot_per_step():
  for step in range(5):
    m = np.asarray(masks.cache_self_mask(step, 5))
    assert m.shape == (1, 1, 1, 5)
    np.testing.assert_array_equal(m[0, 0, 0], np.arange(5) <= step)


def test_masks_are_jittable_with_traced_step():
  src = np.array([[5, 6, 0], [7, 0, 0]], np.int32)
  tgt = np.array([[2, 8, 9, 0, 0], [2, 4, 0, 0, 0]], np.int32)
  np.testing.assert_array_equal(jax.jit(masks.cross_mask)(tgt, src), ref_mask(tgt, src))
  step_mask = jax.jit(masks.cache_self_mask, static_argnums=1)
  np.testing.assert_array_equal(step_mask(np.int32(2), 4)[0, 0, 0], [True, True, True, False])


def test_segments_must_come_in_pairs():
  tokens = np.ones((1, 3), np.int32)
  with pytest.raises(ValueError, match="both queries and keys"):
    masks.cross_mask(tokens, tokens, tgt_segments=tokens)

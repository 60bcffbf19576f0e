"""Counter-hash dropout masks: keep rate, independence, determinism, use in the model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mt_flax.model import Dropout, apply_dropout, dropout_keep_mask

SHAPE = (16, 32, 512)          # [B, T, D]: 262,144 entries
N = int(np.prod(SHAPE))


def keep(key, rate: float = 0.1, shape=SHAPE) -> np.ndarray:
  return np.asarray(jax.jit(dropout_keep_mask, static_argnums=(1, 2))(key, shape, rate))


def correlation(a: np.ndarray, b: np.ndarray) -> float:
  a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
  return float(np.corrcoef(a, b)[0, 1])


# Five standard deviations of a sample correlation (or of a mean) over n entries.
def bound(n: int, sd: float = 1.0) -> float:
  return 5.0 * sd / np.sqrt(n)


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5])
def test_keep_rate_is_one_minus_rate(rate):
  for seed in range(3):
    mask = keep(jax.random.key(seed), rate)
    assert mask.shape == SHAPE and mask.dtype == bool
    assert abs(mask.mean() - (1 - rate)) < bound(N, np.sqrt(rate * (1 - rate)))


def test_neighbouring_positions_are_independent():
  mask = keep(jax.random.key(1), 0.3)
  # Along the feature axis, the time axis and the batch axis (flat offsets 1, D, T*D).
  for axis in range(3):
    a = np.take(mask, range(0, SHAPE[axis] - 1), axis=axis)
    b = np.take(mask, range(1, SHAPE[axis]), axis=axis)
    assert abs(correlation(a, b)) < bound(a.size), axis
  # Pairs of neighbours are kept together at rate p**2.
  both = (mask[..., :-1] & mask[..., 1:]).mean()
  assert abs(both - 0.7 ** 2) < bound(mask[..., 1:].size)


def test_keys_of_other_layers_and_steps_give_independent_masks():
  base = jax.random.key(7)
  step0, step1 = jax.random.fold_in(base, 0), jax.random.fold_in(base, 1)
  masks = {"step0": keep(step0, 0.3), "step1": keep(step1, 0.3),
           "step0_other_layer": keep(jax.random.fold_in(step0, 1), 0.3)}
  names = list(masks)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      assert abs(correlation(masks[a], masks[b])) < bound(N), (a, b)
      # Not a shifted copy of each other either (a counter hash with a bad key mix would be).
      for shift in (1, 2, SHAPE[-1]):
        assert abs(correlation(masks[a].ravel()[shift:], masks[b].ravel()[:-shift])) < bound(N)


def test_same_key_same_mask_and_bits_of_the_hash_are_balanced():
  key = jax.random.key(3)
  np.testing.assert_array_equal(keep(key), keep(key))
  # The mask at rate 0.5 is the top bit of the hash: balanced in every 2x2 block position.
  mask = keep(key, 0.5, (256, 256))
  for i in range(2):
    for j in range(2):
      block = mask[i::2, j::2]
      assert abs(block.mean() - 0.5) < bound(block.size, 0.5)


def test_apply_dropout_scales_kept_entries_and_handles_edge_rates():
  x = jnp.arange(1.0, 1.0 + N).reshape(SHAPE)
  key = jax.random.key(0)
  y = np.asarray(apply_dropout(x, 0.25, key))
  kept = keep(key, 0.25)
  np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
  assert np.all(y[~kept] == 0)
  assert apply_dropout(x, 0.0, key) is x
  assert not np.any(np.asarray(apply_dropout(x, 1.0, key)))


class TwoLayers(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    return Dropout(0.3, name="a")(x, not train), Dropout(0.3, name="b")(x, not train)


def test_dropout_module_draws_a_new_mask_per_layer_and_key_and_none_in_eval():
  x = jnp.ones(SHAPE)
  module = TwoLayers()
  run = jax.jit(lambda key: module.apply({}, x, True, rngs={"dropout": key}))
  a0, b0 = (np.asarray(m) != 0 for m in run(jax.random.key(0)))
  a1, _ = (np.asarray(m) != 0 for m in run(jax.random.key(1)))
  assert abs(correlation(a0, b0)) < bound(N)           # other layer
  assert abs(correlation(a0, a1)) < bound(N)           # other step key
  np.testing.assert_array_equal(a0, np.asarray(run(jax.random.key(0))[0]) != 0)
  a_eval, b_eval = module.apply({}, x, False)
  assert np.all(np.asarray(a_eval) == 1) and np.all(np.asarray(b_eval) == 1)


def test_too_large_a_mask_is_a_clear_error():
  with pytest.raises(ValueError, match="at most 2\\*\\*32 - 1"):
    jax.eval_shape(lambda k: dropout_keep_mask(k, (1 << 16, 1 << 16), 0.1), jax.random.key(0))

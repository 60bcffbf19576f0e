"""Mask invariance checks on any model and any batch.

Each check perturbs a batch in a way the masks say cannot matter and measures
the largest change of the logits at real target positions; it passes when
that change stays within float tolerance. Checks also confirm they have the
power to fail: the matching perturbation that *must* matter does change the
logits. ``python -m mt_flax audit`` runs them on a trained checkpoint with real
validation batches.

Batches are numpy int ``src [B, S]`` and ``tgt_in [B, T]`` (BOS first), 0 = pad.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mt_flax.model import Transformer
from mt_flax.special_ids import FIRST_WORD_ID, PAD_ID



@dataclasses.dataclass(frozen=True)
class CheckResult:
  """Outcome of one check: ``max_change`` where nothing may change, against ``tolerance``."""
  name: str
  passed: bool
  max_change: float
  tolerance: float
  detail: str = ""

  def line(self) -> str:
    status = "PASS" if self.passed else "FAIL"
    text = (f"{status} {self.name}: max change {self.max_change:.2e} "
            f"(tolerance {self.tolerance:.1e})")
    return text + (f"; {self.detail}" if self.detail else "")


class Probe:
  """Runs one model on numpy batches; holds the tolerance of its compute dtype."""

  def __init__(self, model: Transformer, params):
    self.model = model
    self.params = nn.meta.unbox(params)
    self._logits = jax.jit(lambda p, s, t: model.apply({"params": p}, s, t))
    self._encode = jax.jit(lambda p, s: model.apply({"params": p}, s, method=Transformer.encode))
    self._decode = jax.jit(lambda p, e, s, t: model.apply({"params": p}, e, s, t,
                                                          method=Transformer.decode))
    eps = float(jnp.finfo(model.config.compute_dtype).eps)
    self.rtol = max(1e-4, 4 * eps)

  def logits(self, src: np.ndarray, tgt: np.ndarray) -> np.ndarray:
    """``[B, S]``, ``[B, T]`` -> float32 ``[B, T, V]``."""
    return np.asarray(self._logits(self.params, src, tgt))

  def encode(self, src: np.ndarray) -> jax.Array:
    return self._encode(self.params, src)

  def decode(self, encoded: jax.Array, src: np.ndarray, tgt: np.ndarray) -> np.ndarray:
    return np.asarray(self._decode(self.params, encoded, src, tgt))

  def tolerance(self, reference: np.ndarray) -> float:
    return self.rtol * max(1.0, float(np.abs(reference).max()))

  @property
  def vocab(self) -> int:
    return self.model.config.tgt_vocab_size


def _valid(tokens: np.ndarray) -> np.ndarray:
  return tokens != PAD_ID


def _shift_words(tokens: np.ndarray, vocab: int) -> np.ndarray:
  """Replaces every token by a different ordinary word (ids >= FIRST_WORD_ID)."""
  span = vocab - FIRST_WORD_ID
  return (tokens - FIRST_WORD_ID + 1 + span // 2) % span + FIRST_WORD_ID


def _result(name: str, probe: Probe, reference: np.ndarray, change: float, power: bool,
            what_matters: str) -> CheckResult:
  tol = probe.tolerance(reference)
  passed = change <= tol and power
  detail = "" if power else f"no effect from {what_matters}: the check had no power"
  return CheckResult(name, passed, change, tol, detail)


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.abs(a - b).max()) if a.size else 0.0


def check_causality(probe: Probe, src: np.ndarray, tgt: np.ndarray, cuts: int = 4) -> CheckResult:
  """Changing target tokens after position t leaves the logits at 0..t unchanged."""
  full = np.where(_valid(tgt), tgt, FIRST_WORD_ID)          # every target position real
  base = probe.logits(src, full)
  t_len = full.shape[1]
  change, moved = 0.0, True
  for t in sorted(set(np.linspace(0, t_len - 2, cuts).astype(int).tolist())) if t_len > 1 else []:
    changed = full.copy()
    changed[:, t + 1:] = _shift_words(changed[:, t + 1:], probe.vocab)
    out = probe.logits(src, changed)
    change = max(change, _max_diff(out[:, :t + 1], base[:, :t + 1]))
    moved &= _max_diff(out[:, t + 1:], base[:, t + 1:]) > 10 * probe.tolerance(base)
  return _result("causality", probe, base, change, moved, "changing later target tokens")


def check_padding_content(probe: Probe, src: np.ndarray, tgt: np.ndarray) -> CheckResult:
  """Noise in the encoder output at padded source positions is never read."""
  src = np.pad(src, [(0, 0), (0, 3)])                     # every row has padding
  encoded = probe.encode(src)
  noise = 1e3 * jax.random.normal(jax.random.PRNGKey(0), encoded.shape, encoded.dtype)
  keep = jnp.asarray(_valid(src))[..., None]
  base = probe.decode(encoded, src, tgt)
  out = probe.decode(jnp.where(keep, encoded, noise), src, tgt)
  leaked = probe.decode(jnp.where(keep, noise, encoded), src, tgt)
  m = _valid(tgt)
  power = _max_diff(leaked[m], base[m]) > 10 * probe.tolerance(base)
  return _result("padding-content", probe, base, _max_diff(out[m], base[m]), power,
                 "noise at real source positions")


def check_padding_length(probe: Probe, src: np.ndarray, tgt: np.ndarray,
                         extra: int = 7) -> CheckResult:
  """More source padding and more target padding change no real logit."""
  base = probe.logits(src, tgt)
  m = _valid(tgt)
  more_src = probe.logits(np.pad(src, [(0, 0), (0, extra)]), tgt)
  more_tgt = probe.logits(src, np.pad(tgt, [(0, 0), (0, extra)]))[:, :tgt.shape[1]]
  change = max(_max_diff(more_src[m], base[m]), _max_diff(more_tgt[m], base[m]))
  return _result("padding-length", probe, base, change, True, "")


def check_batch_independence(probe: Probe, src: np.ndarray, tgt: np.ndarray) -> CheckResult:
  """Replacing one row of the batch leaves every other row's logits unchanged."""
  if src.shape[0] < 2:
    return CheckResult("batch-independence", False, 0.0, 0.0, "needs a batch of 2 or more rows")
  base = probe.logits(src, tgt)
  src2, tgt2 = src.copy(), tgt.copy()
  src2[0] = np.where(_valid(src[0]), _shift_words(src[0], probe.model.config.src_vocab_size), 0)
  tgt2[0, 1:] = np.where(_valid(tgt[0, 1:]), _shift_words(tgt[0, 1:], probe.vocab), 0)
  out = probe.logits(src2, tgt2)
  m = _valid(tgt)
  m[0] = False
  power = _max_diff(out[0][_valid(tgt[0])], base[0][_valid(tgt[0])]) > 10 * probe.tolerance(base)
  return _result("batch-independence", probe, base, _max_diff(out[m], base[m]), power,
                 "changing the replaced row")


def check_cross_length(probe: Probe, src: np.ndarray, tgt: np.ndarray,
                       rows: int = 2, extra: int = 5) -> CheckResult:
  """Each pair's logits are the same whether its batch pads the source to be
  shorter than, equal to, or longer than the target, and equal those of the
  pair alone (unpadded). Feeding the target padding mask to cross-attention
  fails this check: a shape error when the widths differ, wrong keys when equal.
  """
  width = max(src.shape[1], tgt.shape[1])
  pad_to = lambda x, w: np.pad(x, [(0, 0), (0, w - x.shape[1])])
  variants = [(width, width + extra), (width, width), (width + extra, width)]
  base = probe.logits(src, tgt)
  m = _valid(tgt)
  change = 0.0
  for s_w, t_w in variants:
    out = probe.logits(pad_to(src, s_w), pad_to(tgt, t_w))[:, :tgt.shape[1]]
    change = max(change, _max_diff(out[m], base[m]))
  for r in range(min(rows, src.shape[0])):
    n_s, n_t = int(_valid(src[r]).sum()), int(_valid(tgt[r]).sum())
    alone = probe.logits(src[r:r + 1, :n_s], tgt[r:r + 1, :n_t])[0]
    change = max(change, _max_diff(alone, base[r, :n_t]))
  return _result("cross-length", probe, base, change, True, "")


def check_cached_decoding(probe: Probe, src: np.ndarray, tgt: np.ndarray) -> CheckResult:
  """One-token-at-a-time decoding with the cache gives the full decoder's logits."""
  model, v = probe.model, {"params": probe.params}
  full = np.where(_valid(tgt), tgt, FIRST_WORD_ID)
  base = probe.logits(src, full)

  @jax.jit
  def stepwise(params, src, tgt):
    v = {"params": params}
    encoded = model.apply(v, src, method=Transformer.encode)
    _, cache = model.apply(v, encoded, src, jnp.zeros_like(tgt), decode=True,
                           method=Transformer.decode, mutable=["cache"])

    def step(cache, token):
      out, cache = model.apply({**v, **cache}, None, src, token[:, None], decode=True,
                               method=Transformer.decode, mutable=["cache"])
      return cache, out[:, 0]

    _, outs = jax.lax.scan(step, cache, tgt.T)
    return jnp.swapaxes(outs, 0, 1)

  out = np.asarray(stepwise(v["params"], src, full))
  return _result("cached-decoding", probe, base, _max_diff(out, base), True, "")


CHECKS: dict[str, Callable[[Probe, np.ndarray, np.ndarray], CheckResult]] = {
    "causality": check_causality,
    "padding-content": check_padding_content,
    "padding-length": check_padding_length,
    "batch-independence": check_batch_independence,
    "cross-length": check_cross_length,
    "cached-decoding": check_cached_decoding,
}


def run_checks(model: Transformer, params, src: np.ndarray, tgt: np.ndarray,
               names=tuple(CHECKS)) -> list[CheckResult]:
  """Runs the named checks on one batch ``src [B, S]``, ``tgt_in [B, T]``."""
  probe = Probe(model, params)
  src, tgt = np.asarray(src, np.int32), np.asarray(tgt, np.int32)
  real = _valid(src).any(1) & _valid(tgt).any(1)        # drop all-padding filler rows
  src, tgt = src[real], tgt[real]
  return [_guarded(name, probe, src, tgt) for name in names]


def _guarded(name: str, probe: Probe, src: np.ndarray, tgt: np.ndarray) -> CheckResult:
  """A check that crashes (e.g. a mask of the wrong shape) is a failed check."""
  try:
    return CHECKS[name](probe, src, tgt)
  except (TypeError, ValueError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return CheckResult(name, False, float("inf"), 0.0, f"{type(e).__name__}: {first}")


# ----------------------------------------------------------------------------- several batches


def pick_batches(batches: Sequence[dict], count: int, rows: int) -> list[dict]:
  """``count`` batches spread over the shapes (shortest to longest), each cut to ``rows`` real rows.

  Only batches with at least two real rows qualify (batch independence needs two).
  """
  real_rows = lambda b: int((b["src"] != PAD_ID).any(1).sum())
  ordered = sorted((b for b in batches if real_rows(b) >= 2),
                   key=lambda b: (b["src"].shape[1] + b["tgt_in"].shape[1], -real_rows(b)))
  if not ordered:
    return []
  picks = sorted(set(np.linspace(0, len(ordered) - 1, max(count, 1)).round().astype(int)))
  out = []
  for i in picks:
    b = ordered[i]
    real = np.flatnonzero((b["src"] != PAD_ID).any(1))[:rows]
    out.append({"src": b["src"][real], "tgt_in": b["tgt_in"][real]})
  return out


def combine(results: Sequence[CheckResult]) -> CheckResult:
  """One verdict from the results of one check on several batches."""
  worst = max(results, key=lambda r: (not r.passed, r.max_change / max(r.tolerance, 1e-30)))
  details = "; ".join(sorted({r.detail for r in results if r.detail}))
  return CheckResult(worst.name, all(r.passed for r in results), worst.max_change,
                     worst.tolerance, details)


def check_batches(model: Transformer, params, batches: Sequence[dict]) -> list[CheckResult]:
  """Every check on every batch (``src``, ``tgt_in``), combined per check."""
  per_batch = [run_checks(model, params, b["src"], b["tgt_in"]) for b in batches]
  return [combine([results[i] for results in per_batch]) for i in range(len(CHECKS))]

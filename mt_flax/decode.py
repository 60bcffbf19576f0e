"""Greedy and beam search, with the key/value cache or by full recomputation.

The encoder runs once per source. The *cached* searches then feed one token
per step through :meth:`Transformer.decode` with ``decode=True`` (see
``mt_flax.model``); the *full* searches re-run the whole decoder over the
prefix at every step, the slow reference the cached path must agree with.

Conventions shared by every search here:

* ``src`` is int ``[B, S]``, 0 = pad. A source of ``n`` real tokens may get at
  most ``max_target_len(n, a, b) = max(1, floor(a * n + b))`` target tokens,
  EOS included; at that step only EOS may be chosen. The static loop length
  ``L`` is that rule applied to the padded width ``S``, so one compiled
  function serves every batch of one ``(B, S)`` shape.
* PAD and BOS are never generated. Outputs are int ``[B, L]`` without BOS,
  ending with EOS, 0 after it.
* Beam search keeps *alive* and *finished* hypotheses apart. Each step
  extends the alive beams, takes the best ``2K`` candidates, offers EOS
  candidates to the finished set (scored with the length penalty
  ``((5 + len) / 6) ** alpha`` of Wu et al. 2016, which keeps its best ``K``)
  and keeps the best ``K`` non-EOS candidates alive. Two rules (``rule``):

  - ``"t5x"`` (default; the rule of t5x and the Flax WMT example): every EOS
    among the ``2K`` candidates is offered; a source is done once it has ``K``
    finished hypotheses and its best alive one cannot beat the worst of them
    even at its length limit (alive log-probability / penalty at the limit,
    an upper bound because log-probabilities only fall and the penalty only
    grows). Stopping there gives the same result as running to the limit.
  - ``"fairseq"``: only EOS candidates ranked in the first ``K`` of the
    ``2K`` finish, and a source is done as soon as it has ``K`` finished
    hypotheses. With ``K = 1`` this is exactly greedy search.

  The loop stops when every source is done.

:func:`decode_ids` batches a list of sources by length (bounded set of
shapes), runs a search and returns the outputs in input order.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mt_flax.model import Transformer
from mt_flax.sharding import JitPartitioner, to_host
from mt_flax.special_ids import BOS_ID, EOS_ID, PAD_ID

Array = jnp.ndarray
NEG_INF = -jnp.inf
MIN_WIDTH = 16        # padded source widths: 16, 24, 32, 48, 64, 96, 128, ...
_ROUNDING = 1e-4      # keeps float32 (device) and float64 (host) limits identical


class Decoded(NamedTuple):
  """tokens: int ``[B, L]`` (EOS-terminated, 0 after); scores: float32 ``[B]``;
  steps: int32 ``[]``, decoder steps run before every source was done.

  Greedy scores are summed log-probabilities; beam scores are divided by the
  length penalty.
  """
  tokens: Array
  scores: Array
  steps: Optional[Array] = None


def max_target_len(src_len: int, a: float, b: float) -> int:
  """Most target tokens (EOS included) allowed for a source of ``src_len`` tokens."""
  return max(1, int(math.floor(a * src_len + b + _ROUNDING)))


def length_penalty(length: Array, alpha: float) -> Array:
  """``((5 + length) / 6) ** alpha`` (Wu et al. 2016)."""
  return ((5.0 + length) / 6.0) ** alpha


def _static_len(model: Transformer, src_width: int, a: float, b: float) -> int:
  length = max_target_len(src_width, a, b)
  if model.config.positions == "learned":
    length = min(length, model.config.max_len)
  return length


def _limits(src: Array, a: float, b: float, length: int) -> Array:
  """Per-source target limit ``[B]``, clipped to the static length."""
  n = jnp.sum(src != PAD_ID, axis=1).astype(jnp.float32)
  return jnp.clip(jnp.floor(a * n + b + _ROUNDING).astype(jnp.int32), 1, length)


def _token_logprobs(logits: Array, force_eos: Array) -> Array:
  """logits ``[N, V]``, force_eos bool ``[N]`` -> log-probabilities ``[N, V]``.

  PAD and BOS are excluded before normalising; where ``force_eos`` only EOS
  keeps its log-probability.
  """
  vocab = jnp.arange(logits.shape[-1])
  logits = jnp.where((vocab == PAD_ID) | (vocab == BOS_ID), NEG_INF, logits)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.where(force_eos[:, None] & (vocab != EOS_ID), NEG_INF, logp)


# A stepper maps (state, seqs [N, L+1] with BOS first, step i) to the logits of
# the next token [N, V] and the new state.
Step = Callable[[Any, Array, Array], tuple[Array, Any]]


def _cached_stepper(model: Transformer, params, encoded: Array, src: Array,
                    length: int) -> tuple[Any, Step]:
  """Allocates the cache (cross-attention K/V computed here, once)."""
  dummy = jnp.zeros((src.shape[0], length), jnp.int32)
  _, cache = model.apply({"params": params}, encoded, src, dummy, decode=True,
                         method=Transformer.decode, mutable=["cache"])

  def step(cache, seqs, i):
    token = jax.lax.dynamic_slice_in_dim(seqs, i, 1, axis=1)
    logits, cache = model.apply({"params": params, **cache}, None, src, token, decode=True,
                                method=Transformer.decode, mutable=["cache"])
    return logits[:, 0], cache

  return cache, step


def _full_stepper(model: Transformer, params, encoded: Array, src: Array,
                  length: int) -> tuple[Any, Step]:
  """No cache: the decoder re-reads the whole (zero-padded) prefix each step."""

  def step(state, seqs, i):
    logits = model.apply({"params": params}, encoded, src, seqs[:, :length],
                         method=Transformer.decode)
    return jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False), state

  return {}, step


def _stepper(model, params, encoded, src, length, cached):
  return (_cached_stepper if cached else _full_stepper)(model, params, encoded, src, length)


@functools.partial(jax.jit, static_argnames=("model", "max_len_a", "max_len_b", "cached"))
def greedy_search(model: Transformer, params, src: Array, *, max_len_a: float = 1.5,
                  max_len_b: float = 10.0, cached: bool = True) -> Decoded:
  """Greedy decoding of ``src`` ``[B, S]`` -> :class:`Decoded` with tokens ``[B, L]``."""
  params = nn.meta.unbox(params)
  batch = src.shape[0]
  length = _static_len(model, src.shape[1], max_len_a, max_len_b)
  limits = _limits(src, max_len_a, max_len_b, length)
  encoded = model.apply({"params": params}, src, method=Transformer.encode)
  state, step = _stepper(model, params, encoded, src, length, cached)
  seqs = jnp.zeros((batch, length + 1), jnp.int32).at[:, 0].set(BOS_ID)

  def cond(carry):
    i, _, _, done, _ = carry
    return (i < length) & ~jnp.all(done)

  def body(carry):
    i, seqs, state, done, score = carry
    logits, state = step(state, seqs, i)
    logp = _token_logprobs(logits, i + 1 >= limits)
    token = jnp.argmax(logp, axis=-1).astype(jnp.int32)
    gained = jnp.take_along_axis(logp, token[:, None], axis=1)[:, 0]
    score = score + jnp.where(done, 0.0, gained)
    token = jnp.where(done, PAD_ID, token)
    seqs = jax.lax.dynamic_update_slice_in_dim(seqs, token[:, None], i + 1, axis=1)
    return i + 1, seqs, state, done | (token == EOS_ID), score

  init = (jnp.int32(0), seqs, state, jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.float32))
  steps, seqs, _, _, score = jax.lax.while_loop(cond, body, init)
  return Decoded(seqs[:, 1:], score, steps)


def _reorder(state, rows: Array):
  """Gathers every batch-leading cache array at ``rows`` ``[N]``.

  Scalars (the cache index) have no batch axis. The cross-attention K/V are
  identical across the beams of one source, so they are left alone.
  """
  def take(path, x):
    if x.ndim == 0 or any(getattr(k, "key", None) == "cross_attn" for k in path):
      return x
    return jnp.take(x, rows, axis=0)
  return jax.tree_util.tree_map_with_path(take, state)


BEAM_RULES = ("t5x", "fairseq")


@functools.partial(jax.jit, static_argnames=("model", "beam_size", "alpha", "max_len_a",
                                             "max_len_b", "cached", "rule"))
def beam_search(model: Transformer, params, src: Array, *, beam_size: int = 4,
                alpha: float = 0.6, max_len_a: float = 1.5, max_len_b: float = 10.0,
                cached: bool = True, rule: str = "t5x") -> Decoded:
  """Beam search of ``src`` ``[B, S]`` -> best hypothesis per source, tokens ``[B, L]``."""
  params = nn.meta.unbox(params)
  k = beam_size
  length = _static_len(model, src.shape[1], max_len_a, max_len_b)
  limits = _limits(src, max_len_a, max_len_b, length)
  encoded = model.apply({"params": params}, src, method=Transformer.encode)
  src_k = jnp.repeat(src, k, axis=0)                        # [B*K, S]
  state, step = _stepper(model, params, jnp.repeat(encoded, k, axis=0), src_k, length, cached)
  return beam_search_steps(step, state, limits, length=length, beam_size=k, alpha=alpha,
                           rule=rule)


def _done(rule: str, alive_logp: Array, fin_scores: Array, limits: Array, alpha: float) -> Array:
  """bool ``[B]``: no later hypothesis can enter the finished set of that source."""
  full = jnp.all(fin_scores > NEG_INF, axis=1)             # K finished
  if rule == "fairseq":
    return full
  bound = alive_logp[:, 0] / length_penalty(limits.astype(jnp.float32), alpha)
  return (full & (bound < fin_scores[:, -1])) | ~jnp.any(alive_logp > NEG_INF, axis=1)


def beam_search_steps(step: Step, state: Any, limits: Array, *, length: int, beam_size: int,
                      alpha: float, rule: str = "t5x", stop_early: bool = True) -> Decoded:
  """Beam search over any scorer ``step`` (see :data:`Step`), rows grouped ``[B*K]``.

  ``limits`` int ``[B]``: most target tokens per source (EOS forced at the
  last); ``length``: the static loop length. ``stop_early=False`` runs every
  source to ``length`` steps (to check that stopping early changes nothing).
  """
  if rule not in BEAM_RULES:
    raise ValueError(f"beam rule {rule!r}: expected one of {', '.join(BEAM_RULES)}")
  batch, k = limits.shape[0], beam_size
  alive_seqs = jnp.zeros((batch, k, length + 1), jnp.int32).at[:, :, 0].set(BOS_ID)
  alive_logp = jnp.full((batch, k), NEG_INF).at[:, 0].set(0.0)
  offered = jnp.arange(2 * k) < (k if rule == "fairseq" else 2 * k)
  base = jnp.arange(batch)[:, None] * k

  def done_of(alive_logp, fin_scores):
    return _done(rule, alive_logp, fin_scores, limits, alpha)

  def cond(carry):
    i, _, alive_logp, _, fin_scores, _ = carry
    return (i < length) & ~(stop_early & jnp.all(done_of(alive_logp, fin_scores)))

  def body(carry):
    i, alive_seqs, alive_logp, fin_seqs, fin_scores, state = carry
    done = done_of(alive_logp, fin_scores)
    logits, state = step(state, alive_seqs.reshape(batch * k, -1), i)
    logp = _token_logprobs(logits, jnp.repeat(i + 1 >= limits, k))
    vocab = logp.shape[-1]
    cand = (alive_logp[..., None] + logp.reshape(batch, k, vocab)).reshape(batch, k * vocab)
    top_logp, top_idx = jax.lax.top_k(cand, 2 * k)          # [B, 2K]
    beam, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    top_seqs = jnp.take_along_axis(alive_seqs, beam[..., None], axis=1)
    top_seqs = jax.lax.dynamic_update_slice_in_dim(top_seqs, token[..., None], i + 1, axis=2)
    is_eos = token == EOS_ID

    finishing = is_eos & offered & (top_logp > NEG_INF) & ~done[:, None]
    new_scores = jnp.where(finishing, top_logp / length_penalty(i + 1.0, alpha), NEG_INF)
    fin_scores, pick = jax.lax.top_k(jnp.concatenate([fin_scores, new_scores], 1), k)
    fin_seqs = jnp.take_along_axis(jnp.concatenate([fin_seqs, top_seqs], 1),
                                   pick[..., None], axis=1)

    alive_logp, pick = jax.lax.top_k(jnp.where(is_eos, NEG_INF, top_logp), k)
    alive_seqs = jnp.take_along_axis(top_seqs, pick[..., None], axis=1)
    rows = (base + jnp.take_along_axis(beam, pick, axis=1)).reshape(-1)
    return i + 1, alive_seqs, alive_logp, fin_seqs, fin_scores, _reorder(state, rows)

  init = (jnp.int32(0), alive_seqs, alive_logp, jnp.zeros_like(alive_seqs),
          jnp.full((batch, k), NEG_INF), state)
  steps, alive_seqs, alive_logp, fin_seqs, fin_scores, _ = jax.lax.while_loop(cond, body, init)
  found = fin_scores[:, 0] > NEG_INF
  best = jnp.where(found[:, None], fin_seqs[:, 0], alive_seqs[:, 0])
  score = jnp.where(found, fin_scores[:, 0], alive_logp[:, 0])
  return Decoded(best[:, 1:], score, steps)


def search(model: Transformer, params, src: Array, *, beam_size: int = 1, alpha: float = 0.6,
           max_len_a: float = 1.5, max_len_b: float = 10.0, cached: bool = True,
           beam_rule: str = "t5x") -> Decoded:
  """Greedy search when ``beam_size == 1``, beam search (``beam_rule``) otherwise."""
  if beam_size < 1:
    raise ValueError(f"beam size must be at least 1, got {beam_size}")
  if beam_rule not in BEAM_RULES:
    raise ValueError(f"beam rule {beam_rule!r}: expected one of {', '.join(BEAM_RULES)}")
  kw = dict(max_len_a=float(max_len_a), max_len_b=float(max_len_b), cached=cached)
  if beam_size == 1:
    return greedy_search(model, params, src, **kw)
  return beam_search(model, params, src, beam_size=beam_size, alpha=float(alpha),
                     rule=beam_rule, **kw)


def _pow2_at_least(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def padded_width(n: int, min_width: int = MIN_WIDTH) -> int:
  """The smallest of 16, 24, 32, 48, 64, 96, ... (steps of x1.5 / x4/3) that holds ``n``;
  ``min_width`` replaces 16 (the config's ``decode.min_width``: at ``data.max_len`` every
  batch has one width, one program to compile)."""
  width = min_width
  while True:
    if n <= width:
      return width
    if n <= width * 3 // 2:
      return width * 3 // 2
    width *= 2


def plan_batches(lengths: Sequence[int], *, max_sentences: int = 64, max_tokens: int = 4096,
                 min_width: int = MIN_WIDTH) -> list[tuple[int, int, list[int]]]:
  """Groups sources by padded width: a list of (rows, width, source indices).

  Widths come from :func:`padded_width`; the row count is a power of two
  with ``rows * width <= max_tokens`` (at least one row), so the set of
  compiled shapes stays small. The last batch of a width may hold fewer
  sources than rows (the rest are empty rows).
  """
  groups: dict[int, list[int]] = {}
  for i, n in enumerate(lengths):
    width = padded_width(n, min_width)
    groups.setdefault(width, []).append(i)
  plan = []
  for width in sorted(groups):
    cap = max(1, min(max_sentences, max_tokens // width))
    cap = 1 << (cap.bit_length() - 1)                      # power of two <= cap
    members = sorted(groups[width], key=lambda j: -lengths[j])
    for start in range(0, len(members), cap):
      chunk = members[start:start + cap]
      plan.append((min(cap, _pow2_at_least(len(chunk))), width, chunk))
  return plan


def decode_ids(model: Transformer, params, sources: Sequence[Sequence[int]], *,
               beam_size: int = 1, alpha: float = 0.6, max_len_a: float = 1.5,
               max_len_b: float = 10.0, cached: bool = True, beam_rule: str = "t5x",
               max_sentences: int = 64, max_tokens: int = 4096, min_width: int = MIN_WIDTH,
               partitioner: Optional[JitPartitioner] = None) -> list[list[int]]:
  """Translates token-id sources (as the model reads them) into target ids.

  Returns, in input order, each output without EOS. Empty sources give ``[]``
  without running the model. With a ``partitioner`` every process calls this with the
  same sources: each batch (rows rounded up to a multiple of the batch shards) is one
  program over its mesh, each process feeding the rows its devices hold, and every
  process gets every output. ``params`` are then placed as the partitioner's
  programs take them (they are not moved here).
  """
  outputs: list[list[int]] = [[] for _ in sources]
  todo = [i for i, s in enumerate(sources) if len(s)]
  plan = plan_batches([len(sources[i]) for i in todo], max_sentences=max_sentences,
                      max_tokens=max_tokens, min_width=min_width)
  params = nn.meta.unbox(params)
  multiple = partitioner.global_batch_multiple if partitioner else 1
  for rows, width, chunk in plan:
    src = np.zeros((-(-rows // multiple) * multiple, width), np.int32)
    for r, j in enumerate(chunk):
      ids = sources[todo[j]]
      src[r, :len(ids)] = ids
    if partitioner:
      src = partitioner.shard_batch(partitioner.rows.take({"src": src}))["src"]
    tokens = to_host(search(model, params, src, beam_size=beam_size, alpha=alpha,
                            max_len_a=max_len_a, max_len_b=max_len_b, cached=cached,
                            beam_rule=beam_rule).tokens)
    for r, j in enumerate(chunk):
      outputs[todo[j]] = strip_eos(tokens[r])
  return outputs


def strip_eos(tokens: np.ndarray) -> list[int]:
  """Ids up to (not including) the first EOS or PAD. ``[L]`` -> list."""
  out = []
  for t in tokens.tolist():
    if t in (EOS_ID, PAD_ID):
      break
    out.append(t)
  return out

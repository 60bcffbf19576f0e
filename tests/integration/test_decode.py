"""Greedy and beam search on tiny random models: cache vs full recompute, exact search, batching."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mt_flax import decode
from mt_flax.model import Transformer

V = 40
EOS = decode.EOS_ID


@pytest.fixture(scope="module")
def make_model(tiny_model):
  """``make(eos_bias=0.5, vocab=V, **overrides) -> (model, params)``: a tiny random model
  whose EOS logit is raised so that hypotheses end at varied lengths."""
  def make(eos_bias: float = 0.5, vocab: int = V, **overrides):
    model, params = tiny_model(src_vocab_size=vocab, tgt_vocab_size=vocab, **overrides)
    params["logits_dense"]["bias"] = params["logits_dense"]["bias"].at[EOS].set(eos_bias)
    return model, params
  return make


@pytest.fixture(scope="module")
def tiny(make_model):
  return make_model()


def ragged_sources(seed: int, lengths, width: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  src = np.zeros((len(lengths), width), np.int32)
  for b, n in enumerate(lengths):
    src[b, :n] = rng.integers(4, V, n)
  return src


def full_logits(model, params):
  """The whole model, re-run from scratch: src [B, S], tgt_in [B, T] -> logits [B, T, V]."""
  return jax.jit(lambda src, tgt: model.apply({"params": params}, src, tgt))


def reference_greedy(run, src_row: np.ndarray, limit: int, width: int) -> list[int]:
  """Greedy in plain Python: re-runs the full model (``run``) on each prefix.

  Prefixes are zero-padded to ``width`` so that one compiled function serves
  every step (padding invariance is proven by the model tests).
  """
  prefix = np.zeros((1, width), np.int32)
  prefix[0, 0] = decode.BOS_ID
  out = []
  for t in range(limit):
    logits = run(src_row[None], prefix)[:, t]
    logp = np.asarray(decode._token_logprobs(logits, jnp.asarray([t + 1 >= limit])))
    out.append(int(np.argmax(logp[0])))
    if out[-1] == EOS:
      return out
    prefix[0, t + 1] = out[-1]
  raise AssertionError("the length limit must force EOS")


def as_lists(tokens) -> list[list[int]]:
  """[B, L] -> each row up to and including EOS."""
  out = []
  for row in np.asarray(tokens).tolist():
    out.append(row[:row.index(EOS) + 1] if EOS in row else row)
  return out


def test_cached_greedy_equals_rerunning_the_full_decoder_on_each_prefix(tiny):
  model, params = tiny
  a, b = 1.0, 3.0
  src = ragged_sources(0, [9, 2, 5, 1], width=9)
  limits = [decode.max_target_len(int((row != 0).sum()), a, b) for row in src]
  run = full_logits(model, params)
  expected = [reference_greedy(run, row, n, max(limits)) for row, n in zip(src, limits)]
  assert len({len(e) for e in expected}) > 1, "outputs should end at different steps"
  cached = decode.greedy_search(model, params, src, max_len_a=a, max_len_b=b)
  full = decode.greedy_search(model, params, src, max_len_a=a, max_len_b=b, cached=False)
  assert as_lists(cached.tokens) == expected
  assert as_lists(full.tokens) == expected
  np.testing.assert_allclose(cached.scores, full.scores, atol=1e-4)


def test_beam_size_one_equals_greedy_under_the_fairseq_rule(tiny):
  model, params = tiny
  src = ragged_sources(1, [7, 3, 11, 4, 1, 8], width=11)
  greedy = decode.greedy_search(model, params, src, max_len_a=1.5, max_len_b=2.0)
  beam = decode.beam_search(model, params, src, beam_size=1, alpha=0.6, max_len_a=1.5,
                            max_len_b=2.0, rule="fairseq")
  np.testing.assert_array_equal(beam.tokens, greedy.tokens)


# A hand-built scorer: the next-token distribution depends on the last two tokens only.
A, B, C, D = 4, 5, 6, 7


def trigram_step(table: dict) -> decode.Step:
  """``table[(prev, cur)] = {token: probability}``; unlisted contexts give EOS."""
  logp = np.full((8, 8, 8), -np.inf, np.float32)
  logp[:, :, EOS] = 0.0
  for (prev, cur), probs in table.items():
    logp[prev, cur] = -np.inf
    for token, p in probs.items():
      logp[prev, cur, token] = np.log(p)
  logp = jnp.asarray(logp)

  def step(state, seqs, i):
    prev = jax.lax.dynamic_index_in_dim(seqs, jnp.maximum(i - 1, 0), axis=1, keepdims=False)
    cur = jax.lax.dynamic_index_in_dim(seqs, i, axis=1, keepdims=False)
    return logp[prev, cur], state
  return step


def run_rule(table: dict, limit: int, alpha: float, rule: str, beam_size: int = 2):
  out = decode.beam_search_steps(trigram_step(table), {}, jnp.asarray([limit]), length=limit,
                                 beam_size=beam_size, alpha=alpha, rule=rule)
  return as_lists(out.tokens)[0], float(out.scores[0])


def test_an_eos_ranked_below_k_finishes_under_t5x_not_fairseq():
  bos = decode.BOS_ID
  table = {(bos, bos): {A: 0.5, B: 0.3, EOS: 0.15, C: 0.05},   # EOS third of 2K = 4
           (bos, A): {EOS: 0.1, A: 0.9}, (bos, B): {EOS: 0.1, B: 0.9}}
  tokens, score = run_rule(table, limit=2, alpha=0.0, rule="t5x")
  assert tokens == [EOS] and score == pytest.approx(np.log(0.15), abs=1e-5)
  tokens, score = run_rule(table, limit=2, alpha=0.0, rule="fairseq")
  assert tokens == [A, EOS] and score == pytest.approx(np.log(0.5 * 0.1), abs=1e-5)


def test_t5x_goes_on_while_an_alive_beam_can_still_win():
  bos = decode.BOS_ID
  table = {(bos, bos): {A: 0.6, B: 0.4}, (bos, A): {EOS: 0.5, C: 0.45, D: 0.05},
           (bos, B): {EOS: 0.7, D: 0.3}}
  penalty = lambda n: (5.0 + n) / 6.0                             # alpha = 1
  # Step 2 finishes "a" (0.30) and "b" (0.28): fairseq has K = 2 and stops.
  tokens, score = run_rule(table, limit=3, alpha=1.0, rule="fairseq")
  assert tokens == [A, EOS] and score == pytest.approx(np.log(0.3) / penalty(2), abs=1e-5)
  # "a c" (0.27) may still reach log(0.27) / penalty(3) > log(0.28) / penalty(2): t5x goes on.
  tokens, score = run_rule(table, limit=3, alpha=1.0, rule="t5x")
  assert tokens == [A, C, EOS] and score == pytest.approx(np.log(0.27) / penalty(3), abs=1e-5)


def test_t5x_stops_once_no_alive_beam_can_win():
  bos = decode.BOS_ID
  table = {(bos, bos): {EOS: 0.5, A: 0.3, B: 0.2}, (bos, A): {EOS: 0.9, A: 0.1},
           (bos, B): {EOS: 0.9, B: 0.1}}
  outs = [decode.beam_search_steps(trigram_step(table), {}, jnp.asarray([10]), length=10,
                                   beam_size=2, alpha=0.0, stop_early=stop) for stop in (True, False)]
  # After step 2 the finished are [EOS] (0.5) and [a, EOS] (0.27); the best alive, "a a"
  # (0.03), cannot beat them whatever follows.
  assert int(outs[0].steps) == 2 and int(outs[1].steps) == 10
  assert as_lists(outs[0].tokens) == as_lists(outs[1].tokens) == [[EOS]]


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.5])
def test_t5x_stopping_early_gives_the_same_result_as_running_to_the_limit(alpha, make_model):
  model, params = make_model(eos_bias=2.0)
  params["logits_dense"]["kernel"] = params["logits_dense"]["kernel"] * 6.0   # peaked
  src = jnp.asarray(ragged_sources(6, [5, 1, 8, 3, 7, 2], width=8))
  k, a, b = 3, 1.0, 4.0
  length = decode._static_len(model, src.shape[1], a, b)
  limits = decode._limits(src, a, b, length)
  encoded = model.apply({"params": params}, src, method=Transformer.encode)
  outs = []
  for stop_early in (True, False):
    state, step = decode._cached_stepper(model, params, jnp.repeat(encoded, k, axis=0),
                                         jnp.repeat(src, k, axis=0), length)
    outs.append(decode.beam_search_steps(step, state, limits, length=length, beam_size=k,
                                         alpha=alpha, stop_early=stop_early))
  np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
  np.testing.assert_allclose(outs[0].scores, outs[1].scores, atol=1e-5)
  assert len({len(t) for t in as_lists(outs[0].tokens)}) > 1, "outputs of varied lengths"


def test_unknown_beam_rule_is_an_error(tiny):
  model, params = tiny
  with pytest.raises(ValueError, match="beam rule 'marian'.*t5x, fairseq"):
    decode.search(model, params, np.ones((1, 3), np.int32), beam_size=2, beam_rule="marian")


def test_cached_beam_search_equals_full_recompute(tiny):
  model, params = tiny
  src = ragged_sources(2, [6, 2, 9], width=9)
  kw = dict(beam_size=4, alpha=0.6, max_len_a=1.0, max_len_b=4.0)
  cached = decode.beam_search(model, params, src, **kw)
  full = decode.beam_search(model, params, src, cached=False, **kw)
  np.testing.assert_array_equal(cached.tokens, full.tokens)
  np.testing.assert_allclose(cached.scores, full.scores, atol=1e-4)


def sequence_scores(model, params, src_row, seqs, limit, alpha) -> np.ndarray:
  """Length-normalised log-probabilities of EOS-terminated ``seqs`` under the search's rules.

  One full-model call scores every prefix of every sequence (the decoder is causal).
  """
  tgt_out = np.zeros((len(seqs), limit), np.int32)
  for i, seq in enumerate(seqs):
    tgt_out[i, :len(seq)] = seq
  tgt_in = np.concatenate([np.full((len(seqs), 1), decode.BOS_ID, np.int32), tgt_out[:, :-1]], 1)
  tgt_in[tgt_out == 0] = 0
  src = np.repeat(src_row[None], len(seqs), axis=0)
  logits = np.asarray(full_logits(model, params)(src, tgt_in))
  scores = np.zeros(len(seqs))
  for t in range(limit):
    logp = np.asarray(decode._token_logprobs(logits[:, t], jnp.full((len(seqs),), t + 1 >= limit)))
    picked = logp[np.arange(len(seqs)), tgt_out[:, t]]
    scores += np.where(tgt_out[:, t] != 0, picked, 0.0)
  lengths = (tgt_out != 0).sum(1)
  return scores / np.asarray(decode.length_penalty(lengths.astype(np.float32), alpha))


def test_a_wide_beam_finds_the_best_sequence_by_exhaustive_search(make_model):
  vocab, alpha, limit = 7, 0.6, 3        # words 1 (unk), 4, 5, 6 plus EOS
  model, params = make_model(eos_bias=0.5, vocab=vocab)
  src = np.asarray([[4, 5, 6, 5]], np.int32)
  words = [1, 4, 5, 6]
  candidates = [list(p) + [EOS] for n in range(limit) for p in itertools.product(words, repeat=n)]
  scores = sequence_scores(model, params, src[0], candidates, limit, alpha)
  best = candidates[int(np.argmax(scores))]
  out = decode.beam_search(model, params, src, beam_size=32, alpha=alpha, max_len_a=0.0,
                           max_len_b=float(limit))
  assert as_lists(out.tokens)[0] == best
  np.testing.assert_allclose(float(out.scores[0]), max(scores), atol=1e-4)
  # beam search never returns a worse hypothesis than greedy under its own objective
  greedy = as_lists(decode.greedy_search(model, params, src, max_len_a=0.0,
                                         max_len_b=float(limit)).tokens)[0]
  assert max(scores) >= sequence_scores(model, params, src[0], [greedy], limit, alpha)[0]


def test_no_eos_means_exactly_the_length_limit_then_eos(make_model):
  model, params = make_model(eos_bias=-1e4)    # EOS only when forced
  a, b = 1.5, 2.0
  lengths = [1, 4, 7]
  src = ragged_sources(3, lengths, width=7)
  for out in (decode.greedy_search(model, params, src, max_len_a=a, max_len_b=b),
              decode.beam_search(model, params, src, beam_size=3, max_len_a=a, max_len_b=b)):
    got = as_lists(out.tokens)
    assert [len(g) for g in got] == [decode.max_target_len(n, a, b) for n in lengths]
    assert all(g[-1] == EOS and EOS not in g[:-1] for g in got)
    assert not np.isin(np.asarray(out.tokens), [decode.PAD_ID, decode.BOS_ID])[
        np.asarray(out.tokens) != 0].any()


def test_decode_ids_keeps_order_and_each_output_is_independent_of_its_batch(tiny):
  model, params = tiny
  rng = np.random.default_rng(4)
  sources = [rng.integers(4, V, n).tolist() for n in [3, 17, 1, 5, 0, 9]]
  kw = dict(beam_size=2, alpha=0.6, max_len_a=1.0, max_len_b=3.0)
  together = decode.decode_ids(model, params, sources, max_sentences=4, **kw)
  alone = [decode.decode_ids(model, params, [s], **kw)[0] for s in sources]
  assert together == alone
  assert together[4] == []
  assert all(EOS not in out and len(out) < decode.max_target_len(len(s), 1.0, 3.0)
             for s, out in zip(sources, together) if s)


def test_plan_batches_covers_each_source_once_with_few_shapes():
  rng = np.random.default_rng(5)
  lengths = rng.integers(1, 97, 500).tolist()
  plan = decode.plan_batches(lengths, max_sentences=64, max_tokens=2048)
  covered = sorted(i for _, _, idx in plan for i in idx)
  assert covered == list(range(500))
  for rows, width, idx in plan:
    assert len(idx) <= rows and all(lengths[i] <= width for i in idx)
    assert rows & (rows - 1) == 0 and width == decode.padded_width(width)
  assert len({w for _, w, _ in plan}) <= 6                # 16, 24, 32, 48, 64, 96
  assert len({(r, w) for r, w, _ in plan}) <= 6 * 7       # widths x powers of two


def test_beam_size_must_be_positive(tiny):
  model, params = tiny
  with pytest.raises(ValueError, match="beam size"):
    decode.search(model, params, np.ones((1, 3), np.int32), beam_size=0)

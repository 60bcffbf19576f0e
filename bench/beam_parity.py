"""Beam parity: mt_flax's beam search against the Flax WMT example's ``beam_search``.

    python -m bench.beam_parity --workdir RUN --flax-decode /tmp/flax_wmt/decode.py \
        [--sentences 200] [--examples 5] [--max-len-a A --max-len-b B]

The Flax example's ``decode.py`` (google/flax, ``examples/wmt/decode.py``) is
not part of this repository: ``--flax-decode`` names a copy of it, imported
from that path at run time. Both searches drive the same trained model and the
same key/value cache (allocated by ``mt_flax.decode._cached_stepper``), one
source at a time, beam 4 and alpha 0.6 unless the run's config says otherwise,
on the first ``--sentences`` test sources. mt_flax decodes each source with
``decode.decode_ids`` under its two rules, ``t5x`` and ``fairseq``; the
figures are the numbers (and fractions) of sources whose outputs, up to EOS,
are the same token lists as the example's. Under the ``t5x`` rule every output should
equal the example's; under ``fairseq`` some differ, and in a difference the
example's output should score higher.

Conventions bridged (the example's left as they are, mt_flax's imposed on the
model side through the ``tokens_to_logits`` function handed to it):

* Start token. The example's sequences start with id 0 and it feeds that 0 to
  the decoder at the first step; mt_flax's decoder starts from BOS (2). The
  scorer maps the first step's input to BOS. Id 0 is PAD here, which is never
  generated, so it is never seen again as an input before the length limit.
* EOS. The example's default ``eos_id`` is 2 (BOS here); it is given
  ``eos_id=EOS_ID`` (3).
* PAD and BOS exclusion. Their logits are set to -inf before the example's
  own ``log_softmax``, which then computes the same log-probabilities as
  mt_flax's ``_token_logprobs``.
* Length limit. ``--max-len-a``/``--max-len-b`` replace the run's settings
  (a tight limit makes many outputs end with a forced EOS). A source of ``n``
  tokens (EOS included) may get ``floor(a * n + b)`` target tokens, EOS
  included (``decode.max_target_len``, clipped to the static length ``L`` of
  its padded width). The example stops after ``max_decode_len - 1`` tokens and
  forces nothing; it is given ``max_decode_len = L + 1`` (its sequences hold
  the start token at 0), one compiled shape per padded width as in
  ``decode_ids``.
* Forced EOS at the limit. mt_flax lets only EOS be chosen at the step that
  reaches the source's limit, scored with EOS's *unrestricted* log-probability
  (it is not renormalised to 0). A ``log_softmax`` over EOS alone would give 0,
  so at that step the scorer returns EOS's log-probability ``e`` and puts the
  rest of the mass, ``log(1 - exp(e))``, on PAD: the example's ``log_softmax``
  then gives EOS ``e`` (to float rounding, ~1e-7) and every other token -inf
  but PAD. Each alive beam so yields exactly two finite candidates (EOS and
  PAD), so all EOS candidates are among the top ``2K`` and are offered to the
  finished set, as in mt_flax. Past the limit only PAD is finite (log-prob 0):
  the PAD-ended beams stay alive and can never finish, so the finished set is
  frozen from the limit on (the example may run more steps; they change
  nothing).
* Length penalty. Both divide a finished hypothesis's log-probability by
  ``((5 + len) / 6) ** alpha``, ``len`` counting the tokens generated with
  EOS, start token not counted (the example's ``cur_index + 1``). The
  example's stopping bound uses the penalty at ``max_decode_len = L + 1``,
  mt_flax's at the source's limit; both are upper bounds on what an alive beam
  can still score, so neither changes the result.
* Output. The example returns its ``K`` finished hypotheses in ascending score
  order; the last is its answer (or the best alive one if none finished).

``max_score_gap_identical``: the largest difference between the two
searches' scores of the same output (either rule), which checks the bridging of
scores; ``flax_outputs_at_limit``: outputs as long as their source's limit
allows (their EOS was forced). Disagreements are listed with both token lists
and both scores (the example's returned score, mt_flax's ``Decoded.scores``
for the same padded source: both log-probability / length penalty);
``example_higher_<rule>`` counts the disagreements where the example's output
scores higher.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from types import ModuleType
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bench import environment, load_flax_example
from mt_flax import decode
from mt_flax.special_ids import BOS_ID, EOS_ID, PAD_ID


def load_flax_decode(path: str) -> ModuleType:
  """Imports the Flax WMT example's ``decode.py`` from ``path`` (one-line
  FileNotFoundError when it is not that file)."""
  return load_flax_example(path, "--flax-decode", "decode.py", "beam_search")


def _bridged_logits(logits: jax.Array, step: jax.Array, limits: jax.Array) -> jax.Array:
  """Logits ``[N, V]`` whose ``log_softmax`` follows mt_flax's rules (see the module doc).

  ``step``: the decoder step (0 = first generated token); ``limits`` ``[N]``.
  """
  vocab = jnp.arange(logits.shape[-1])
  masked = jnp.where((vocab == PAD_ID) | (vocab == BOS_ID), -jnp.inf, logits)
  eos = jax.nn.log_softmax(masked, axis=-1)[:, EOS_ID]
  eos = jnp.where(step + 1 == limits, eos, -jnp.inf)        # past the limit: no EOS
  rest = jnp.log1p(-jnp.exp(eos))                            # the remaining mass, on PAD
  forced = jnp.where(vocab == EOS_ID, eos[:, None], jnp.where(vocab == PAD_ID, rest[:, None],
                                                                 -jnp.inf))
  return jnp.where((step + 1 >= limits)[:, None], forced, masked)


def flax_search(flax_decode: ModuleType, model, params, src: jax.Array, *, beam_size: int,
                alpha: float, max_len_a: float, max_len_b: float) -> tuple[jax.Array, jax.Array]:
  """The example's beam search over this model.

  src ``[B, S]`` -> (tokens ``[B, L]``, scores ``[B]``): its best hypothesis per source.
  """
  k = beam_size
  length = decode._static_len(model, src.shape[1], max_len_a, max_len_b)
  limits = jnp.repeat(decode._limits(src, max_len_a, max_len_b, length), k)   # [B*K]
  encoded = model.apply({"params": params}, src, method=type(model).encode)
  cache, _ = decode._cached_stepper(model, params, encoded, src, length)      # rows [B]
  _, step = decode._cached_stepper(model, params, jnp.repeat(encoded, k, axis=0),
                                   jnp.repeat(src, k, axis=0), length)        # rows [B*K]

  def tokens_to_logits(ids, state):
    """ids ``[B*K, 1]`` (the example's start token is 0) -> logits ``[B*K, V]``."""
    i = state["step"]
    ids = jnp.where(i == 0, BOS_ID, ids)
    logits, model_cache = step(state["model"], ids, 0)
    return _bridged_logits(logits, i, limits), {"model": model_cache, "step": i + 1}

  seqs, scores = flax_decode.beam_search(src, {"model": cache, "step": jnp.int32(0)},
                                         tokens_to_logits, beam_size=k, alpha=alpha,
                                         eos_id=EOS_ID, max_decode_len=length + 1)
  return seqs[:, -1, 1:], scores[:, -1]


def _padded(ids: Sequence[int]) -> np.ndarray:
  """One source as ``decode_ids`` pads it: ``[1, padded_width(len)]``."""
  src = np.zeros((1, decode.padded_width(len(ids))), np.int32)
  src[0, :len(ids)] = ids
  return src


def _mt_score(model, params, src: np.ndarray, settings: dict, rule: str) -> float:
  """mt_flax's score of its output for ``src`` ``[1, S]`` (log-probability / penalty)."""
  out = decode.search(model, params, src, beam_size=settings["beam_size"],
                      alpha=settings["alpha"], max_len_a=settings["max_len_a"],
                      max_len_b=settings["max_len_b"], beam_rule=rule)
  return float(out.scores[0])


RULES = ("t5x", "fairseq")


def compare(model, params, flax_decode: ModuleType, sources: Sequence[Sequence[int]],
            settings: dict, *, examples: int = 5) -> dict[str, Any]:
  """Decodes every source with both searches; counts identical outputs per mt_flax rule.

  ``settings``: ``beam_size``, ``alpha``, ``max_len_a``, ``max_len_b``.
  ``example_higher_<rule>``: disagreements where the example's output scores
  higher than mt_flax's.
  """
  run_flax = jax.jit(functools.partial(flax_search, flax_decode),
                     static_argnames=("model", "beam_size", "alpha", "max_len_a", "max_len_b"))
  kw = {key: settings[key] for key in ("beam_size", "alpha", "max_len_a", "max_len_b")}
  seconds = {"flax": 0.0, **{rule: 0.0 for rule in RULES}}
  same, higher = dict.fromkeys(RULES, 0), dict.fromkeys(RULES, 0)
  listed: dict[str, list] = {rule: [] for rule in RULES}
  score_gap, at_limit = 0.0, 0
  for n, ids in enumerate(sources):
    src = _padded(ids)
    start = time.perf_counter()
    tokens, score = run_flax(model, params, jnp.asarray(src), **kw)
    theirs, their_score = decode.strip_eos(np.asarray(tokens)[0]), float(score[0])
    seconds["flax"] += time.perf_counter() - start
    limit = decode.max_target_len(len(ids), settings["max_len_a"], settings["max_len_b"])
    at_limit += len(theirs) + 1 >= limit
    for rule in RULES:
      start = time.perf_counter()
      ours = decode.decode_ids(model, params, [list(ids)], beam_rule=rule, **kw)[0]
      seconds[rule] += time.perf_counter() - start
      our_score = _mt_score(model, params, src, settings, rule)
      if ours == theirs:
        same[rule] += 1
        score_gap = max(score_gap, abs(our_score - their_score))
        continue
      higher[rule] += their_score > our_score
      if len(listed[rule]) < examples:
        listed[rule].append({"index": n, "src_len": len(ids), "limit": limit,
                             "mt_flax": ours, "mt_flax_score": our_score,
                             "flax_example": theirs, "flax_example_score": their_score})
  result: dict[str, Any] = {"sentences": len(sources)}
  for rule in RULES:
    result[f"identical_{rule}"] = same[rule]
    result[f"fraction_{rule}"] = same[rule] / max(len(sources), 1)
    result[f"example_higher_{rule}"] = int(higher[rule])
  result.update(max_score_gap_identical=score_gap, flax_outputs_at_limit=int(at_limit),
                disagreements=listed, seconds=seconds)
  return result


def run_parity(workdir: str, flax_decode: ModuleType, *, sentences: int = 200,
               split: str = "test", beam_size: int = 4, max_len_a: Optional[float] = None,
               max_len_b: Optional[float] = None, examples: int = 5) -> dict[str, Any]:
  """The parity figures for the first ``sentences`` sources of ``split`` of a trained run.

  ``max_len_a``/``max_len_b`` replace the run's length limit when given.
  """
  from mt_flax import data
  from mt_flax.inference import decode_settings, load_trained
  trained = load_trained(workdir)
  picked = data.eval_examples(trained.config, trained.tokenizer, split)[:sentences]
  settings = decode_settings(trained.config, beam_size)
  if max_len_a is not None:
    settings["max_len_a"] = float(max_len_a)
  if max_len_b is not None:
    settings["max_len_b"] = float(max_len_b)
  out: dict[str, Any] = {"benchmark": "beam_parity", "workdir": workdir, "step": trained.step,
                         "split": split, "beam_size": beam_size, "alpha": settings["alpha"],
                         "max_len_a": settings["max_len_a"], "max_len_b": settings["max_len_b"],
                         "environment": environment()}
  out.update(compare(trained.model, trained.params, flax_decode,
                     [ex["src_ids"] for ex in picked], settings, examples=examples))
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a finished `mt_flax train` run")
  parser.add_argument("--flax-decode", required=True,
                      help="path of a copy of google/flax examples/wmt/decode.py")
  parser.add_argument("--sentences", type=int, default=200)
  parser.add_argument("--beam-size", type=int, default=4)
  parser.add_argument("--max-len-a", type=float, default=None,
                      help="length limit a*n+b: replaces the run's decode.max_len_a")
  parser.add_argument("--max-len-b", type=float, default=None,
                      help="replaces the run's decode.max_len_b")
  parser.add_argument("--examples", type=int, default=5, help="disagreements listed per rule")
  args = parser.parse_args()
  try:
    flax_decode = load_flax_decode(args.flax_decode)
  except FileNotFoundError as e:
    sys.exit(f"error: {e}")
  result = run_parity(args.workdir, flax_decode, sentences=args.sentences,
                      beam_size=args.beam_size, max_len_a=args.max_len_a,
                      max_len_b=args.max_len_b, examples=args.examples)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()

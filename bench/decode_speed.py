"""Decoding speed: greedy and beam 4, with the key/value cache vs full recomputation.

    python -m bench.decode_speed [--quick] [--batch 32] [--src-len 24] [--tgt-len 30]
    python -m bench.decode_speed --workdir DIR [--sentences 200]   # a trained run, real text

The model has the default experiment's shape (``experiments/bible_en_es_tiny.py``:
d_model 128, 4 heads, 2+2 layers, MLP 512, shared vocabulary of 4000) with
random weights and its EOS logit pushed to -1e9, so every hypothesis runs
exactly ``tgt_len`` steps (EOS forced at the limit: ``max_len_a=0``,
``max_len_b=tgt_len``) and the work is the same for every variant. Sources are
random full rows ``[batch, src_len]``. Compilation is timed apart from the
repeats; ``sentences_per_s`` and ``tokens_per_s`` (target tokens, EOS
included) are medians over the repeats. Cached beam-4 decoding should reach at
least 5x the uncached decoder's speed (the target ``bench.all`` checks).
"""
from __future__ import annotations

import argparse
import json
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from bench import environment, median, repeat, seconds
from mt_flax import decode
from mt_flax.model import Transformer, TransformerConfig, count_params, init_params

MODEL = dict(d_model=128, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, mlp_dim=512,
             share_embeddings=True, tie_output=False, dropout_rate=0.0)
VOCAB = 4000


def never_eos_model(vocab: int = VOCAB, seed: int = 0):
  """(model, params) of the default shape whose EOS is only ever forced by the length limit."""
  model = Transformer(TransformerConfig(src_vocab_size=vocab, tgt_vocab_size=vocab, **MODEL))
  params = jax.jit(lambda rng: nn.meta.unbox(init_params(model, rng)))(jax.random.PRNGKey(seed))
  params = jax.tree_util.tree_map(np.array, params)        # writable host copies
  params["logits_dense"]["bias"][decode.EOS_ID] = -1e9
  return model, params


def measure(model, params, src: np.ndarray, *, beam_size: int, cached: bool, tgt_len: int,
            repeats: int) -> dict[str, Any]:
  """Speed of one search variant on ``src`` ``[B, S]``."""
  run = lambda: decode.search(model, params, src, beam_size=beam_size, max_len_a=0.0,
                              max_len_b=float(tgt_len), cached=cached).tokens.block_until_ready()
  compile_s = seconds(run)
  tokens = np.asarray(decode.search(model, params, src, beam_size=beam_size, max_len_a=0.0,
                                    max_len_b=float(tgt_len), cached=cached).tokens)
  target_tokens = int((tokens != 0).sum())
  times = repeat(run, repeats, warmup=0)
  t = median(times)
  return {"seconds": t, "first_call_s": compile_s, "repeats": repeats,
          "sentences_per_s": src.shape[0] / t, "tokens_per_s": target_tokens / t,
          "target_tokens": target_tokens}


def run(quick: bool, *, batch: int = 32, src_len: int = 24, tgt_len: int = 30) -> dict:
  """All four variants; ``*_speedup`` = cached / uncached sentences per second."""
  if quick:
    batch = min(batch, 16)
  repeats = 2 if quick else 5
  model, params = never_eos_model()
  src = np.random.default_rng(0).integers(4, VOCAB, (batch, src_len)).astype(np.int32)
  result: dict[str, Any] = {
      "benchmark": "decode_speed", "quick": quick, "batch": batch, "src_len": src_len,
      "tgt_len": tgt_len, "model": {**MODEL, "vocab": VOCAB, "params": count_params(params)},
      "environment": environment()}
  for name, beam in (("greedy", 1), ("beam4", 4)):
    for cached in (True, False):
      key = f"{name}_{'cached' if cached else 'uncached'}"
      result[key] = measure(model, params, src, beam_size=beam, cached=cached, tgt_len=tgt_len,
                            repeats=repeats)
    result[f"{name}_cached_speedup"] = (result[f"{name}_cached"]["sentences_per_s"]
                                        / result[f"{name}_uncached"]["sentences_per_s"])
  return result


def run_trained(workdir: str, *, split: str = "test", sentences: int = 200,
                repeats: int = 2) -> dict:
  """The four variants on the first ``sentences`` real sources of ``split`` with a trained run.

  Uses :func:`mt_flax.decode.decode_ids` (length-bucketed batches) and the
  run's decode settings; the first call (compilation included) is reported
  apart from the median of the ``repeats`` that follow.
  """
  from mt_flax import data
  from mt_flax.inference import decode_settings, load_trained

  trained = load_trained(workdir)
  examples = data.eval_examples(trained.config, trained.tokenizer, split)[:sentences]
  sources = [ex["src_ids"] for ex in examples]
  result: dict[str, Any] = {"benchmark": "decode_speed_trained", "workdir": workdir,
                            "step": trained.step, "split": split, "sentences": len(sources),
                            "environment": environment()}
  for name, beam in (("greedy", 1), ("beam4", 4)):
    settings = decode_settings(trained.config, beam)
    for cached in (True, False):
      outputs = []
      go = lambda: outputs.append(decode.decode_ids(trained.model, trained.params, sources,
                                                    cached=cached, **settings))
      first = seconds(go)
      t = median([seconds(go) for _ in range(repeats)])
      tokens = sum(len(o) + 1 for o in outputs[-1])           # EOS included
      result[f"{name}_{'cached' if cached else 'uncached'}"] = {
          "seconds": t, "first_call_s": first, "sentences_per_s": len(sources) / t,
          "tokens_per_s": tokens / t, "target_tokens": tokens}
    result[f"{name}_cached_speedup"] = (result[f"{name}_cached"]["sentences_per_s"]
                                        / result[f"{name}_uncached"]["sentences_per_s"])
  return result


def decode_parser(doc: str) -> argparse.ArgumentParser:
  """The flags the decoding benchmarks share (random sources, or a trained run's)."""
  parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--src-len", type=int, default=24)
  parser.add_argument("--tgt-len", type=int, default=30)
  parser.add_argument("--workdir", default=None,
                      help="measure a trained run on real test sentences instead")
  parser.add_argument("--sentences", type=int, default=200)
  return parser


def main() -> None:
  args = decode_parser(__doc__).parse_args()
  if args.workdir:
    result = run_trained(args.workdir, sentences=args.sentences)
  else:
    result = run(args.quick, batch=args.batch, src_len=args.src_len, tgt_len=args.tgt_len)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()

"""Decoding speed of mt_flax against CTranslate2 on the same exported weights.

    python -m bench.decode_vs_ct2 [--quick] [--batch 32] [--src-len 24] [--tgt-len 30]
        [--threads 2] [--repeats 5]
    python -m bench.decode_vs_ct2 --workdir DIR [--split test] [--sentences 200]   # real text

Variants, timed interleaved (one repeat of each in turn, so a change of machine
load touches them all): mt_flax's cached greedy and beam-4 search (jitted; the
first call, compilation included, is reported apart), and CTranslate2's
greedy and beam-4 search with fp32 and int8 weights (``intra_threads`` =
``--threads``, one translator thread). Both read the same source batch (the
same length-sorted batches of at most ``--batch`` sentences) with the same
limits; reported figures are medians of the repeats: ``sentences_per_s``,
``tokens_per_s`` (target tokens, end token included) and, per search,
``ct2_*_over_mt_flax`` (CTranslate2 sentences/s over mt_flax's).

Without ``--workdir`` the model is ``bench.decode_speed``'s default shape with
random weights whose end token is never chosen, so every search runs exactly
``--tgt-len`` steps (mt_flax forces the end token at its limit, CTranslate2
stops one step earlier without it: the same tokens, one decoder step less).
JAX uses the cores it is given (run under ``taskset -c 0-1`` for 2); the
figures depend on the machine's load, which ``environment`` records.
"""
from __future__ import annotations

import json
import tempfile
from typing import Any, Callable

import numpy as np

from bench import environment, median, seconds
from bench.decode_speed import decode_parser
from mt_flax import decode, export
from mt_flax.special_ids import EOS_ID

SEARCHES = (("greedy", 1), ("beam4", 4))


def _ct2_model(folder: str, cfg, params, vocab: list[str], quantization: str) -> str:
  spec = export.transformer_spec(cfg, params, vocab, vocab)
  return export.spec_converter(spec).convert(folder, quantization=quantization, force=True)


def _interleaved(variants: dict[str, Callable[[], int]], repeats: int) -> dict[str, dict]:
  """Runs each variant once untimed, then ``repeats`` timed rounds in turn; medians."""
  first, times, tokens = {}, {k: [] for k in variants}, {}
  for name, fn in variants.items():
    first[name] = seconds(lambda: tokens.__setitem__(name, fn()))
  for _ in range(repeats):
    for name, fn in variants.items():
      times[name].append(seconds(fn))
  return {name: {"seconds": median(times[name]), "first_call_s": first[name],
                 "target_tokens": tokens[name], "repeats": repeats} for name in variants}


def compare(model, params, sources: list[list[int]], vocab: list[str], *, settings: dict,
            threads: int, repeats: int, batch: int) -> dict[str, Any]:
  """Times every variant on ``sources`` (token ids with the end token)."""
  import ctranslate2

  pieces = [[vocab[i] for i in ids[:-1]] for ids in sources]     # CTranslate2 adds </s>
  limits = dict(max_len_a=settings["max_len_a"], max_len_b=settings["max_len_b"])
  variants: dict[str, Callable[[], int]] = {}
  outputs: dict[str, list] = {}
  for name, beam in SEARCHES:
    def ours(beam=beam, name=name):
      out = decode.decode_ids(model, params, sources, beam_size=beam, alpha=0.0,
                              beam_rule="fairseq", max_sentences=batch, **limits)
      outputs[f"mt_flax_{name}"] = out
      return sum(len(o) + 1 for o in out)
    variants[f"mt_flax_{name}"] = ours
  with tempfile.TemporaryDirectory() as scratch:
    for quant in ("float32", "int8"):
      folder = _ct2_model(f"{scratch}/{quant}", model.config, params, vocab, quant)
      translator = ctranslate2.Translator(folder, device="cpu", compute_type=quant,
                                          inter_threads=1, intra_threads=threads)
      for name, beam in SEARCHES:
        def theirs(beam=beam, name=name, translator=translator, quant=quant):
          out = export.ctranslate2_search(
              translator, pieces, beam_size=beam,
              length_penalty=export.NO_PENALTY if beam > 1 else 0.0, max_batch=batch, **limits)
          outputs[f"ct2_{quant}_{name}"] = out
          return sum(len(o) + 1 for o in out)
        variants[f"ct2_{quant}_{name}"] = theirs
    result = _interleaved(variants, repeats)
  n = len(sources)
  for entry in result.values():
    entry["sentences_per_s"] = n / entry["seconds"]
    entry["tokens_per_s"] = entry["target_tokens"] / entry["seconds"]
  for name, _ in SEARCHES:
    ours = [[vocab[i] for i in o] for o in outputs[f"mt_flax_{name}"]]
    for quant in ("float32", "int8"):
      key = f"ct2_{quant}_{name}"
      result[f"{key}_over_mt_flax"] = (result[key]["sentences_per_s"]
                                       / result[f"mt_flax_{name}"]["sentences_per_s"])
      result[f"{key}_identical_outputs"] = float(np.mean([a == b for a, b in
                                                           zip(ours, outputs[key])]))
  return result


def run(quick: bool, *, batch: int = 32, src_len: int = 24, tgt_len: int = 30, threads: int = 2,
        repeats: int = 5) -> dict:
  """Random weights of the default shape, every search exactly ``tgt_len`` steps."""
  from bench.decode_speed import MODEL, VOCAB, never_eos_model

  if quick:
    batch, repeats = min(batch, 16), 2
  model, params = never_eos_model()
  rng = np.random.default_rng(0)
  sources = [list(rng.integers(4, VOCAB, src_len - 1)) + [EOS_ID] for _ in range(batch)]
  sources = [[int(t) for t in s] for s in sources]
  vocab = ["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(4, VOCAB)]
  settings = {"max_len_a": 0.0, "max_len_b": float(tgt_len)}
  result = {"benchmark": "decode_vs_ct2", "quick": quick, "batch": batch, "src_len": src_len,
            "tgt_len": tgt_len, "threads": threads, "model": {**MODEL, "vocab": VOCAB},
            "environment": environment()}
  result.update(compare(model, params, sources, vocab, settings=settings, threads=threads,
                        repeats=repeats, batch=batch))
  return result


def run_trained(workdir: str, *, split: str = "test", sentences: int = 200, threads: int = 2,
                repeats: int = 3, batch: int = 32) -> dict:
  """The trained run of ``workdir`` on the first ``sentences`` sources of ``split``."""
  import sentencepiece as spm
  from mt_flax import data
  from mt_flax.inference import decode_settings, load_trained

  trained = load_trained(workdir)
  with trained.config.data.ignore_type():
    trained.config.data.eval_max_examples = 0                  # every example of the split
  examples = data.eval_examples(trained.config, trained.tokenizer, split)[:sentences]
  models = export.spm_models(trained.tokenizer.directory)
  sp = spm.SentencePieceProcessor(model_proto=models[export.MODEL_SOURCE])
  if models[export.MODEL_SOURCE] != models[export.MODEL_TARGET]:
    raise SystemExit("bench.decode_vs_ct2 --workdir needs a run with one shared vocabulary")
  result = {"benchmark": "decode_vs_ct2_trained", "workdir": workdir, "step": trained.step,
            "split": split, "sentences": len(examples), "threads": threads,
            "environment": environment()}
  result.update(compare(trained.model, trained.params, [ex["src_ids"] for ex in examples],
                        export.pieces(sp), settings=decode_settings(trained.config),
                        threads=threads, repeats=repeats, batch=batch))
  return result


def main() -> None:
  parser = decode_parser(__doc__)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--split", default="test", help="with --workdir: the split's sources")
  args = parser.parse_args()
  if args.workdir:
    result = run_trained(args.workdir, split=args.split, sentences=args.sentences, threads=args.threads,
                         repeats=args.repeats, batch=args.batch)
  else:
    result = run(args.quick, batch=args.batch, src_len=args.src_len, tgt_len=args.tgt_len,
                 threads=args.threads, repeats=args.repeats)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()

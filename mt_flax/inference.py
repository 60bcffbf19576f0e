"""Inference with a trained run: load a workdir, decode settings, read and translate text.

Shared by ``train`` (validation BLEU), ``eval``, ``translate`` and ``audit``.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Optional, Sequence

import jax
import ml_collections
from flax import linen as nn
from sacrebleu.metrics import BLEU, CHRF

from mt_flax import checkpoint, decode, paths, sharding
from mt_flax.config import ConfigError, apply_overrides, load_config
from mt_flax.special_ids import EOS_ID
from mt_flax.model import Transformer, TransformerConfig, init_params


@dataclasses.dataclass(frozen=True)
class Trained:
  """A trained run loaded for inference."""
  workdir: str
  config: ml_collections.ConfigDict
  model: Transformer
  params: Any
  tokenizer: Any
  step: int
  which: str = "best"          # "best", "latest" or "averaged"
  params_source: str = ""      # which checkpoint(s) the params come from, in words
  partitioner: Any = None      # the mesh decoding runs over (sharding.inference_partitioner)


def decode_settings(config: ml_collections.ConfigDict, beam_size: Optional[int] = None) -> dict:
  """``beam_size``, ``alpha``, ``max_len_a``, ``max_len_b``, ``beam_rule`` and ``min_width`` of
  ``config.decode``."""
  d = config.decode
  out = {"beam_size": int(d.beam_size if beam_size is None else beam_size),
         "alpha": float(d.alpha), "max_len_a": float(d.max_len_a), "max_len_b": float(d.max_len_b),
         "beam_rule": str(d.beam_rule), "min_width": int(d.min_width)}
  if out["beam_size"] < 1:
    raise ConfigError(f"beam size {out['beam_size']}: expected an integer >= 1")
  if out["min_width"] < 1:
    raise ConfigError(f"decode.min_width={out['min_width']}: expected an integer >= 1")
  if out["beam_rule"] not in decode.BEAM_RULES:
    raise ConfigError(f"decode.beam_rule={out['beam_rule']!r}: expected one of "
                      f"{', '.join(decode.BEAM_RULES)}")
  for key in ("alpha", "max_len_a", "max_len_b"):
    if out[key] < 0:
      raise ConfigError(f"decode.{key}={out[key]:g}: expected a number >= 0")
  if out["max_len_a"] == 0 and out["max_len_b"] < 1:
    raise ConfigError("decode.max_len_a=0 and decode.max_len_b<1 allow no output token; "
                      "expected a longest output of at least 1")
  return out


def _model_differences(a: dict, b: dict) -> list[str]:
  return [f"model.{k}: {b.get(k, '<unset>')!r} in the workdir, {a.get(k, '<unset>')!r} in the file"
          for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def load_trained(workdir: str, *, which: str = "best", config_path: Optional[str] = None,
                 overrides: Sequence[str] = ()) -> Trained:
  """Restores a run's params, config and tokenizer (never trains a tokenizer).

  ``which``: "best", "latest" (see :func:`checkpoint.restore_for_inference`)
  or "averaged" (written by ``python -m mt_flax average``).

  On several processes (a pod) every process joins the others first
  (:func:`sharding.maybe_initialize_distributed`) and must make the same calls: the
  params are restored once, replicated on every device of the inference mesh, and
  decoding runs over all of them (:func:`decode.decode_ids`).

  The config is the run's ``workdir/config.json``. ``config_path`` may name the
  experiment file the run was trained with: its ``decode`` section is then
  used, and its ``model`` section must match the run's. ``overrides``
  (``--config.key=value``) apply last.

  Raises:
    checkpoint.CheckpointError, ConfigError, mt_flax.data.DataError: one-line reasons.
  """
  from mt_flax.data import tokenizer as tok_lib

  sharding.maybe_initialize_distributed()      # before anything touches the devices
  if not paths.as_path(workdir).is_dir():
    raise checkpoint.CheckpointError(f"workdir {workdir!r} does not exist; expected the workdir "
                                     "of a `python -m mt_flax train` run")
  config = checkpoint.read_config(workdir)
  if config_path:
    wanted = load_config(config_path)
    diffs = _model_differences(wanted.model.to_dict(), config.model.to_dict())
    if diffs:
      raise ConfigError(f"{config_path} does not describe the model trained in {workdir} "
                        f"({'; '.join(diffs[:3])})")
    config.decode.update(wanted.decode.to_dict())
  apply_overrides(config, overrides)
  decode_settings(config)                                 # fails early on a bad beam size
  paths.use_compilation_cache(config)       # a repeated eval or translate skips compiling
  partitioner = sharding.inference_partitioner()
  placed = partitioner.replicated
  if which == "averaged":
    params, info = checkpoint.restore_averaged(workdir, placed)
    step = int(info["steps"][-1])
    source = (f"average of the last {len(info['steps'])} checkpoints (steps "
              f"{', '.join(map(str, info['steps']))})")
  else:
    _, params, step = checkpoint.restore_for_inference(workdir, which, placed)
    source = f"{which} checkpoint (step {step})"
  tokenizer = tok_lib.Tokenizer.load(os.fspath(paths.as_path(workdir) / paths.TOKENIZER_DIR))
  try:
    model_cfg = TransformerConfig.from_config(config.model, tokenizer.src_vocab_size,
                                              tokenizer.tgt_vocab_size)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  model = Transformer(model_cfg)
  params = nn.meta.unbox(params)
  expected = jax.eval_shape(lambda: nn.meta.unbox(init_params(model, jax.random.PRNGKey(0))))
  got = jax.tree_util.tree_map(lambda x: tuple(x.shape), params)
  want = jax.tree_util.tree_map(lambda x: tuple(x.shape), expected)
  if got != want:
    raise checkpoint.CheckpointError(
        f"the checkpoint of step {step} in {workdir} does not fit the model of its config.json "
        f"and tokenizer/ (vocabulary {tokenizer.src_vocab_size}/{tokenizer.tgt_vocab_size}); "
        "was the tokenizer or config changed after training?")
  return Trained(workdir, config, model, params, tokenizer, step, which, source, partitioner)


_SENTENCE_END = re.compile(r"(?<=[.!?;:\u3002])\s+")
_LINE_END = re.compile(rb"\r\n|\r|\n")


def read_lines(raw: bytes, *, replace: bool = False
               ) -> tuple[list[str], list[tuple[int, str]]]:
  """Splits UTF-8 bytes into lines (ended by ``\\n``, ``\\r\\n`` or a lone ``\\r``; a final
  line end ends the last line).

  Returns (lines, problems): problems are (1-based line number, reason) of the
  lines that are not valid UTF-8; with ``replace`` they are decoded with U+FFFD,
  without it no line is returned when there is a problem.
  """
  parts = _LINE_END.split(raw)
  if parts and parts[-1] == b"":
    parts.pop()
  lines, problems = [], []
  for number, part in enumerate(parts, 1):
    try:
      lines.append(part.decode("utf-8"))
    except UnicodeDecodeError as e:
      problems.append((number, f"invalid UTF-8 byte 0x{part[e.start]:02x} at byte {e.start + 1}"))
      lines.append(part.decode("utf-8", errors="replace"))
  if problems and not replace:
    lines = []
  return lines, problems


def split_to_fit(text: str, fits: Callable[[str], bool]) -> list[str]:
  """Cuts ``text`` into pieces that ``fits``: at sentence ends first, then between words.

  A single word that does not fit on its own is kept as one piece (and later
  truncated by the caller).
  """
  pieces: list[str] = []
  for unit in (u for s in _SENTENCE_END.split(text.strip()) for u in _words_if_needed(s, fits)):
    if pieces and fits(pieces[-1] + " " + unit):
      pieces[-1] += " " + unit
    else:
      pieces.append(unit)
  return pieces


def _words_if_needed(sentence: str, fits: Callable[[str], bool]) -> list[str]:
  return [sentence] if fits(sentence) else sentence.split()


def prepare_sources(lines: Sequence[str], tokenizer, max_len: int, *, split_long: bool,
                    warn: Callable[[str], None], first_line: int = 1) -> list[list[list[int]]]:
  """Encoder inputs (tokens + EOS) of each line: one per line, several when split.

  Blank lines give no input. Over-long inputs are truncated to ``max_len``
  (EOS included) with a warning naming the line (``first_line`` is the number of the first).
  """
  eos = EOS_ID
  fits = lambda text: len(tokenizer.encode_src(text)) + 1 <= max_len
  out = []
  for number, line in enumerate(lines, first_line):
    text = line.strip()
    if not text:
      out.append([])
      continue
    ids = tokenizer.encode_src(text)
    if len(ids) + 1 <= max_len:
      out.append([ids + [eos]])
      continue
    if split_long:
      pieces = [tokenizer.encode_src(p) for p in split_to_fit(text, fits)]
      warn(f"line {number}: {len(ids) + 1} tokens, more than data.max_len={max_len}; "
           f"translated in {len(pieces)} pieces")
    else:
      pieces = [ids]
      warn(f"line {number}: {len(ids) + 1} tokens, more than data.max_len={max_len}; "
           f"truncated to its first {max_len - 1} tokens (--long split translates all of it)")
    cut = [p[:max_len - 1] for p in pieces]
    if any(len(p) > max_len - 1 for p in pieces) and split_long:
      warn(f"line {number}: a word longer than data.max_len={max_len} tokens was truncated")
    out.append([p + [eos] for p in cut])
  return out


def translate_lines(trained: Trained, lines: Sequence[str], *, beam_size: Optional[int] = None,
                    split_long: bool = False, cached: bool = True,
                    warn: Callable[[str], None] = lambda m: None, first_line: int = 1
                    ) -> list[str]:
  """Translations of ``lines`` (numbered from ``first_line`` in warnings), one per line, in
  order."""
  settings = decode_settings(trained.config, beam_size)
  max_len = int(trained.config.data.max_len)
  per_line = prepare_sources(lines, trained.tokenizer, max_len, split_long=split_long, warn=warn,
                             first_line=first_line)
  flat = [src for sources in per_line for src in sources]
  outputs = iter(decode.decode_ids(trained.model, trained.params, flat, cached=cached,
                                   partitioner=trained.partitioner, **settings))
  result = []
  for sources in per_line:
    texts = [trained.tokenizer.decode_tgt(next(outputs)) for _ in sources]
    result.append(" ".join(" ".join(t.split()) for t in texts if t.strip()))
  return result


def one_line(text: str) -> str:
  """Text with every run of whitespace (newlines included) made one space."""
  return " ".join(text.split())


def translate_examples(config: ml_collections.ConfigDict, model, params, tokenizer,
                       examples: Sequence[dict], *, beam_size: int = 1,
                       cached: bool = True, partitioner=None) -> list[str]:
  """Detokenized one-line hypotheses of ``examples`` (their ``src_ids``), in order, decoded
  over ``partitioner``'s mesh if given (see :func:`decode.decode_ids`)."""
  settings = decode_settings(config, beam_size)
  outputs = decode.decode_ids(model, params, [ex["src_ids"] for ex in examples], cached=cached,
                              partitioner=partitioner, **settings)
  return [one_line(tokenizer.decode_tgt(ids)) for ids in outputs]


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
  """sacrebleu corpus BLEU and chrF with signatures; ``{"bleu", "chrf", ...}``."""
  return stream_scores(hypotheses, [references])


def stream_scores(hypotheses: Sequence[str],
                  streams: Sequence[Sequence[str]]) -> dict[str, Any]:
  """As :func:`corpus_scores` against several reference streams (``streams[j][i]``:
  reference j of hypothesis i), sacrebleu's multi-reference BLEU and chrF."""
  if not hypotheses:
    return {"bleu": 0.0, "chrf": 0.0, "examples": 0}
  bleu, chrf = BLEU(), CHRF()
  b = bleu.corpus_score(list(hypotheses), [list(refs) for refs in streams])
  c = chrf.corpus_score(list(hypotheses), [list(refs) for refs in streams])
  return {"bleu": float(b.score), "chrf": float(c.score), "examples": len(hypotheses),
          "bleu_detail": str(b), "bleu_signature": str(bleu.get_signature()),
          "chrf_signature": str(chrf.get_signature())}


def validation_bleu(config: ml_collections.ConfigDict, model, params, tokenizer,
                    examples: Sequence[dict], *, partitioner=None) -> dict:
  """Decodes ``examples`` (from ``data.eval_examples``) greedily and scores them.

  Batched by length and jitted (one compile per batch shape, reused across calls),
  over ``partitioner``'s mesh if given. ``params`` may be boxed. Returns
  ``{"bleu": float, "chrf": float}``.
  """
  hyps = translate_examples(config, model, params, tokenizer, examples, partitioner=partitioner)
  scores = corpus_scores(hyps, [one_line(ex["ref_text"]) for ex in examples])
  return {"bleu": scores["bleu"], "chrf": scores["chrf"]}

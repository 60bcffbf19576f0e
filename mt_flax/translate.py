r"""Translation of text files with a trained run.

    python -m mt_flax translate --workdir DIR [--beam 4] [--checkpoint best|latest]
        [--long truncate|split] [--invalid error|replace] [--config.decode.alpha=0.8] \
        < in.txt > out.txt

One line in, one line out, in order; an empty (or all-blank) line gives an
empty line. A line longer than ``data.max_len`` tokens (EOS included) is
truncated with a warning naming the line, or with ``--long split`` translated
in pieces (cut at sentence ends, else between words) that are joined with a
space. Input must be UTF-8: invalid lines are reported with their numbers and
nothing is translated, unless ``--invalid replace`` (U+FFFD, with a warning).
Lines are batched by length internally. ``--beam`` defaults to
``decode.beam_size`` of the run's config; 1 is greedy search.

:func:`load_trained` (config, model, params, tokenizer of a workdir) is shared
by ``eval`` and ``audit``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from typing import Any, Callable, Optional, Sequence

import jax
import ml_collections
from flax import linen as nn

from mt_flax import checkpoint, decode
from mt_flax.config import ConfigError, apply_overrides, load_config, split_config_args
from mt_flax.model import Transformer, TransformerConfig, init_params

MAX_ERRORS_SHOWN = 10


@dataclasses.dataclass(frozen=True)
class Trained:
  """A trained run loaded for inference."""
  workdir: str
  config: ml_collections.ConfigDict
  model: Transformer
  params: Any
  tokenizer: Any
  step: int


def decode_settings(config: ml_collections.ConfigDict, beam_size: Optional[int] = None) -> dict:
  """``beam_size``, ``alpha``, ``max_len_a``, ``max_len_b`` of ``config.decode``."""
  d = config.decode
  out = {"beam_size": int(d.beam_size if beam_size is None else beam_size),
         "alpha": float(d.alpha), "max_len_a": float(d.max_len_a), "max_len_b": float(d.max_len_b)}
  if out["beam_size"] < 1:
    raise ConfigError(f"beam size {out['beam_size']}: expected an integer >= 1")
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

  The config is the run's ``workdir/config.json``. ``config_path`` may name the
  experiment file the run was trained with: its ``decode`` section is then
  used, and its ``model`` section must match the run's. ``overrides``
  (``--config.key=value``) apply last.

  Raises:
    checkpoint.CheckpointError, ConfigError, mt_flax.data.DataError: one-line reasons.
  """
  from mt_flax.data import tokenizer as tok_lib

  if not os.path.isdir(workdir):
    raise checkpoint.CheckpointError(f"workdir {workdir!r} does not exist; expected the workdir "
                                     "of a `python -m mt_flax train` run")
  config = checkpoint.read_config(workdir)
  if config_path:
    wanted = load_config(config_path)
    diffs = _model_differences(dict(wanted.get("model", {})), dict(config.model))
    if diffs:
      raise ConfigError(f"{config_path} does not describe the model trained in {workdir} "
                        f"({'; '.join(diffs[:3])})")
    if "decode" in wanted:
      with config.ignore_type():
        config.decode = ml_collections.ConfigDict(wanted.decode.to_dict())
  apply_overrides(config, overrides)
  decode_settings(config)                                 # fails early on a bad beam size
  _, params, step = checkpoint.restore_for_inference(workdir, which)
  tokenizer = tok_lib.Tokenizer.load(f"{workdir}/{tok_lib.TOKENIZER_DIR}")
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
  return Trained(workdir, config, model, params, tokenizer, step)


# ----------------------------------------------------------------------------- text handling


def read_lines(raw: bytes, *, replace: bool = False
               ) -> tuple[list[str], list[tuple[int, str]]]:
  """Splits UTF-8 bytes into lines (``\\n`` or ``\\r\\n``; a final newline ends the last line).

  Returns (lines, problems): problems are (1-based line number, reason) of the
  lines that are not valid UTF-8; with ``replace`` they are decoded with U+FFFD.
  """
  parts = raw.split(b"\n")
  if parts and parts[-1] == b"":
    parts.pop()
  lines, problems = [], []
  for number, part in enumerate(parts, 1):
    part = part[:-1] if part.endswith(b"\r") else part
    try:
      lines.append(part.decode("utf-8"))
    except UnicodeDecodeError as e:
      problems.append((number, f"invalid UTF-8 byte 0x{part[e.start]:02x} at byte {e.start + 1}"))
      lines.append(part.decode("utf-8", errors="replace"))
  if problems and not replace:
    lines = []
  return lines, problems


_SENTENCE_END = re.compile(r"(?<=[.!?;:\u3002])\s+")


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
                    warn: Callable[[str], None]) -> list[list[list[int]]]:
  """Encoder inputs (tokens + EOS) of each line: one per line, several when split.

  Blank lines give no input. Over-long inputs are truncated to ``max_len``
  (EOS included) with a warning naming the line.
  """
  eos = decode.EOS_ID
  fits = lambda text: len(tokenizer.encode_src(text)) + 1 <= max_len
  out = []
  for number, line in enumerate(lines, 1):
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
                    warn: Callable[[str], None] = lambda m: None) -> list[str]:
  """Translations of ``lines``, one per line, in order."""
  settings = decode_settings(trained.config, beam_size)
  max_len = int(trained.config.data.max_len)
  per_line = prepare_sources(lines, trained.tokenizer, max_len, split_long=split_long, warn=warn)
  flat = [src for sources in per_line for src in sources]
  outputs = iter(decode.decode_ids(trained.model, trained.params, flat, cached=cached,
                                   **settings))
  result = []
  for sources in per_line:
    texts = [trained.tokenizer.decode_tgt(next(outputs)) for _ in sources]
    result.append(" ".join(" ".join(t.split()) for t in texts if t.strip()))
  return result


# ----------------------------------------------------------------------------- CLI


def inference_arguments(prog: str, doc: str) -> argparse.ArgumentParser:
  """Flags shared by translate, eval and audit."""
  parser = argparse.ArgumentParser(prog=f"python -m mt_flax {prog}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="the workdir of a training run")
  parser.add_argument("--checkpoint", choices=("best", "latest"), default="best")
  return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]
          ) -> tuple[argparse.Namespace, Optional[str], list[str]]:
  """(flags, --config FILE, --config.key=value overrides); argparse errors exit with 2."""
  path, overrides, rest = split_config_args(list(argv))
  return parser.parse_args(rest), path, overrides


def main(argv: Sequence[str]) -> int:
  parser = inference_arguments("translate", __doc__.split("\n\n")[1])
  parser.add_argument("--beam", type=int, default=None, help="beam size (1 = greedy)")
  parser.add_argument("--long", choices=("truncate", "split"), default="truncate",
                      help="what to do with lines longer than data.max_len tokens")
  parser.add_argument("--invalid", choices=("error", "replace"), default="error",
                      help="what to do with input lines that are not UTF-8")
  parser.add_argument("--full-recompute", action="store_true",
                      help="decode without the key/value cache (slow; for comparison)")
  warn = lambda message: print(f"mt_flax translate: warning: {message}", file=sys.stderr)
  try:
    args, config_path, overrides = parse(parser, argv)
    if args.beam is not None and args.beam < 1:
      raise ConfigError(f"beam size {args.beam}: expected an integer >= 1")
    raw = sys.stdin.buffer.read()
    lines, problems = read_lines(raw, replace=args.invalid == "replace")
    for number, reason in problems[:MAX_ERRORS_SHOWN]:
      level = "warning" if args.invalid == "replace" else "error"
      print(f"mt_flax translate: {level}: line {number}: {reason}", file=sys.stderr)
    if problems and args.invalid == "error":
      more = len(problems) - MAX_ERRORS_SHOWN
      print(f"mt_flax translate: error: {len(problems)} line(s) of the input are not UTF-8"
            + (f" ({more} more not shown)" if more > 0 else "")
            + "; nothing translated (fix the input, or pass --invalid replace)", file=sys.stderr)
      return 2
    trained = load_trained(args.workdir, which=args.checkpoint, config_path=config_path,
                           overrides=overrides)
    outputs = translate_lines(trained, lines, beam_size=args.beam,
                              split_long=args.long == "split", cached=not args.full_recompute,
                              warn=warn)
  except (ConfigError, checkpoint.CheckpointError, ValueError) as e:
    print(f"mt_flax translate: error: {e}", file=sys.stderr)
    return 2
  try:
    sys.stdout.write("".join(line + "\n" for line in outputs))
    sys.stdout.flush()
  except BrokenPipeError:            # the reader went away (e.g. `| head`): not an error here
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
  return 0

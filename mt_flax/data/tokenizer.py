"""SentencePiece tokenizer trained on the training split, kept in `workdir/tokenizer/`.

Ids: 0 pad, 1 unknown, 2 begin (BOS), 3 end (EOS); the rest are pieces. One
vocabulary shared by both languages (`data.shared_vocab=True`, file `spm.model`)
or one per side (`src.model`, `tgt.model`), each of `data.vocab_size` pieces, of
type `data.tokenizer_type` ("unigram" or "bpe"). `tokenizer.json` records what
the models were trained for and the SHA-256 of each model file; a workdir whose
tokenizer does not match the config, or whose model files changed, is an error
rather than a silent mix.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Sequence

import ml_collections
import numpy as np
import sentencepiece as spm

from mt_flax import paths
from mt_flax.data.sources import DataError, load_pairs
from mt_flax.paths import TOKENIZER_DIR, TOKENIZER_INFO, as_path

from mt_flax.special_ids import BOS_ID, EOS_ID, PAD_ID, UNK_ID

SHARED_MODEL, SRC_MODEL, TGT_MODEL = "spm.model", "src.model", "tgt.model"
MODEL_TYPES = ("unigram", "bpe")
MAX_TRAINING_SENTENCES = 2_000_000   # SentencePiece samples this many per model

log = logging.getLogger(__name__)


class Tokenizer:
  """Source and target SentencePiece models (possibly the same one)."""

  def __init__(self, src: spm.SentencePieceProcessor, tgt: spm.SentencePieceProcessor,
               directory: str | None = None):
    self._src, self._tgt = src, tgt
    self.directory = directory

  @classmethod
  def load(cls, directory: str) -> "Tokenizer":
    """Loads the models in `directory` (a `workdir/tokenizer/` folder, local or gs://),
    each checked against the SHA-256 that `tokenizer.json` recorded when it was trained."""
    folder = as_path(directory)
    info = folder / TOKENIZER_INFO
    digests = json.loads(info.read_text()).get("sha256", {}) if info.exists() else {}
    if (folder / SHARED_MODEL).exists():
      model = _read_model(folder / SHARED_MODEL, digests.get(SHARED_MODEL))
      return cls(model, model, str(folder))
    paths = [folder / name for name in (SRC_MODEL, TGT_MODEL)]
    if not all(p.exists() for p in paths):
      raise DataError(f"{folder}: no tokenizer model ({SHARED_MODEL}, or "
                      f"{SRC_MODEL} and {TGT_MODEL})")
    src, tgt = (_read_model(p, digests.get(p.name)) for p in paths)
    return cls(src, tgt, str(folder))

  @property
  def shared(self) -> bool:
    return self._src is self._tgt

  @property
  def src_vocab_size(self) -> int:
    return int(self._src.get_piece_size())

  @property
  def tgt_vocab_size(self) -> int:
    return int(self._tgt.get_piece_size())

  def encode_src(self, text: str) -> list[int]:
    """Source token ids, without BOS/EOS."""
    return self._src.encode(text)

  def encode_tgt(self, text: str) -> list[int]:
    """Target token ids, without BOS/EOS."""
    return self._tgt.encode(text)

  def encode_src_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._src.encode(list(texts))

  def encode_tgt_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._tgt.encode(list(texts))

  def decode_src(self, ids: Iterable[int]) -> str:
    """Text of source ids; stops at the first EOS, skips padding and BOS."""
    return self._src.decode(_content_ids(ids))

  def decode_tgt(self, ids: Iterable[int]) -> str:
    """Text of target ids; stops at the first EOS, skips padding and BOS."""
    return self._tgt.decode(_content_ids(ids))


def _read_model(path, digest: str | None) -> spm.SentencePieceProcessor:
  """The SentencePiece model in `path`, whose bytes must have the SHA-256 `digest` (if given)."""
  raw = path.read_bytes()
  actual = hashlib.sha256(raw).hexdigest()
  if digest and actual != digest:
    raise DataError(f"the tokenizer file changed since the run was created: {path} has SHA-256 "
                    f"{actual}, expected {digest} (recorded in {TOKENIZER_INFO}); restore it "
                    "from a copy of the run, or train a new run")
  try:
    return spm.SentencePieceProcessor(model_proto=raw)
  except RuntimeError as e:
    raise DataError(f"{path} is not a SentencePiece model ({str(e).strip()}); restore it from "
                    "a copy of the run, or train a new run") from None


def _content_ids(ids: Iterable[int]) -> list[int]:
  out = []
  for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1):
    i = int(i)
    if i == EOS_ID:
      break
    if i not in (PAD_ID, BOS_ID):
      out.append(i)
  return out


def train_model(texts: Iterable[str], path: str, *, vocab_size: int, model_type: str) -> None:
  """Trains one SentencePiece model on `texts` and writes it to `path` (`….model`)."""
  with open(path, "wb") as out:
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(texts), model_writer=out, vocab_size=int(vocab_size),
          model_type=model_type, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
          pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
          character_coverage=0.9999, hard_vocab_limit=False,
          input_sentence_size=MAX_TRAINING_SENTENCES, shuffle_input_sentence=True,
          num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:
      need = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
      if need:
        raise DataError(f"data.vocab_size={vocab_size}: expected at least {need.group(1)} for "
                        "this data (its characters and the special ids)") from None
      raise DataError(f"SentencePiece cannot train a tokenizer with data.vocab_size="
                      f"{vocab_size}: {str(e).strip()}") from None


def _expected_info(config: ml_collections.ConfigDict) -> dict:
  d = config.data
  return {"dataset": d.name, "src_lang": d.src_lang, "tgt_lang": d.tgt_lang,
          "vocab_size": int(d.vocab_size), "shared_vocab": bool(d.shared_vocab),
          "tokenizer_type": d.tokenizer_type}


def load_or_train_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> Tokenizer:
  """Loads `workdir/tokenizer/`, or trains it on the training split if it has no model.

  Each file is written atomically and `tokenizer.json` last: a folder without
  it (an interrupted run) is trained again. `workdir` may be local or gs://.

  Raises:
    DataError: the saved tokenizer was trained for another dataset/direction/vocabulary.
  """
  directory = as_path(workdir) / TOKENIZER_DIR
  expected = _expected_info(config)
  info_path = directory / TOKENIZER_INFO
  if info_path.exists():
    saved = json.loads(info_path.read_text())
    changed = [f"{k}: {saved.get(k)!r} there, {v!r} in the config"
               for k, v in expected.items() if saved.get(k) != v]
    if changed:
      raise DataError(f"{directory} was trained for another setting ({'; '.join(changed)}); "
                      "use a new workdir or delete that folder")
    return Tokenizer.load(str(directory))
  if config.data.tokenizer_type not in MODEL_TYPES:
    raise DataError(f"data.tokenizer_type={config.data.tokenizer_type!r}: expected one of "
                    f"{', '.join(MODEL_TYPES)}")
  pairs = load_pairs(config, "train")
  log.info("training a %s SentencePiece tokenizer (%d pieces, %s) on %d training pairs",
           config.data.tokenizer_type, config.data.vocab_size,
           "shared" if config.data.shared_vocab else "per side", len(pairs))
  options = dict(vocab_size=config.data.vocab_size, model_type=config.data.tokenizer_type)
  with tempfile.TemporaryDirectory() as scratch:
    if config.data.shared_vocab:
      texts = [s for s, _ in pairs] + [t for _, t in pairs]
      train_model(texts, os.path.join(scratch, SHARED_MODEL), **options)
    else:
      train_model([s for s, _ in pairs], os.path.join(scratch, SRC_MODEL), **options)
      train_model([t for _, t in pairs], os.path.join(scratch, TGT_MODEL), **options)
    directory.mkdir(parents=True, exist_ok=True)
    digests = {}
    for name in sorted(os.listdir(scratch)):
      with open(os.path.join(scratch, name), "rb") as f:
        raw = f.read()
      paths.write_bytes(directory / name, raw)
      digests[name] = hashlib.sha256(raw).hexdigest()
  paths.write_text(info_path, json.dumps({**expected, "sha256": digests}, indent=2))
  return Tokenizer.load(str(directory))

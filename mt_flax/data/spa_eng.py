"""`spa_eng`: English–Spanish sentence pairs from Tatoeba (manythings.org/anki), 2018-05-13.

The archive `spa-eng.zip` holds `spa-eng/spa.txt`: one `English<TAB>Spanish` pair a
line. It is downloaded from its canonical URL, or read from the manual folder
(`data.manual_dir` / `$MT_FLAX_MANUAL_DIR`, else `<tfds_data_dir>/downloads/manual`).

Parsing keeps every well-formed line; a malformed one (no tab, an empty side,
invalid UTF-8) is counted and listed with its line number in the dataset's
metadata (`builder.info.metadata["malformed"]`) and in a logged warning.

Splits are leak-free in both directions. Sentences are compared by
:func:`sentence_key` (Unicode case folding, runs of whitespace made one space,
no other change). Pairs are grouped into connected components: a pair joins the
component of its English sentence and that of its Spanish sentence, so every
pair sharing an English *or* a Spanish sentence with another lands in the same
split. A component's split is chosen by a hash of its smallest English key, so
the assignment is deterministic and does not depend on the order of the lines.
No English or Spanish sentence of the validation or test split occurs in train.
"""
from __future__ import annotations

import codecs
import dataclasses
import hashlib
import io
import logging
import os
import zipfile
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mt_flax.data import overlap
from mt_flax.data.downloads import OurBuilder, locate
from mt_flax.data.overlap import sentence_key
from mt_flax.errors import DataError

URL = "http://storage.googleapis.com/download.tensorflow.org/data/spa-eng.zip"
ARCHIVE = "spa-eng.zip"
MEMBER = "spa-eng/spa.txt"
VALIDATION_FRACTION = 0.05   # of components
TEST_FRACTION = 0.05
MAX_LISTED = 20              # malformed lines named in the log message

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Malformed:
  """A line that is not an `English<TAB>Spanish` pair."""
  line: int      # 1-based line number in spa.txt
  reason: str


@dataclasses.dataclass(frozen=True)
class Pair:
  line: int      # 1-based line number in spa.txt
  en: str
  es: str


def parse(data: bytes) -> tuple[list[Pair], list[Malformed]]:
  """Splits the bytes of spa.txt into well-formed pairs and malformed lines.

  A line may end in "\\r\\n"; columns after the second (the attribution column of
  newer anki files) are ignored; both sides are stripped of surrounding spaces.
  """
  lines = data.split(b"\n")
  if lines and lines[-1] == b"":
    lines.pop()
  pairs, malformed = [], []
  for number, raw in enumerate(lines, start=1):
    raw = raw.rstrip(b"\r")
    if number == 1 and raw.startswith(codecs.BOM_UTF8):
      raw = raw[len(codecs.BOM_UTF8):]
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      malformed.append(Malformed(number, f"invalid UTF-8 at byte {e.start}"))
      continue
    if "\t" not in text:
      malformed.append(Malformed(number, "empty line" if not text.strip() else "no tab"))
      continue
    en, es = (field.strip() for field in text.split("\t")[:2])
    if not en or not es:
      side = "English" if not en else "Spanish"
      malformed.append(Malformed(number, f"empty {side} side"))
      continue
    pairs.append(Pair(number, en, es))
  return pairs, malformed


def split_of(en: str) -> str:
  """"train", "validation" or "test" of a component whose smallest English key is ``en``'s."""
  digest = hashlib.blake2b(sentence_key(en).encode("utf-8"), digest_size=8).digest()
  u = int.from_bytes(digest, "big") / 2.0**64
  if u < VALIDATION_FRACTION:
    return "validation"
  if u < VALIDATION_FRACTION + TEST_FRACTION:
    return "test"
  return "train"


def components(pairs: Sequence[Pair]) -> list[str]:
  """The component of every pair (:func:`mt_flax.data.overlap.components`)."""
  return overlap.components([(pair.en, pair.es) for pair in pairs])


def assign_splits(pairs: Sequence[Pair]) -> list[str]:
  """"train", "validation" or "test" of every pair, one component to one split."""
  return [split_of(component) for component in components(pairs)]


def read_spa_txt(path: epath.PathLike) -> bytes:
  """The bytes of spa.txt from `spa-eng.zip`, or from a plain `spa.txt` (local or gs://)."""
  data = epath.Path(path).read_bytes()
  if not zipfile.is_zipfile(io.BytesIO(data)):
    return data
  with zipfile.ZipFile(io.BytesIO(data)) as archive:
    names = [n for n in archive.namelist() if n == MEMBER or n.endswith("/spa.txt")
             or n == "spa.txt"]
    if not names:
      raise DataError(f"{path}: no {MEMBER} in the archive")
    return archive.read(names[0])


class SpaEng(OurBuilder, tfds.core.GeneratorBasedBuilder):
  """English–Spanish Tatoeba pairs, split by components over both sides."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.0.0": "spa-eng.zip of 2018-05-13; 90/5/5 split by English sentence.",
      "2.0.0": "90/5/5 split by connected components over English and Spanish sentences: "
               "no held-out sentence of either language occurs in train.",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Download {URL} and put {ARCHIVE} into the manual folder "
      "(data.manual_dir or $MT_FLAX_MANUAL_DIR).")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="English-Spanish sentence pairs from Tatoeba via manythings.org/anki.",
        features=tfds.features.FeaturesDict({
            "en": tfds.features.Text(),
            "es": tfds.features.Text(),
            "line": np.int32,     # line number in spa.txt
        }),
        supervised_keys=("en", "es"),
        homepage="https://www.manythings.org/anki/",
        citation="CC-BY 2.0 (France); www.manythings.org/anki and tatoeba.org",
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    path = locate(dl_manager, ARCHIVE, URL, "spa_eng")
    pairs, malformed = parse(read_spa_txt(path))
    if malformed:
      listed = "; ".join(f"line {m.line}: {m.reason}" for m in malformed[:MAX_LISTED])
      more = f" (and {len(malformed) - MAX_LISTED} more)" if len(malformed) > MAX_LISTED else ""
      log.warning("spa_eng: %d malformed line(s) in %s skipped: %s%s",
                  len(malformed), path, listed, more)
    by_split: dict[str, list[Pair]] = {"train": [], "validation": [], "test": []}
    for pair, split in zip(pairs, assign_splits(pairs)):
      by_split[split].append(pair)
    self.info.metadata.update({
        "source": os.fspath(path),
        "num_lines": len(pairs) + len(malformed),
        "num_pairs": len(pairs),
        "num_malformed": len(malformed),
        "malformed": [dataclasses.asdict(m) for m in malformed],
    })
    return self._nonempty_splits(by_split)

  def _generate_examples(self, pairs: list[Pair]):
    for pair in pairs:
      yield pair.line, {"en": pair.en, "es": pair.es, "line": pair.line}

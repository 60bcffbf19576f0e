"""`bible_en_es`: World English Bible ↔ Reina-Valera 1909, aligned verse by verse.

Read with pysword from the SWORD modules `engWEB2015eb` and `spaRV1909eb`:
installed ones are looked for in `$SWORD_PATH` (folders separated by ":"; when
set, only there), else `/usr/share/sword`, `/usr/local/share/sword`, `~/.sword`
(Debian packages `sword-text-web`, `sword-text-sparv`). A module not installed
is taken from `<module>.zip` in the manual folder (`data.manual_dir` /
`$MT_FLAX_MANUAL_DIR`), else downloaded from the CrossWire module repository
(falling back to eBible.org's SWORD repository, where these modules are made).

Verses are aligned by (book, chapter, verse); OSIS markup is turned into plain
text by `mt_flax.data.osis.to_text`; a verse empty on either side or present in
one module only is skipped and counted (`builder.info.metadata`). The split is
deterministic and leak-free: verses that share an English or a Spanish text are
kept together, and the groups whose references ("John.3.16") hash lowest form the
validation (1,000 verses) and next the test (1,000) split.
"""
from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import tempfile
import zipfile
from collections.abc import Iterator

import tensorflow_datasets as tfds
from etils import epath
from pysword.modules import SwordModules

from mt_flax.data import osis, overlap
from mt_flax.data.downloads import OurBuilder, locate
from mt_flax.errors import DataError

MODULES = {"en": "engWEB2015eb", "es": "spaRV1909eb"}
URLS = (
    "https://www.crosswire.org/ftpmirror/pub/sword/packages/rawzip/{module}.zip",
    "https://ebible.org/sword/zip/{module}.zip",
)
DEFAULT_SWORD_PATHS = ("/usr/share/sword", "/usr/local/share/sword", "~/.sword")
NUM_VALIDATION = 1000
NUM_TEST = 1000
MAX_HELD_OUT_GROUP = 4       # verses sharing a text; larger groups are formulas, kept in train

Ref = tuple[str, int, int]   # (OSIS book, chapter, verse)

log = logging.getLogger(__name__)


def sword_paths() -> list[str]:
  """Folders searched for installed modules: `$SWORD_PATH` if set, else the usual ones."""
  env = os.environ.get("SWORD_PATH", "")
  folders = env.split(os.pathsep) if env else list(DEFAULT_SWORD_PATHS)
  return [os.path.expanduser(f) for f in folders if f]


def find_installed(module: str, folders: list[str]) -> str | None:
  """The first SWORD folder (holding `mods.d/`) that has `module`, or None."""
  for folder in folders:
    if not os.path.isdir(os.path.join(folder, "mods.d")):
      continue
    if module in SwordModules(folder).parse_modules():
      return folder
  return None


def read_module(folder: str, module: str) -> dict[Ref, str]:
  """Raw OSIS text of every verse of `module` found in the SWORD folder `folder`."""
  modules = SwordModules(folder)
  if module not in modules.parse_modules():
    raise DataError(f"{folder}: has no SWORD module {module} (mods.d lacks its .conf)")
  bible = modules.get_bible_from_module(module)
  if hasattr(bible, "_decompressed_text"):
    # pysword inflates a whole compressed block for every verse; keep the last ones.
    bible._decompressed_text = functools.lru_cache(maxsize=4)(bible._decompressed_text)
  verses: dict[Ref, str] = {}
  for books in bible.get_structure().get_books().values():
    for book in books:
      refs = [(book.osis_name, chapter, verse)
              for chapter, count in enumerate(book.chapter_lengths, start=1)
              for verse in range(1, count + 1)]
      texts = list(bible.get_iter(books=book.osis_name, clean=False))
      if len(texts) != len(refs):
        raise DataError(f"{module}: {book.osis_name} yields {len(texts)} verses, its "
                        f"versification has {len(refs)}")
      verses.update(zip(refs, texts))
  return verses


def read_module_zip(path: str, module: str) -> dict[Ref, str]:
  """Like `read_module`, for a module zip (`mods.d/…conf` + `modules/…`; local or gs://)."""
  data = io.BytesIO(epath.Path(path).read_bytes())
  if not zipfile.is_zipfile(data):
    raise DataError(f"{path}: not a zip file (expected the SWORD module {module})")
  with tempfile.TemporaryDirectory() as folder:
    with zipfile.ZipFile(data) as archive:
      archive.extractall(folder)
    if not os.path.isdir(os.path.join(folder, "mods.d")):
      raise DataError(f"{path}: no mods.d/ folder; expected a SWORD module zip of {module}")
    return read_module(folder, module)


def align(english: dict[Ref, str], spanish: dict[Ref, str]
          ) -> tuple[list[tuple[str, str, str]], dict[str, int]]:
  """(reference, English text, Spanish text) for verses non-empty on both sides.

  Returns:
    the aligned verses in the English module's order, and counts of what was skipped.
  """
  pairs = []
  counts = {"only_en": 0, "only_es": 0, "empty_en": 0, "empty_es": 0, "empty_both": 0}
  for ref, raw_en in english.items():
    if ref not in spanish:
      counts["only_en"] += 1 if raw_en.strip() else 0
      continue
    en, es = osis.to_text(raw_en), osis.to_text(spanish[ref])
    if not en and not es:
      counts["empty_both"] += 1
    elif not en:
      counts["empty_en"] += 1
    elif not es:
      counts["empty_es"] += 1
    else:
      pairs.append((f"{ref[0]}.{ref[1]}.{ref[2]}", en, es))
  counts["only_es"] = sum(1 for ref, raw in spanish.items()
                          if ref not in english and raw.strip())
  return pairs, counts


def assign_splits(pairs: list[tuple[str, str, str]], num_validation: int = NUM_VALIDATION,
                  num_test: int = NUM_TEST) -> dict[str, str]:
  """Reference -> split for ``(ref, english, spanish)`` pairs, leak-free.

  Verses sharing an English or a Spanish text (:func:`mt_flax.data.overlap.components`:
  "And God said, ...", repeated psalm lines) form one group, and a group goes to one
  split. Groups are taken in the order of their lowest reference hash: validation
  takes those that fit until it has ``num_validation`` verses, test the next
  ``num_test``, train the rest. Groups of more than MAX_HELD_OUT_GROUP verses (formulas
  such as "Yahweh spoke to Moses, saying," 74 times) stay in train, so that no formula
  fills a held-out split. With fewer than ten times that many verses, a tenth each goes
  to validation and test.
  """
  targets = {"validation": min(num_validation, len(pairs) // 10),
             "test": min(num_test, len(pairs) // 10)}
  groups: dict[str, list[str]] = {}
  for (ref, _, _), group in zip(pairs, overlap.components([(en, es) for _, en, es in pairs])):
    groups.setdefault(group, []).append(ref)
  digest = lambda ref: hashlib.blake2b(ref.encode(), digest_size=8).digest()
  order = sorted(groups.values(), key=lambda refs: min(map(digest, refs)))
  splits = {ref: "train" for ref, _, _ in pairs}
  filled = dict.fromkeys(targets, 0)
  for refs in order:
    if len(refs) > MAX_HELD_OUT_GROUP:
      continue
    split = next((s for s in targets if filled[s] + len(refs) <= targets[s]), None)
    if split is None:
      if all(filled[s] == targets[s] for s in targets):
        break
      continue
    filled[split] += len(refs)
    splits.update(dict.fromkeys(refs, split))
  return splits


class BibleEnEs(OurBuilder, tfds.core.GeneratorBasedBuilder):
  """World English Bible (engWEB2015eb) and Reina-Valera 1909 (spaRV1909eb), verse-aligned."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "WEB 2020 text / RV1909 2.60; 1,000 validation and test verses.",
                   "1.1.0": "Verses sharing an English or Spanish text stay in one split."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Install the SWORD modules (Debian: sword-text-web sword-text-sparv), or put "
      "engWEB2015eb.zip and spaRV1909eb.zip (SWORD module zips) into the manual folder "
      "(data.manual_dir or $MT_FLAX_MANUAL_DIR).")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Bible verses: World English Bible and Reina-Valera 1909, aligned "
                    "by book, chapter and verse; notes and headings removed.",
        features=tfds.features.FeaturesDict({
            "en": tfds.features.Text(),
            "es": tfds.features.Text(),
            "ref": tfds.features.Text(),   # OSIS reference, e.g. "John.3.16"
        }),
        supervised_keys=("en", "es"),
        homepage="https://worldenglish.bible/",
        citation="Public domain: World English Bible (eBible.org); Reina-Valera 1909.",
        metadata=tfds.core.MetadataDict(),
    )

  def _read(self, dl_manager: tfds.download.DownloadManager, module: str
            ) -> tuple[dict[Ref, str], str]:
    folder = find_installed(module, sword_paths())
    if folder is not None:
      return read_module(folder, module), folder
    path = locate(dl_manager, f"{module}.zip", [u.format(module=module) for u in URLS],
                  "bible_en_es", hint="; or install the SWORD modules (Debian packages "
                  "sword-text-web, sword-text-sparv) or set $SWORD_PATH")
    return read_module_zip(os.fspath(path), module), os.fspath(path)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    english, en_source = self._read(dl_manager, MODULES["en"])
    spanish, es_source = self._read(dl_manager, MODULES["es"])
    pairs, skipped = align(english, spanish)
    if not pairs:
      raise DataError(f"bible_en_es: no verse has text in both {en_source} and {es_source}")
    splits = assign_splits(pairs)
    log.info("bible_en_es: %d aligned verses; skipped %s", len(pairs), skipped)
    self.info.metadata.update({"sources": {"en": en_source, "es": es_source},
                               "num_pairs": len(pairs), "skipped": skipped})
    by_split: dict[str, list[tuple[str, str, str]]] = {"train": [], "validation": [], "test": []}
    for pair in pairs:
      by_split[splits[pair[0]]].append(pair)
    return self._nonempty_splits(by_split)

  def _generate_examples(self, pairs: list[tuple[str, str, str]]
                         ) -> Iterator[tuple[str, dict[str, str]]]:
    for ref, en, es in pairs:
      yield ref, {"en": en, "es": es, "ref": ref}

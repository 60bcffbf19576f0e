"""TFDS builders: spa_eng (fixture files and the real archive), bible_en_es, OSIS text."""
from __future__ import annotations

import collections
import io
import os
import re
import shutil
import zipfile

import ml_collections
import pytest
import tensorflow_datasets as tfds

from mt_flax.config import with_defaults
from mt_flax.data import bible, downloads, osis, sources, spa_eng, stats
from mt_flax.data.sources import DataError

tfds.disable_progress_bar()

SHARED_ZIP = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "spa-eng.zip")
SWORD_FOLDER = bible.find_installed(bible.MODULES["en"], list(bible.DEFAULT_SWORD_PATHS))
HAS_BIBLE = SWORD_FOLDER is not None and bible.find_installed(
    bible.MODULES["es"], list(bible.DEFAULT_SWORD_PATHS)) is not None


def make_config(name: str, data_dir, manual_dir="") -> ml_collections.ConfigDict:
  return with_defaults({"data": {
      "name": name, "src_lang": "en", "tgt_lang": "es", "manual_dir": str(manual_dir),
      "tfds_data_dir": str(data_dir)}})


def write_spa_zip(folder, lines: list[bytes]) -> str:
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, spa_eng.ARCHIVE)
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr(spa_eng.MEMBER, b"".join(lines))
    archive.writestr("spa-eng/_about.txt", b"fixture\n")
  return path


def english_sentences(count: int, split: str, start: int = 0) -> list[str]:
  """`count` distinct English sentences that `spa_eng.split_of` sends to `split`."""
  out, i = [], start
  while len(out) < count:
    sentence = f"Fixture sentence number {i}."
    if spa_eng.split_of(sentence) == split:
      out.append(sentence)
    i += 1
  return out


def all_records(config, split):
  source = sources.data_source(config, split)
  return source.__getitems__(list(range(len(source))))


# ----------------------------------------------------------------------------- spa_eng fixture


FIXTURE_LINES = [
    b"Go.\tVe.\n",                               # 1
    b"Go.\tVete.\n",                             # 2  same English, second translation
    b"GO. \tVaya.\n",                            # 3  same English up to case/space
    b"no tab on this line\n",                    # 4  malformed: no tab
    b"\tSin ingles.\n",                          # 5  malformed: empty English side
    b"Only English.\t   \n",                     # 6  malformed: empty Spanish side
    b"Bad \xff\xfe bytes.\tMal.\n",               # 7  malformed: invalid UTF-8
    b"Windows line.\tL\xc3\xadnea de Windows.\r\n",  # 8  CRLF, UTF-8 accent
    b"\n",                                       # 9  malformed: empty line
    b"Extra column.\tColumna extra.\tCC-BY 2.0 (France) Attribution: tatoeba.org\n",  # 10
    b"Go.\tVete.\n",                             # 11 exact duplicate of line 2: kept
]


SHARED_SPANISH = english_sentences(1, "validation", 2000) + english_sentences(1, "train", 2000)


@pytest.fixture(scope="module")
def fixture_build(tmp_path_factory):
  root = tmp_path_factory.mktemp("spa_fixture")
  extra = [f"{en}\tTraducci\u00f3n {i}.\n".encode() for i, en in
           enumerate(english_sentences(40, "validation") + english_sentences(40, "test")
                     + english_sentences(120, "train"))]
  # The same English sentence with several translations, in every split.
  for en in english_sentences(3, "validation", 1000) + english_sentences(3, "test", 1000):
    extra += [f"{en}\tUna {en}\n".encode(), f"{en}\tOtra {en}\n".encode(),
              f"  {en.upper()} \tTercera {en}\n".encode()]
  # One Spanish sentence translating two English sentences that alone would go to
  # validation and to train: the pair joins them, both go where the smaller key goes.
  extra += [f"{en}\tLa misma traducci\u00f3n.\n".encode() for en in SHARED_SPANISH]
  lines = FIXTURE_LINES + extra
  write_spa_zip(root / "manual", lines)
  config = make_config("spa_eng", root / "data", root / "manual")
  return config, lines


def test_spa_eng_fixture_reports_malformed_lines_with_numbers(fixture_build):
  config, _ = fixture_build
  report = sources.report(config)
  assert report["malformed"] == [
      {"line": 4, "reason": "no tab"},
      {"line": 5, "reason": "empty English side"},
      {"line": 6, "reason": "empty Spanish side"},
      {"line": 7, "reason": "invalid UTF-8 at byte 4"},
      {"line": 9, "reason": "empty line"},
  ]
  assert report["num_malformed"] == 5


def test_spa_eng_fixture_keeps_every_well_formed_line(fixture_build):
  config, lines = fixture_build
  sizes = sources.split_sizes(config)
  report = sources.report(config)
  assert sum(sizes.values()) == report["num_pairs"] == len(lines) - 5
  records = [r for split in ("train", "validation", "test") for r in all_records(config, split)]
  got = collections.Counter((r["line"], r["en"].decode(), r["es"].decode()) for r in records)
  assert got[(8, "Windows line.", "Línea de Windows.")] == 1
  assert got[(10, "Extra column.", "Columna extra.")] == 1
  assert got[(11, "Go.", "Vete.")] == 1 and got[(2, "Go.", "Vete.")] == 1
  assert sorted(line for line, _, _ in got) == sorted(
      set(range(1, len(lines) + 1)) - {4, 5, 6, 7, 9})


def test_a_damaged_prepared_shard_is_named_with_the_folder_to_delete(fixture_build, tmp_path):
  """Real array_record bytes changed on disk: one line naming the file and the fix, which
  works (the deleted folder is prepared again)."""
  pairs = sources.load_pairs(fixture_build[0], "train")
  config = make_config("spa_eng", tmp_path / "data", fixture_build[0].data.manual_dir)
  shutil.copytree(fixture_build[0].data.tfds_data_dir, tmp_path / "data")
  shard, = (tmp_path / "data").glob("spa_eng/*/spa_eng-train.array_record-*")
  raw = bytearray(shard.read_bytes())
  for i in range(1000, 1200):              # inside the first chunk of records
    raw[i] ^= 0xFF
  shard.write_bytes(bytes(raw))
  with pytest.raises(DataError) as error:
    sources.load_pairs(config, "train")
  assert str(error.value).startswith(f"{shard} is damaged (Corrupted Riegeli/records file")
  assert str(error.value).endswith(f"delete the prepared dataset folder {shard.parent} and run "
                                   "again to prepare it again")
  shutil.rmtree(shard.parent)
  assert sources.load_pairs(config, "train") == pairs


def test_spa_eng_fixture_groups_translations_of_one_sentence(fixture_build):
  config, lines = fixture_build
  split_of_key = {}
  for split in ("train", "validation", "test"):
    for r in all_records(config, split):
      for lang in ("en", "es"):
        key = (lang, spa_eng.sentence_key(r[lang].decode()))
        assert split_of_key.setdefault(key, split) == split, key
  pairs, _ = spa_eng.parse(b"".join(lines))
  expected = collections.Counter(spa_eng.assign_splits(pairs))
  assert sources.split_sizes(config) == dict(expected)
  assert expected["validation"] >= 40 + 9 and expected["test"] >= 40 + 9
  assert all(split_of_key[("en", spa_eng.sentence_key(e))] == "validation"
             for e in english_sentences(3, "validation", 1000))
  smaller = min(SHARED_SPANISH, key=spa_eng.sentence_key)
  assert {split_of_key[("en", spa_eng.sentence_key(e))] for e in SHARED_SPANISH} == {
      spa_eng.split_of(smaller)}


def test_components_join_pairs_through_either_side():
  pairs = [spa_eng.Pair(1, "B.", "x."), spa_eng.Pair(2, "C.", "X. "), spa_eng.Pair(3, "C.", "y."),
           spa_eng.Pair(4, "a.", "z."), spa_eng.Pair(5, "D.", "w."), spa_eng.Pair(6, " d. ", "v.")]
  assert spa_eng.components(pairs) == ["b.", "b.", "b.", "a.", "d.", "d."]
  assert spa_eng.components(pairs[::-1]) == ["d.", "d.", "a.", "b.", "b.", "b."]
  assert spa_eng.assign_splits(pairs) == [spa_eng.split_of(c) for c in
                                          ("b.", "b.", "b.", "a.", "d.", "d.")]


def test_load_pairs_follows_the_configured_direction(fixture_build):
  config, _ = fixture_build
  forward = sources.load_pairs(config, "validation")
  backward_config = ml_collections.ConfigDict(config.to_dict())
  backward_config.data.src_lang, backward_config.data.tgt_lang = "es", "en"
  assert sources.load_pairs(backward_config, "validation") == [(t, s) for s, t in forward]
  assert all(isinstance(s, str) and isinstance(t, str) for s, t in forward)


def test_empty_split_is_a_one_line_error(tmp_path):
  lines = [f"{en}\tTraducción.\n".encode() for en in english_sentences(5, "train")]
  write_spa_zip(tmp_path / "manual", lines)
  config = make_config("spa_eng", tmp_path / "data", tmp_path / "manual")
  assert sources.split_sizes(config) == {"train": 5, "validation": 0, "test": 0}
  with pytest.raises(DataError, match=r"split 'validation' is empty") as error:
    sources.load_pairs(config, "validation")
  assert "\n" not in str(error.value)


def test_missing_data_offline_names_file_and_folder(tmp_path, monkeypatch):
  monkeypatch.delenv(downloads.MANUAL_DIR_ENV, raising=False)
  monkeypatch.setattr(downloads, "unreachable", lambda url, timeout_s=5.0: "no network: test")
  config = make_config("spa_eng", tmp_path / "data")
  with pytest.raises(DataError) as error:
    sources.get_builder(config)
  message = str(error.value)
  assert "\n" not in message
  assert "spa-eng.zip" in message and spa_eng.URL in message
  assert str(tmp_path / "data" / "downloads" / "manual") in message
  assert "MT_FLAX_MANUAL_DIR" in message and "data.manual_dir" in message


def test_manual_dir_from_environment_and_config(tmp_path, monkeypatch):
  write_spa_zip(tmp_path / "env", [b"Hello.\tHola.\n"] * 3)
  write_spa_zip(tmp_path / "cfg", [b"Bye.\tAdios.\n"] * 3)
  monkeypatch.setenv(downloads.MANUAL_DIR_ENV, str(tmp_path / "env"))
  assert downloads.manual_dir(make_config("spa_eng", tmp_path)) == str(tmp_path / "env")
  config = make_config("spa_eng", tmp_path / "a", tmp_path / "cfg")
  assert downloads.manual_dir(config) == str(tmp_path / "cfg")
  assert sources.report(config)["source"] == str(tmp_path / "cfg" / "spa-eng.zip")
  assert sources.report(make_config("spa_eng", tmp_path / "b"))["source"] == str(
      tmp_path / "env" / "spa-eng.zip")


def test_unknown_dataset_and_language_are_one_line_errors(tmp_path):
  with pytest.raises(DataError, match=r"unknown dataset data.name='spa_en'.*spa_eng"):
    sources.get_builder(make_config("spa_en", tmp_path))
  with pytest.raises(DataError, match=r"unknown dataset data.name='wmt14_translat/de-en'"
                                      r".*wmt14_translate"):
    sources.get_builder(make_config("wmt14_translat/de-en", tmp_path))


def test_tfds_translation_datasets_resolve_by_name(tmp_path):
  builder = sources.get_builder(make_config("wmt17_translate/de-en", tmp_path), prepare=False)
  assert set(sources.languages(builder)) == {"de", "en"}
  config = make_config("wmt17_translate/de-en", tmp_path)
  config.data.src_lang, config.data.tgt_lang = "en", "fr"
  with pytest.raises(DataError, match=r"data.tgt_lang='fr' is not a language"):
    sources.check_direction(config, builder)


def test_parse_counts_every_line():
  data = b"a\tb\nno tab\n\n\tx\nc\td\r\n"
  pairs, malformed = spa_eng.parse(data)
  assert [(p.line, p.en, p.es) for p in pairs] == [(1, "a", "b"), (5, "c", "d")]
  assert [(m.line, m.reason) for m in malformed] == [
      (2, "no tab"), (3, "empty line"), (4, "empty English side")]


# ----------------------------------------------------------------------------- spa_eng real data


@pytest.fixture(scope="module")
def real_spa(tmp_path_factory):
  if not os.path.exists(SHARED_ZIP):
    pytest.skip(f"{os.path.abspath(SHARED_ZIP)} absent (shared data not available here)")
  root = tmp_path_factory.mktemp("spa_real")
  return make_config("spa_eng", root / "data", os.path.dirname(os.path.abspath(SHARED_ZIP)))


def test_real_spa_eng_keeps_all_118964_pairs(real_spa):
  sizes = sources.split_sizes(real_spa)
  assert sum(sizes.values()) == 118_964
  assert sources.report(real_spa)["num_malformed"] == 0
  assert 0.04 < sizes["validation"] / 118_964 < 0.06
  assert 0.04 < sizes["test"] / 118_964 < 0.06


def test_real_spa_eng_no_english_sentence_in_two_splits(real_spa):
  splits_of = collections.defaultdict(set)
  translations = collections.Counter()
  for split in ("train", "validation", "test"):
    for en, es in sources.load_pairs(real_spa, split):
      splits_of[("en", spa_eng.sentence_key(en))].add(split)
      splits_of[("es", spa_eng.sentence_key(es))].add(split)
      translations[en] += 1
  assert all(len(s) == 1 for s in splits_of.values())
  assert sum(1 for n in translations.values() if n > 1) == 12_448


def held_out_sources_in_train(pairs, splits, side: str) -> dict[str, int]:
  """Held-out pairs whose `side` sentence (by `sentence_key`) is a training source."""
  key = lambda p: spa_eng.sentence_key(getattr(p, side))
  train = {key(p) for p, s in zip(pairs, splits) if s == "train"}
  return {held: sum(1 for p, s in zip(pairs, splits) if s == held and key(p) in train)
          for held in ("validation", "test")}


def test_real_spa_eng_no_leak_in_either_direction():
  if not os.path.exists(SHARED_ZIP):
    pytest.skip(f"{os.path.abspath(SHARED_ZIP)} absent (shared data not available here)")
  pairs, _ = spa_eng.parse(spa_eng.read_spa_txt(SHARED_ZIP))
  splits = spa_eng.assign_splits(pairs)
  sizes = collections.Counter(splits)
  assert sum(sizes.values()) == 118_964
  assert 0.04 < sizes["validation"] / 118_964 < 0.06 and 0.04 < sizes["test"] / 118_964 < 0.06
  assert held_out_sources_in_train(pairs, splits, "en") == {"validation": 0, "test": 0}
  assert held_out_sources_in_train(pairs, splits, "es") == {"validation": 0, "test": 0}
  # Grouping by the English side alone leaks Spanish sources: the check detects it.
  by_english = [spa_eng.split_of(p.en) for p in pairs]
  assert held_out_sources_in_train(pairs, by_english, "en") == {"validation": 0, "test": 0}
  assert min(held_out_sources_in_train(pairs, by_english, "es").values()) > 400


# ----------------------------------------------------------------------------- bible


@pytest.fixture(scope="module")
def real_bible(tmp_path_factory):
  if not HAS_BIBLE:
    pytest.skip("SWORD modules engWEB2015eb/spaRV1909eb not installed "
                "(Debian packages sword-text-web, sword-text-sparv)")
  config = make_config("bible_en_es", tmp_path_factory.mktemp("bible") / "data")
  verses = {}
  for split in ("train", "validation", "test"):
    for r in all_records(config, split):
      verses[r["ref"].decode()] = (r["en"].decode(), r["es"].decode(), split)
  return config, verses


def test_bible_john_3_16_reads_correctly(real_bible):
  _, verses = real_bible
  en, es, _ = verses["John.3.16"]
  assert en == ("For God so loved the world, that he gave his only born Son, that whoever "
                "believes in him should not perish, but have eternal life.")
  assert es.startswith("Porque de tal manera amó Dios al mundo, que ha dado á su Hijo unigénito")
  assert verses["Gen.1.1"][0] == "In the beginning, God created the heavens and the earth."


def test_bible_drops_notes_and_headings_and_glues_no_words(real_bible):
  _, verses = real_bible
  text = "\n".join(en + "\n" + es for en, es, _ in verses.values())
  assert "Hebrew word rendered" not in text and "<" not in text and ">" not in text
  assert "Glossary" not in verses["Rev.22.21"][0]
  assert verses["Song.1.2"][0].startswith("Let him kiss me")      # speaker label dropped
  assert verses["Ps.3.1"][0].startswith("A Psalm by David, when he fled")   # canonical title
  glued = re.findall(r"\w*[a-záéíóúñ][A-ZÁÉÍÓÚÑ]\w*|\S*[,;:!?][^\W\d_]\S*", text)
  assert glued == []
  assert "ejército se llamaba Sísara" in verses["Judg.4.2"][1]


def test_bible_alignment_and_split(real_bible):
  config, verses = real_bible
  sizes = sources.split_sizes(config)
  assert sizes["validation"] == 1000 and sizes["test"] == 1000
  assert sum(sizes.values()) == len(verses) > 30_000
  skipped = sources.report(config)["skipped"]
  assert skipped["empty_en"] + skipped["empty_es"] > 0        # empty verses are skipped
  assert skipped["only_en"] > 0                                # deuterocanon: WEB only
  assert all(en and es for en, es, _ in verses.values())
  assert verses["Rev.22.21"][1].startswith("La gracia de nuestro Señor Jesucristo")
  for side in (0, 1):           # no English or Spanish text in two splits
    splits_of = collections.defaultdict(set)
    for verse in verses.values():
      splits_of[spa_eng.sentence_key(verse[side])].add(verse[2])
    assert sum(len(s) > 1 for s in splits_of.values()) == 0
  held_out = stats.held_out_overlap(config)
  assert {split: (h["pairs"], h["sources_in_train"]) for split, h in held_out.items()} == {
      "validation": (1000, 0), "test": (1000, 0)}


def test_bible_split_keeps_verses_with_one_text_together():
  repeated = "And God said, let there be light."
  pairs = [(f"Gen.1.{i}", f"verse {i}", f"versículo {i}") for i in range(200)]
  pairs += [("Gen.2.1", repeated, "uno"), ("Gen.2.2", repeated, "dos"),
            ("Gen.2.3", "other", "DOS")]                    # joined through the Spanish side
  formula = [(f"Num.7.{i}", "The LORD spoke to Moses, saying,", f"dijo {i}") for i in range(5)]
  pairs += formula
  splits = bible.assign_splits(pairs, num_validation=15, num_test=15)
  assert collections.Counter(splits.values()) == {"validation": 15, "test": 15, "train": 178}
  assert len({splits[r] for r in ("Gen.2.1", "Gen.2.2", "Gen.2.3")}) == 1
  assert {splits[ref] for ref, _, _ in formula} == {"train"}      # 5 > MAX_HELD_OUT_GROUP
  assert bible.assign_splits(pairs[::-1], 15, 15) == splits      # order of the verses: no matter


def _module_zip(folder: str, module: str, out: str) -> None:
  conf = next(name for name in os.listdir(os.path.join(folder, "mods.d"))
              if name.lower() == f"{module.lower()}.conf")
  data_dir = os.path.join(folder, "modules", "texts", "ztext", module)
  with zipfile.ZipFile(out, "w") as archive:
    archive.write(os.path.join(folder, "mods.d", conf), f"mods.d/{conf}")
    for name in os.listdir(data_dir):
      archive.write(os.path.join(data_dir, name), f"modules/texts/ztext/{module}/{name}")


def test_bible_from_module_zips_in_manual_dir(real_bible, tmp_path, monkeypatch):
  _, verses = real_bible
  manual = tmp_path / "manual"
  manual.mkdir()
  for module in bible.MODULES.values():
    _module_zip(SWORD_FOLDER, module, str(manual / f"{module}.zip"))
  monkeypatch.setenv("SWORD_PATH", str(tmp_path / "no_sword_here"))
  config = make_config("bible_en_es", tmp_path / "data", manual)
  assert sum(sources.split_sizes(config).values()) == len(verses)
  assert sources.report(config)["sources"]["en"].endswith("engWEB2015eb.zip")


def test_bible_missing_modules_offline(tmp_path, monkeypatch):
  monkeypatch.setenv("SWORD_PATH", str(tmp_path / "no_sword_here"))
  monkeypatch.delenv(downloads.MANUAL_DIR_ENV, raising=False)
  monkeypatch.setattr(downloads, "unreachable", lambda url, timeout_s=5.0: "no network: test")
  with pytest.raises(DataError, match=r"engWEB2015eb.zip not found in .*sword-text-web") as e:
    sources.get_builder(make_config("bible_en_es", tmp_path / "data"))
  assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- OSIS


@pytest.mark.parametrize("fragment, expected", [
    ('<w>only</w> born</q><note placement="foot">3:16 The phrase.</note><q><w>Son</w>, that',
     "only born Son, that"),
    ("<w>God</w><note>1:1 Elohim.</note><w>created</w> the", "God created the"),
    ("said,<note>x</note> “I am", "said, “I am"),
    ("Omega,<note>x</note>”says", "Omega,”says"),
    ("twenty gerahs<note>x</note>); half", "twenty gerahs); half"),
    ("<l>first line</l><l>second line</l>", "first line second line"),
    ('<title type="x-heading">A Heading</title>Text', "Text"),
    ('<title canonical="true" type="psalm">A Psalm.</title> <l/>Yahweh', "A Psalm. Yahweh"),
    ("<speaker>Beloved</speaker> <l/>Let him", "Let him"),
    ('Amen. <div sID="g1" type="glossary"/><title>Glossary</title> Abba is… <div eID="g1" '
     'type="glossary"/>', "Amen."),
    ("ejército<transChange type=\"added\">se llamaba</transChange><w>Sísara</w>,",
     "ejército se llamaba Sísara,"),
    ("<w>sáca</w><transChange type=\"added\">lo</transChange> de", "sácalo de"),
    ("Como<transChange type=\"added\">lo</transChange>oímos", "Como lo oímos"),
    ("Josué<transChange type=\"added\">los</transChange> envió", "Josué los envió"),
    ("Tom &amp; Mary &lt;3", "Tom & Mary <3"),
    ("coins <note>x</note> ? Not", "coins? Not"),
])
def test_osis_to_text(fragment, expected):
  assert osis.to_text(fragment) == expected


def test_spa_txt_from_plain_file(tmp_path):
  path = tmp_path / "spa.txt"
  path.write_bytes(b"a\tb\n")
  assert spa_eng.read_spa_txt(path) == b"a\tb\n"
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w") as archive:
    archive.writestr("other.txt", b"x")
  (tmp_path / "bad.zip").write_bytes(buffer.getvalue())
  with pytest.raises(DataError, match="no spa-eng/spa.txt"):
    spa_eng.read_spa_txt(tmp_path / "bad.zip")


def test_spa_eng_downloads_from_its_url(tmp_path, monkeypatch):
  import functools
  import http.server
  import threading
  served = tmp_path / "served"
  write_spa_zip(served, [b"Download.\tDescarga.\n", b"Works.\tFunciona.\n"])
  class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
      pass
  handler = functools.partial(Quiet, directory=str(served))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    monkeypatch.delenv(downloads.MANUAL_DIR_ENV, raising=False)
    monkeypatch.setattr(spa_eng, "URL", f"http://127.0.0.1:{server.server_port}/spa-eng.zip")
    config = make_config("spa_eng", tmp_path / "data")
    assert sum(sources.split_sizes(config).values()) == 2
    assert sources.report(config)["source"].startswith(str(tmp_path / "data" / "downloads"))
  finally:
    server.shutdown()
    thread.join()


def test_runs_started_together_prepare_a_dataset_once(tmp_path):
  """Two preparations of one fresh data dir at once (sweep trials, test workers): one
  prepares, the other waits and reads the same prepared files."""
  import concurrent.futures
  lines = [f"{en}\tFrase {i}.\n".encode() for i, en in enumerate(
      english_sentences(30, "train") + english_sentences(5, "validation")
      + english_sentences(5, "test"))]
  write_spa_zip(tmp_path / "manual", lines)
  config = make_config("spa_eng", tmp_path / "data", tmp_path / "manual")
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    builders = list(pool.map(lambda _: sources.get_builder(config), range(2)))
  sizes = [{k: v.num_examples for k, v in b.info.splits.items()} for b in builders]
  assert sizes[0] == sizes[1] == {"train": 30, "validation": 5, "test": 5}
  assert all(len(all_records(config, s)) == n for s, n in sizes[0].items())

"""Tokenizer, Grain training pipeline (bucketing, packing, pad-to-max), evaluation
examples and batches, and the data-stats command, on a synthetic spa_eng fixture."""
from __future__ import annotations

import collections
import itertools
import json
import os
import random
import zipfile

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mt_flax.config import load_config
from mt_flax.commands import data_stats
from mt_flax.data import bucketing, pipeline, sources, spa_eng, tokenizer as tok_lib
from mt_flax.data.sources import DataError
from mt_flax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from mt_flax.sharding import RowShare

tfds.disable_progress_bar()

CONFIG_FILE = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "bible_en_es_tiny.py")
WORDS_EN = ("the cat dog house red blue small big runs eats sees quickly slowly tree river "
            "mountain friend teacher book table window green yellow happy sad old new").split()
WORDS_ES = ("el gato perro casa rojo azul pequeño grande corre come ve rápido lento árbol río "
            "montaña amigo maestro libro mesa ventana verde amarillo feliz triste viejo "
            "nuevo").split()


def synthetic_lines(n: int, seed: int = 0) -> list[bytes]:
  """Pairs with skewed lengths (1..40 words) and target/source ratios from 0.4 to 2."""
  rng = random.Random(seed)
  lines = []
  for i in range(n):
    words = min(40, max(1, int(rng.lognormvariate(1.9, 0.55))))
    ratio = rng.choice([0.4, 0.9, 1.0, 1.0, 1.1, 2.0])
    en = " ".join(rng.choice(WORDS_EN) for _ in range(words)) + f" {i}."
    es = " ".join(rng.choice(WORDS_ES) for _ in range(max(1, round(words * ratio)))) + f" {i}."
    lines.append(f"{en.capitalize()}\t{es.capitalize()}\n".encode())
  return lines


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline")
  (root / "manual").mkdir()
  with zipfile.ZipFile(root / "manual" / spa_eng.ARCHIVE, "w") as archive:
    archive.writestr(spa_eng.MEMBER, b"".join(synthetic_lines(2500)))
  config = load_config(CONFIG_FILE, [
      "data.name=spa_eng", f"data.manual_dir={root / 'manual'}",
      f"data.tfds_data_dir={root / 'data'}", "data.vocab_size=200", "data.max_len=40",
      "batch_tokens=640", "seed=3"])
  tokenizer = tok_lib.load_or_train_tokenizer(config, str(root / "work"))
  return config, tokenizer, root


def with_overrides(config, **data):
  out = ml_collections.ConfigDict(config.to_dict())
  for key, value in data.items():
    if key == "batch_tokens" or key == "seed":
      out[key] = value
    else:
      out.data[key] = value
  return out


def rows_of(batch) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
  """(src, tgt_out) token tuples of every pair in a batch (packed or not)."""
  out = []
  if "src_segments" in batch:
    for r in range(batch["src"].shape[0]):
      for seg in range(1, int(batch["src_segments"][r].max()) + 1):
        src = batch["src"][r][batch["src_segments"][r] == seg]
        tgt = batch["tgt_out"][r][batch["tgt_segments"][r] == seg]
        out.append((tuple(src.tolist()), tuple(tgt.tolist())))
    return out
  for r in range(batch["src"].shape[0]):
    if batch["src"][r, 0] != PAD_ID:
      src = batch["src"][r][batch["src"][r] != PAD_ID]
      tgt = batch["tgt_out"][r][batch["tgt_out"][r] != PAD_ID]
      out.append((tuple(src.tolist()), tuple(tgt.tolist())))
  return out


def expected_rows(data: pipeline.TrainingSet):
  return collections.Counter(
      (tuple(ex["src"].tolist()), tuple(ex["tgt_out"].tolist()))
      for ex in (data.examples[int(i)] for i in data.kept))


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_special_ids_and_round_trip(setup):
  _, tokenizer, _ = setup
  model = tokenizer._src
  assert [model.id_to_piece(i) for i in (PAD_ID, UNK_ID, BOS_ID, EOS_ID)] == [
      "<pad>", "<unk>", "<s>", "</s>"]
  assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
  ids = tokenizer.encode_src("The cat sees the river 7.")
  assert ids and BOS_ID not in ids and EOS_ID not in ids and PAD_ID not in ids
  assert tokenizer.decode_src(ids) == "The cat sees the river 7."
  tgt = tokenizer.encode_tgt("El gato ve el río.")
  assert tokenizer.decode_tgt([BOS_ID] + tgt + [EOS_ID] + tgt + [PAD_ID]) == "El gato ve el río."
  assert tokenizer.decode_tgt(np.array([BOS_ID] + tgt + [PAD_ID, PAD_ID])) == "El gato ve el río."
  assert tokenizer.shared and tokenizer.src_vocab_size == tokenizer.tgt_vocab_size <= 200


def test_tokenizer_is_reused_and_checked_on_resume(setup, monkeypatch):
  config, tokenizer, root = setup
  def no_training(*args, **kwargs):
    raise AssertionError("retrained")
  monkeypatch.setattr(tok_lib, "train_model", no_training)
  again = tok_lib.load_or_train_tokenizer(config, str(root / "work"))
  assert again.encode_src("the red book 12.") == tokenizer.encode_src("the red book 12.")
  with pytest.raises(DataError, match=r"vocab_size: 200 there, 300 in the config") as error:
    tok_lib.load_or_train_tokenizer(with_overrides(config, vocab_size=300), str(root / "work"))
  assert "\n" not in str(error.value)


def test_tokenizer_separate_vocabularies_trained_on_train_split_only(setup, monkeypatch):
  config, _, root = setup
  seen = []
  real_train = tok_lib.train_model
  def recording(texts, path, **kwargs):
    texts = list(texts)
    seen.append((os.path.basename(path), texts))
    real_train(texts, path, **kwargs)
  monkeypatch.setattr(tok_lib, "train_model", recording)
  separate = with_overrides(config, shared_vocab=False, tokenizer_type="bpe", vocab_size=150)
  tokenizer = tok_lib.load_or_train_tokenizer(separate, str(root / "separate"))
  assert not tokenizer.shared
  assert sorted(name for name, _ in seen) == ["src.model", "tgt.model"]
  train = sources.load_pairs(config, "train")
  assert dict(seen)["src.model"] == [s for s, _ in train]
  assert dict(seen)["tgt.model"] == [t for _, t in train]
  assert os.path.exists(root / "separate" / "tokenizer" / "tokenizer.json")


# ----------------------------------------------------------------------------- bucketing


def test_bucketing_respects_budget_shapes_and_keeps_every_pair(setup):
  config, tokenizer, _ = setup
  data = pipeline.training_set(config, tokenizer)
  config = with_overrides(config, length_multiple=8)
  batches = list(pipeline.train_iterator(config, tokenizer, num_epochs=1, batch_multiple=4))
  shapes = {(b["src"].shape, b["tgt_in"].shape) for b in batches}
  assert len(shapes) <= config.data.num_buckets
  assert all(s[1] % 8 == 0 and t[1] % 8 == 0 for s, t in shapes)
  for b in batches:
    rows, src_len = b["src"].shape
    assert b["tgt_in"].shape == b["tgt_out"].shape and b["tgt_in"].shape[0] == rows
    assert rows % 4 == 0
    assert rows * src_len <= config.batch_tokens and rows * b["tgt_in"].shape[1] <= config.batch_tokens
    assert set(b) == {"src", "tgt_in", "tgt_out"} and all(v.dtype == np.int32 for v in b.values())
    assert (b["tgt_in"][:, 0][b["src"][:, 0] != 0] == BOS_ID).all()
  got = collections.Counter(r for b in batches for r in rows_of(b))
  assert got == expected_rows(data)
  assert sum(got.values()) + data.dropped == data.num_pairs


def test_bucket_boundaries_are_optimal_over_nested_sets():
  rng = np.random.default_rng(0)
  src = rng.integers(1, 12, size=400)
  tgt = np.clip(src + rng.integers(-3, 4, size=400), 1, None)
  for k in (1, 2, 3):
    boundaries = bucketing.optimal_boundaries(src, tgt, k)
    best = sum(bucketing.padded_slots(src, tgt, boundaries)[i] ** -1 * s.sum()
               for i, s in enumerate((src, tgt)))
    # exhaustive search over nested sets of k buckets on the candidate grid
    grid = [(a, b) for a in np.unique(src) for b in np.unique(tgt)]
    last = (int(src.max()), int(tgt.max()))
    def cost(chain):
      return sum(bucketing.padded_slots(src, tgt, chain)[i] ** -1 * s.sum()
                 for i, s in enumerate((src, tgt)))
    options = [sorted(set(c) | {last}) for c in itertools.combinations(grid, k - 1)]
    nested = [c for c in options if all(x[0] <= y[0] and x[1] <= y[1] for x, y in zip(c, c[1:]))]
    assert len(boundaries) <= k and boundaries[-1] == last
    assert best <= min(cost(c) for c in nested) + 1e-6


def test_bucket_lengths_are_the_best_multiples_of_length_multiple():
  rng = np.random.default_rng(3)
  src = rng.integers(1, 90, size=1500)
  tgt = np.clip(src + rng.integers(-5, 6, size=1500), 1, None)

  def slots(boundaries):
    src_eff, tgt_eff = bucketing.padded_slots(src, tgt, boundaries)
    return src.sum() / src_eff + tgt.sum() / tgt_eff

  exact = bucketing.optimal_boundaries(src, tgt, 6)
  for m in (8, 16):
    rounded = bucketing.optimal_boundaries(src, tgt, 6, m)
    assert len(rounded) <= 6 and all(s % m == 0 and t % m == 0 for s, t in rounded)
    assert rounded[-1] == (bucketing.round_up(src.max(), m), bucketing.round_up(tgt.max(), m))
    shapes = np.asarray(rounded)[bucketing.assign(src, tgt, rounded)]
    assert (shapes[:, 0] >= src).all() and (shapes[:, 1] >= tgt).all()
    exact_rounded_up = [(bucketing.round_up(s, m), bucketing.round_up(t, m)) for s, t in exact]
    assert slots(exact) <= slots(rounded) <= slots(exact_rounded_up)
  assert bucketing.optimal_boundaries(src, tgt, 6, 128) == [(128, 128)]
  with pytest.raises(ValueError, match=r"^data.length_multiple=0: expected at least 1$"):
    bucketing.optimal_boundaries(src, tgt, 6, 0)


def test_many_distinct_lengths_use_quantile_candidates():
  rng = np.random.default_rng(2)
  src = rng.integers(1, 400, size=3000)
  tgt = rng.integers(1, 300, size=3000)
  boundaries = bucketing.optimal_boundaries(src, tgt, 8)
  assert len(boundaries) <= 8 and boundaries[-1] == (int(src.max()), int(tgt.max()))
  k = bucketing.assign(src, tgt, boundaries)
  shapes = np.asarray(boundaries)[k]
  assert (shapes[:, 0] >= src).all() and (shapes[:, 1] >= tgt).all()


def test_efficiency_bound_is_an_upper_bound():
  rng = np.random.default_rng(1)
  src = rng.integers(1, 30, size=2000)
  tgt = rng.integers(1, 30, size=2000)
  boundaries = bucketing.optimal_boundaries(src, tgt, 4)
  src_eff, tgt_eff = bucketing.padded_slots(src, tgt, boundaries)
  assert src_eff <= bucketing.efficiency_bound(src, 4) + 1e-9
  assert tgt_eff <= bucketing.efficiency_bound(tgt, 4) + 1e-9
  assert bucketing.efficiency_bound(src, 40) == pytest.approx(1.0)


def test_pad_to_max_is_one_shape(setup):
  config, tokenizer, _ = setup
  batches = take(pipeline.train_iterator(with_overrides(config, batching="pad"), tokenizer), 5)
  rows = config.batch_tokens // config.data.max_len
  assert {b["src"].shape for b in batches} == {(rows, config.data.max_len)}
  assert {b["tgt_out"].shape for b in batches} == {(rows, config.data.max_len)}


# ----------------------------------------------------------------------------- packing


def test_packing_segments_positions_and_coverage(setup):
  config, tokenizer, _ = setup
  packed_config = with_overrides(config, batching="pack")
  data = pipeline.training_set(config, tokenizer)
  batches = list(pipeline.train_iterator(packed_config, tokenizer, num_epochs=1,
                                         batch_multiple=2))
  assert len({(b["src"].shape, b["tgt_in"].shape) for b in batches}) == 1
  for b in batches:
    assert set(b) == {"src", "tgt_in", "tgt_out", "src_segments", "tgt_segments",
                      "src_positions", "tgt_positions"}
    assert b["src"].shape[0] % 2 == 0
    assert b["src"].shape[0] * b["src"].shape[1] <= config.batch_tokens
    for side, tokens in (("src", b["src"]), ("tgt", b["tgt_in"])):
      segments, positions = b[f"{side}_segments"], b[f"{side}_positions"]
      assert ((segments == 0) == (tokens == 0)).all()
      for r in range(tokens.shape[0]):
        seg = segments[r][segments[r] > 0]
        n = int(seg.max()) if seg.size else 0
        assert (seg == np.repeat(np.arange(1, n + 1), np.bincount(seg)[1:])).all()
        for s in range(1, n + 1):
          assert (positions[r][segments[r] == s] == np.arange((segments[r] == s).sum())).all()
    for r in range(b["src"].shape[0]):
      for s in range(1, int(b["tgt_segments"][r].max()) + 1):
        where = b["tgt_segments"][r] == s
        assert b["tgt_in"][r][where][0] == BOS_ID and b["tgt_out"][r][where][-1] == EOS_ID
        assert b["src"][r][b["src_segments"][r] == s][-1] == EOS_ID
  got = collections.Counter(r for b in batches for r in rows_of(b))
  assert got == expected_rows(data)


# ----------------------------------------------------------------------------- lengths


def test_overlong_pairs_are_dropped_or_truncated_and_counted(setup, caplog):
  config, tokenizer, _ = setup
  short = with_overrides(config, max_len=12)
  data = pipeline.training_set(short, tokenizer)
  full = pipeline.training_set(config, tokenizer)
  assert data.num_pairs == full.num_pairs
  over = int(((full.src_lens > 12) | (full.tgt_lens > 12)).sum()) + full.dropped
  assert data.dropped == over > 0 and data.truncated == 0
  batches = list(pipeline.train_iterator(short, tokenizer, num_epochs=1))
  assert sum(len(rows_of(b)) for b in batches) + data.dropped == data.num_pairs
  assert "dropped" in caplog.text and "data.max_len=12" in caplog.text
  caplog.clear()
  pipeline._TRAINING_SETS.clear()                  # made again: the warning is not repeated
  assert pipeline.training_set(short, tokenizer).dropped == data.dropped
  assert "dropped" not in caplog.text
  cut = with_overrides(config, max_len=12, overlong="truncate")
  data = pipeline.training_set(cut, tokenizer)
  assert data.dropped == 0 and data.truncated == over
  batches = list(pipeline.train_iterator(cut, tokenizer, num_epochs=1))
  rows = [r for b in batches for r in rows_of(b)]
  assert len(rows) == data.num_pairs and max(max(len(s), len(t)) for s, t in rows) <= 12
  # A cut side ends without EOS (the sentence goes on); every other side ends with it.
  assert sum(1 for s, t in rows if s[-1] != EOS_ID or t[-1] != EOS_ID) == data.truncated
  assert all(len(s) == 12 for s, t in rows if s[-1] != EOS_ID)
  assert all(len(t) == 12 for s, t in rows if t[-1] != EOS_ID)
  assert all(EOS_ID not in s[:-1] and EOS_ID not in t[:-1] for s, t in rows)


# ----------------------------------------------------------------------------- state, order


@pytest.mark.parametrize("batching", ["bucket", "pack", "pad"])
def test_iterator_state_restores_the_exact_batch_sequence(setup, batching):
  config, tokenizer, _ = setup
  cfg = with_overrides(config, batching=batching)
  steps_per_epoch = len(list(pipeline.train_iterator(cfg, tokenizer, num_epochs=1)))
  first = pipeline.train_iterator(cfg, tokenizer)
  take(first, steps_per_epoch - 2)                     # the restore spans an epoch boundary
  state = json.loads(json.dumps(first.get_state()))
  expected = take(first, 5)
  resumed = pipeline.train_iterator(cfg, tokenizer)
  resumed.set_state(state)
  for a, b in zip(expected, take(resumed, 5)):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_epochs_are_reshuffled_by_seed(setup):
  config, tokenizer, _ = setup
  per_epoch = len(list(pipeline.train_iterator(config, tokenizer, num_epochs=1)))
  stream = take(pipeline.train_iterator(config, tokenizer), 2 * per_epoch)
  again = take(pipeline.train_iterator(config, tokenizer), 3)
  other = take(pipeline.train_iterator(with_overrides(config, seed=4), tokenizer), 3)
  assert all((a["src"].shape == b["src"].shape and (a["src"] == b["src"]).all())
             for a, b in zip(stream, again))
  assert any(a["src"].shape != b["src"].shape or (a["src"] != b["src"]).any()
             for a, b in zip(stream, other))
  epoch0 = collections.Counter(r for b in stream[:per_epoch] for r in rows_of(b))
  first_rows = [rows_of(b) for b in stream[:3]]
  later_rows = [rows_of(b) for b in stream[per_epoch:per_epoch + 3]]
  assert first_rows != later_rows
  assert sum(epoch0.values()) > 0.9 * len(pipeline.training_set(config, tokenizer).kept)


def test_processes_share_shapes_and_split_the_global_batch(setup):
  config, tokenizer, _ = setup
  whole = take(pipeline.train_iterator(config, tokenizer, batch_multiple=2), 6)
  parts = [take(pipeline.train_iterator(config, tokenizer, rows=RowShare.of_process(p, 2)), 6)
           for p in range(2)]
  for w, a, b in zip(whole, *parts):
    assert a["src"].shape == b["src"].shape and a["tgt_in"].shape == b["tgt_in"].shape
    assert a["src"].shape[0] * 2 == w["src"].shape[0]
    assert a["src"].shape[0] * a["src"].shape[1] <= config.batch_tokens // 2
    assert collections.Counter(rows_of(a) + rows_of(b)) == collections.Counter(rows_of(w))


@pytest.mark.parametrize("batching", ["bucket", "pad"])
def test_a_process_gets_exactly_the_rows_of_its_batch_shards(setup, batching):
  """Blocks 1 and 3 of 4 (not contiguous) are those rows of the global batch, in order, up
  to the part-filled last batch of a finite run; replicas of the blocks get the same."""
  config, tokenizer, _ = setup
  config = with_overrides(config, batching=batching)
  share = RowShare((1, 3), 4, 1)
  whole = list(pipeline.train_iterator(config, tokenizer, rows=RowShare((0, 1, 2, 3), 4),
                                       batch_multiple=2, num_epochs=1))
  mine = list(pipeline.train_iterator(config, tokenizer, rows=share, batch_multiple=2,
                                      num_epochs=1))
  replica = take(pipeline.train_iterator(config, tokenizer, rows=share, batch_multiple=2), 3)
  assert len(mine) == len(whole) and any(not (w["src"] != 0).any(axis=1).all()
                                         for w in whole[-3:])    # the last ones part-filled
  for w, m in zip(whole, mine):
    assert w["src"].shape[0] % 8 == 0
    rows = share.indices(w["src"].shape[0])
    assert list(rows[:3]) == [w["src"].shape[0] // 4 + r for r in range(3)]
    for k in w:
      np.testing.assert_array_equal(m[k], w[k][rows])
  for a, b in zip(mine, replica):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_packed_processes_with_the_same_shards_pack_the_same_rows(setup):
  config, tokenizer, _ = setup
  packed = with_overrides(config, batching="pack")
  shares = [RowShare((0, 1), 4, 0), RowShare((0, 1), 4, 0), RowShare((2, 3), 4, 1)]
  a, b, c = (take(pipeline.train_iterator(packed, tokenizer, rows=s, batch_multiple=2), 3)
             for s in shares)
  assert pipeline.train_shapes(packed, tokenizer, rows=shares[0], batch_multiple=2)[0].rows \
      == 2 * a[0]["src"].shape[0]
  for x, y, z in zip(a, b, c):
    assert x["src"].shape == z["src"].shape and x["src"].shape[0] % 4 == 0
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
    assert not set(rows_of(x)) & set(rows_of(z))


@pytest.mark.parametrize("batching", ["bucket", "pack", "pad"])
def test_every_batch_has_a_shape_the_processes_agreed_on(setup, batching):
  """The training loop agrees on ``train_shapes`` once, then checks each batch locally."""
  from mt_flax import train
  config, tokenizer, _ = setup
  config = with_overrides(config, batching=batching)
  share = RowShare((1, 3), 4, 1)
  agreed = train._agree_on_shapes(
      config, pipeline.train_shapes(config, tokenizer, rows=share, batch_multiple=2), share)
  stream = pipeline.train_iterator(config, tokenizer, rows=share, batch_multiple=2)
  for batch in take(stream, 30):
    train._check_batch_shape(train._host_batch(batch), agreed)


# ----------------------------------------------------------------------------- evaluation


def test_eval_examples_carry_lengths_ratios_and_slices(setup):
  config, tokenizer, _ = setup
  examples = pipeline.eval_examples(config, tokenizer, "validation")
  pairs = sources.load_pairs(config, "validation")
  assert len(examples) == min(len(pairs), config.data.eval_max_examples or len(pairs))
  for ex, (src, ref) in zip(examples, pairs):
    assert ex["src_text"] == src and ex["ref_text"] == ref
    assert ex["src_ids"][-1] == EOS_ID and ex["tgt_ids"][-1] == EOS_ID
    assert ex["src_len"] == len(ex["src_ids"]) - 1
    assert ex["ratio"] == pytest.approx((len(ex["tgt_ids"]) - 1) / ex["src_len"])
    assert len(ex["slices"]) == 2 and ex["slices"][0].startswith("src_len:")
  slices = collections.Counter(s for ex in examples for s in ex["slices"])
  assert {"ratio:<0.8", "ratio:0.8-1.25", "ratio:>1.25"} <= set(slices)
  assert len([s for s in slices if s.startswith("src_len:")]) >= 3


def test_long_stress_set_goes_beyond_max_len(setup):
  config, tokenizer, _ = setup
  cfg = with_overrides(config, eval_long_examples=4)
  long = pipeline.eval_examples(cfg, tokenizer, "validation", long_stress=True)
  assert len(long) == 4
  pairs = sources.load_pairs(config, "validation")
  for ex in long:
    assert ex["slices"][0] == "long" and len(ex["src_ids"]) > config.data.max_len
  assert long[0]["src_text"].startswith(pairs[0][0] + " " + pairs[1][0])


def test_eval_batches_cover_every_example_once_with_few_shapes(setup):
  config, tokenizer, _ = setup
  examples = (pipeline.eval_examples(config, tokenizer, "validation")
              + pipeline.eval_examples(config, tokenizer, "validation", long_stress=True))
  batches = pipeline.eval_batches(examples, 512, batch_multiple=4)
  seen = [i for _, indices in batches for i in indices]
  assert sorted(seen) == list(range(len(examples)))
  assert len({(b["src"].shape[1], b["tgt_in"].shape[1]) for b, _ in batches}) <= 8
  for batch, indices in batches:
    assert batch["src"].shape[0] % 4 == 0
    for row, i in enumerate(indices):
      n, m = len(examples[i]["src_ids"]), len(examples[i]["tgt_ids"])
      assert batch["src"][row, :n].tolist() == examples[i]["src_ids"]
      assert (batch["src"][row, n:] == 0).all()
      assert batch["tgt_out"][row, :m].tolist() == examples[i]["tgt_ids"]
      assert batch["tgt_in"][row, :m].tolist() == [BOS_ID] + examples[i]["tgt_ids"][:-1]
    assert (batch["src"][len(indices):] == 0).all()


# ----------------------------------------------------------------------------- errors, stats


def test_pipeline_errors_are_one_line(setup):
  config, tokenizer, _ = setup
  cases = [
      (with_overrides(config, batching="sorted"), r"data.batching='sorted': expected one of"),
      (with_overrides(config, overlong="cut"), r"data.overlong='cut'"),
      (with_overrides(config, batch_tokens=16), r"batch_tokens=16 cannot hold"),
      (with_overrides(config, max_len=2), r"all \d+ pairs are longer than data.max_len=2"),
  ]
  for cfg, pattern in cases:
    with pytest.raises(DataError, match=pattern) as error:
      pipeline.train_iterator(cfg, tokenizer)
    assert "\n" not in str(error.value)


def test_data_stats_json(setup, capsys):
  config, _, root = setup
  argv = ["--config", CONFIG_FILE, "--json", "--workdir", str(root / "work"),
          "--config.data.name=spa_eng", f"--config.data.manual_dir={root / 'manual'}",
          f"--config.data.tfds_data_dir={root / 'data'}", "--config.data.vocab_size=200",
          "--config.data.max_len=40", "--config.batch_tokens=640", "--config.seed=3"]
  assert data_stats.main(argv) == 0
  out = capsys.readouterr().out.strip().splitlines()
  result = json.loads(out[-1])
  assert result["splits"] == sources.split_sizes(config)
  for split in ("validation", "test"):
    held = result["held_out"][split]
    assert held["pairs"] == result["splits"][split] and 0 < held["sources"] <= held["pairs"]
    assert held["sources_in_train"] == 0
  for name in ("bucketing", "packing", "pad_to_max"):
    b = result["batching"][name]
    assert 0 < b["src_efficiency"] <= 1 and 0 < b["tgt_efficiency"] <= 1
    assert b["pairs"] + result["dropped"] == result["splits"]["train"]
  assert result["batching"]["bucketing"]["shapes"] <= 8
  assert result["batching"]["packing"]["shapes"] == result["batching"]["pad_to_max"]["shapes"] == 1
  pad = result["batching"]["pad_to_max"]["src_efficiency"]
  assert result["batching"]["packing"]["src_efficiency"] > pad
  assert result["batching"]["bucketing"]["src_efficiency"] > pad
  assert sum(result["histograms"]["src"]) == result["splits"]["train"] - result["dropped"]


def test_data_stats_errors(setup, capsys):
  assert data_stats.main(["--config", CONFIG_FILE, "--config.data.max_lenn=3"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "data.max_len" in err
  assert data_stats.main(["--config", CONFIG_FILE, "--config.data.name=nope"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "unknown dataset" in err
  assert data_stats.main(["--json"]) == 2
  assert "arguments are required: --config" in capsys.readouterr().err


def test_iterator_state_through_an_orbax_checkpoint_manager(setup, tmp_path):
  import grain
  import orbax.checkpoint as ocp
  config, tokenizer, _ = setup
  iterator = pipeline.train_iterator(config, tokenizer)
  take(iterator, 7)
  manager = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",),
                                  options=ocp.CheckpointManagerOptions(
                                      enable_async_checkpointing=False))
  manager.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  expected = take(iterator, 3)
  resumed = pipeline.train_iterator(config, tokenizer)
  manager.restore(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  for a, b in zip(expected, take(resumed, 3)):
    np.testing.assert_array_equal(a["src"], b["src"])
    np.testing.assert_array_equal(a["tgt_out"], b["tgt_out"])
  manager.close()


def test_encode_pair_drops_or_truncates(setup):
  _, tokenizer, _ = setup
  src, tgt = "the cat sees the big red house 5.", "el gato 5."
  n = len(tokenizer.encode_src(src))
  example = pipeline.encode_pair(tokenizer, src, tgt, None)
  assert example["src"].tolist() == tokenizer.encode_src(src) + [EOS_ID]
  assert example["tgt_in"].tolist() == [BOS_ID] + tokenizer.encode_tgt(tgt)
  assert example["tgt_out"].tolist() == tokenizer.encode_tgt(tgt) + [EOS_ID]
  assert pipeline.encode_pair(tokenizer, src, tgt, n) is None
  cut = pipeline.encode_pair(tokenizer, src, tgt, n - 1, "truncate")
  assert cut["src"].tolist() == tokenizer.encode_src(src)[:n - 1]          # no EOS
  assert cut["tgt_out"].tolist() == tokenizer.encode_tgt(tgt) + [EOS_ID]  # fits: EOS
  m = len(tokenizer.encode_tgt(src))
  cut = pipeline.encode_pair(tokenizer, tgt, src, m - 1, "truncate")
  assert cut["src"].tolist() == tokenizer.encode_src(tgt) + [EOS_ID]
  assert cut["tgt_in"].tolist() == [BOS_ID] + tokenizer.encode_tgt(src)[:m - 2]
  assert cut["tgt_out"].tolist() == tokenizer.encode_tgt(src)[:m - 1]     # no EOS


class MtFlaxTestLeakyPairs(tfds.core.GeneratorBasedBuilder):
  """A third-party-style dataset whose splits share sources: `split<TAB>en<TAB>es` lines
  of `pairs.tsv` in the manual folder."""
  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "pairs.tsv"

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return tfds.core.Path(__file__)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict(
            {"en": tfds.features.Text(), "es": tfds.features.Text()}),
        supervised_keys=("en", "es"))

  def _split_generators(self, dl_manager):
    lines = (dl_manager.manual_dir / "pairs.tsv").read_text().splitlines()
    rows = [line.split("\t") for line in lines]
    return {split: self._generate_examples([(i, en, es) for i, (s, en, es) in enumerate(rows)
                                            if s == split])
            for split in ("train", "validation", "test")}

  def _generate_examples(self, rows):
    for i, en, es in rows:
      yield i, {"en": en, "es": es}


def test_training_leaves_out_pairs_whose_source_is_held_out(tmp_path):
  rng = random.Random(5)
  lines = [line.decode().rstrip("\n") for line in synthetic_lines(600, seed=9)]
  held = {"validation": lines[:40], "test": lines[40:80]}
  train = lines[80:]
  # 7 training pairs repeat a held-out source, up to case and spaces, with other targets
  leaks = [held["validation"][i].split("\t")[0].upper() + "  \tOtra cosa." for i in range(4)]
  leaks += ["  " + held["test"][i].split("\t")[0] + "\tAlgo." for i in range(3)]
  train = train + leaks
  rng.shuffle(train)
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "pairs.tsv").write_text("\n".join(
      f"{split}\t{line}" for split, rows in [("train", train), *held.items()]
      for line in rows) + "\n")
  config = load_config(CONFIG_FILE, [
      "data.name=mt_flax_test_leaky_pairs", f"data.manual_dir={tmp_path / 'manual'}",
      f"data.tfds_data_dir={tmp_path / 'data'}", "data.vocab_size=200", "data.overlong=truncate",
      "batch_tokens=640"])
  tokenizer = tok_lib.load_or_train_tokenizer(config, str(tmp_path / "work"))
  data = pipeline.training_set(config, tokenizer)
  assert data.held_out == 7 and len(data.kept) == len(train) - 7
  used = {spa_eng.sentence_key(src) for src, _ in
          sources.read_texts(sources.read_records(sources.data_source(config, "train"), 0,
                                                  len(train)), "en", "es")}
  kept_sources = {spa_eng.sentence_key(sources.read_texts(
      [sources.data_source(config, "train")[int(i)]], "en", "es")[0][0]) for i in data.kept}
  assert len(used - kept_sources) == 7
  from mt_flax.data import stats
  overlap = stats.held_out_overlap(config)
  assert {s: h["sources_in_train"] for s, h in overlap.items()} == {"validation": 0, "test": 0}
  # a second load reads the cached mask: same answer
  pipeline._TRAINING_SETS.clear()
  assert pipeline.training_set(config, tokenizer).held_out == 7

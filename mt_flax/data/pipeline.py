"""Input pipeline: the training split tokenized once into memory, then a Grain
pipeline that applies the length policy, shuffles per epoch, batches and keeps
this process's rows of every global batch.

Training batches (`train_iterator`) are dicts of int32 numpy arrays, 0 = padding:

    src      [B, S]   source tokens + EOS
    tgt_in   [B, T]   BOS + target tokens
    tgt_out  [B, T]   target tokens + EOS

and, for packed batches only, `src_segments`, `tgt_segments` [B, S|T] (1, 2, …
per pair in a row, 0 on padding) and `src_positions`, `tgt_positions` (0, 1, …
restarting at each pair). `config.data.batching` picks how pairs become batches:

- "bucket": length buckets chosen from the training length histogram
  (`mt_flax.data.bucketing`), at most `data.num_buckets` shapes;
- "pack": several pairs per row (Grain's first-fit packing), one shape;
- "pad": every pair padded to `data.max_len` (the Keras example's way), one shape.

`config.batch_tokens` bounds B * S and B * T of a global batch; each process gets
the rows its devices hold (its `sharding.RowShare`: the global batch's rows are
cut into `rows.num_shards` equal blocks, the process gets blocks `rows.shards`;
processes holding the same blocks get the same rows). Pairs longer than
`data.max_len` tokens on a side (EOS/BOS included) are dropped or truncated
(`data.overlong`), counted and logged. A truncated side keeps its first
`max_len` tokens and gets no EOS (the sentence goes on, so the model is not
taught to stop there): `src` is those tokens, `tgt_in` BOS and the first
`max_len - 1`, `tgt_out` the first `max_len`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from etils import epath

from mt_flax import paths
from mt_flax.data import bucketing, sources
from mt_flax.data.sources import DataError
from mt_flax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from mt_flax.sharding import RowShare
from mt_flax.special_ids import FIRST_WORD_ID

BATCHING_MODES = ("bucket", "pack", "pad")
OVERLONG_MODES = ("drop", "truncate")
EVAL_SHAPES = 8           # most (S, T) shapes of evaluation batches
_READ_CHUNK = 8192

Batch = dict[str, np.ndarray]
log = logging.getLogger(__name__)
_WARNED: set[str] = set()


# ----------------------------------------------------------------------------- pairs


def encode_pair(tokenizer: Tokenizer, src_text: str, tgt_text: str, max_len: int | None,
                overlong: str = "drop") -> dict[str, np.ndarray] | None:
  """One training example: `src` (+EOS), `tgt_in` (BOS+), `tgt_out` (+EOS), int32.

  Returns None when a side is longer than `max_len` and `overlong` is "drop";
  with "truncate" an over-long side is cut to `max_len` positions without EOS.
  """
  src, tgt = tokenizer.encode_src(src_text), tokenizer.encode_tgt(tgt_text)
  if max_len is not None and (len(src) + 1 > max_len or len(tgt) + 1 > max_len):
    if overlong == "drop":
      return None
  return _example(np.asarray(src, np.int32), np.asarray(tgt, np.int32), max_len)


def _example(src: np.ndarray, tgt: np.ndarray, max_len: int | None) -> dict[str, np.ndarray]:
  """`src` [n] and `tgt` [m] token ids (no BOS/EOS) -> one example of at most `max_len`
  positions a side. A side that fits gets EOS; a longer one is cut and gets none."""
  if max_len is None or len(src) + 1 <= max_len:
    src = np.append(src, EOS_ID)
  else:
    src = src[:max_len]
  if max_len is None or len(tgt) + 1 <= max_len:
    tgt_in, tgt_out = np.insert(tgt, 0, BOS_ID), np.append(tgt, EOS_ID)
  else:
    tgt_in, tgt_out = np.insert(tgt[:max_len - 1], 0, BOS_ID), tgt[:max_len]
  return {"src": src.astype(np.int32), "tgt_in": tgt_in.astype(np.int32),
          "tgt_out": tgt_out.astype(np.int32)}


@dataclasses.dataclass(frozen=True)
class TokenStore:
  """Token ids (no BOS/EOS) of every pair of a split, concatenated: pair i's source is
  `src[src_offsets[i]:src_offsets[i + 1]]`, likewise the target."""
  src: np.ndarray           # [total source tokens]
  src_offsets: np.ndarray   # [N + 1]
  tgt: np.ndarray           # [total target tokens]
  tgt_offsets: np.ndarray   # [N + 1]

  def __len__(self) -> int:
    return len(self.src_offsets) - 1

  def pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    return (self.src[self.src_offsets[i]:self.src_offsets[i + 1]],
            self.tgt[self.tgt_offsets[i]:self.tgt_offsets[i + 1]])

  @property
  def src_counts(self) -> np.ndarray:
    return np.diff(self.src_offsets)

  @property
  def tgt_counts(self) -> np.ndarray:
    return np.diff(self.tgt_offsets)


def _flatten(token_lists: list[list[int]], dtype: type) -> tuple[np.ndarray, np.ndarray]:
  offsets = np.zeros(len(token_lists) + 1, np.int64)
  np.cumsum([len(ids) for ids in token_lists], out=offsets[1:])
  flat = np.fromiter((t for ids in token_lists for t in ids), dtype, count=int(offsets[-1]))
  return flat, offsets


def tokenize_split(records: Sequence[Any], tokenizer: Tokenizer, src_lang: str, tgt_lang: str
                   ) -> TokenStore:
  """Reads every record of a split in bulk and tokenizes it into a `TokenStore`."""
  dtype = np.uint16 if max(tokenizer.src_vocab_size, tokenizer.tgt_vocab_size) <= 2**16 \
      else np.int32
  src_ids: list[list[int]] = []
  tgt_ids: list[list[int]] = []
  for start in range(0, len(records), _READ_CHUNK):
    texts = sources.read_texts(sources.read_records(records, start, start + _READ_CHUNK),
                               src_lang, tgt_lang)
    src_ids.extend(tokenizer.encode_src_batch([s for s, _ in texts]))
    tgt_ids.extend(tokenizer.encode_tgt_batch([t for _, t in texts]))
  src, src_offsets = _flatten(src_ids, dtype)
  tgt, tgt_offsets = _flatten(tgt_ids, dtype)
  return TokenStore(src, src_offsets, tgt, tgt_offsets)


def _store_cache_path(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                      builder: Any) -> epath.Path | None:
  """`<tokenizer dir>/cache/train-<digest>.npz`, keyed by dataset, direction and models."""
  if not tokenizer.directory:
    return None
  folder = epath.Path(tokenizer.directory)
  digest = hashlib.sha256()
  for part in (config.data.name, str(builder.data_dir), config.data.src_lang,
               config.data.tgt_lang, str(builder.info.splits["train"].num_examples)):
    digest.update(part.encode() + b"\0")
  for path in sorted(folder.glob("*.model")):
    digest.update(path.read_bytes())
  return folder / "cache" / f"train-{digest.hexdigest()[:16]}.npz"


def _cached_arrays(path: epath.Path | None, compute: Callable[[], dict[str, np.ndarray]],
                   valid: Callable[[dict[str, np.ndarray]], bool]) -> dict[str, np.ndarray]:
  """``compute()``'s arrays, kept in the ``.npz`` file ``path`` (none: not kept) and read
  from it next time when they are ``valid``."""
  if path is not None and path.exists():
    with np.load(io.BytesIO(path.read_bytes())) as saved:
      arrays = {k: saved[k] for k in saved.files}
    if valid(arrays):
      return arrays
  arrays = compute()
  if path is not None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    paths.write_bytes(path, buffer.getvalue())   # atomic; no rename (a copy on gs://)
  return arrays


def _load_or_tokenize(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                      records: Sequence[Any], path: epath.Path | None) -> TokenStore:
  arrays = _cached_arrays(
      path, lambda: dataclasses.asdict(tokenize_split(records, tokenizer, config.data.src_lang,
                                                      config.data.tgt_lang)),
      lambda saved: len(saved["src_offsets"]) == len(records) + 1)
  return TokenStore(**{k: arrays[k] for k in ("src", "src_offsets", "tgt", "tgt_offsets")})


class _Examples:
  """Random access to training examples (dicts of int32 arrays) of a `TokenStore`,
  cut to `max_len` positions per side (without EOS where cut)."""

  def __init__(self, store: TokenStore, max_len: int):
    self._store, self._max_len = store, max_len

  def __len__(self) -> int:
    return len(self._store)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    src, tgt = self._store.pair(int(i))
    return _example(src, tgt, self._max_len)


@dataclasses.dataclass(frozen=True)
class TrainingSet:
  """The training split after the length policy, with every kept pair's padded lengths."""
  examples: grain.MapDataset       # stored pair index -> example dict
  kept: np.ndarray                 # [K] stored indices of the pairs used
  src_lens: np.ndarray             # [K] len(src) (EOS included) after truncation
  tgt_lens: np.ndarray             # [K] len(tgt_in) == len(tgt_out)
  num_pairs: int                   # pairs in the split
  dropped_src: int                 # dropped: source longer than max_len (target maybe too)
  dropped_tgt: int                 # dropped: only the target longer than max_len
  truncated: int                   # pairs cut to max_len
  max_len: int
  held_out: int = 0                # left out: the source is also a validation or test source

  @property
  def dropped(self) -> int:
    return self.dropped_src + self.dropped_tgt


def _data_key(config: ml_collections.ConfigDict) -> tuple:
  d = config.data
  return (d.name, sources.tfds_data_dir(config), d.src_lang, d.tgt_lang, int(d.max_len),
          d.overlong)


_TRAINING_SETS: dict[tuple, TrainingSet] = {}


def training_set(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> TrainingSet:
  """The tokenized training split under `data.max_len` / `data.overlong`.

  Tokenized once, kept in memory (and cached in `<tokenizer dir>/cache/` when the
  tokenizer has a folder); what is dropped or truncated is counted and logged.

  Raises:
    DataError: bad `data.overlong` / `data.max_len`, or no pair left.
  """
  key = (_data_key(config), tokenizer)
  if key not in _TRAINING_SETS:
    if len(_TRAINING_SETS) >= 4:
      _TRAINING_SETS.pop(next(iter(_TRAINING_SETS)))
    _TRAINING_SETS[key] = _training_set(config, tokenizer)
  return _TRAINING_SETS[key]


def _warn_once(message: str) -> None:
  """Logs ``message`` as a warning the first time this process sees it."""
  if message not in _WARNED:
    _WARNED.add(message)
    log.warning("%s", message)


def check_data_config(config: ml_collections.ConfigDict) -> None:
  """``data.overlong``, ``data.max_len`` and ``data.vocab_size`` (checks that need no data)."""
  d = config.data
  if d.overlong not in OVERLONG_MODES:
    raise DataError(f"data.overlong={d.overlong!r}: expected one of {', '.join(OVERLONG_MODES)}")
  if int(d.max_len) < 2:
    raise DataError(f"data.max_len={d.max_len}: expected at least 2 (a token and EOS)")
  if int(d.vocab_size) <= FIRST_WORD_ID:
    raise DataError(f"data.vocab_size={d.vocab_size}: expected more than {FIRST_WORD_ID} (ids "
                    f"0-{FIRST_WORD_ID - 1} are padding, unknown, BOS and EOS)")


def _training_set(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> TrainingSet:
  check_data_config(config)
  name, max_len, overlong = config.data.name, int(config.data.max_len), config.data.overlong
  records = sources.data_source(config, "train")
  cache = _store_cache_path(config, tokenizer, sources.get_builder(config))
  store = _load_or_tokenize(config, tokenizer, records, cache)
  held_out = _held_out_in_train(config, records, cache)
  src_raw, tgt_raw = store.src_counts + 1, store.tgt_counts + 1
  src_over, tgt_over = (src_raw > max_len) & ~held_out, (tgt_raw > max_len) & ~held_out
  over = src_over | tgt_over
  if overlong == "drop":
    kept = np.flatnonzero(~over & ~held_out)
    src_lens, tgt_lens = src_raw[kept], tgt_raw[kept]
    dropped_src, dropped_tgt, truncated = int(src_over.sum()), int((tgt_over & ~src_over).sum()), 0
  else:
    kept = np.flatnonzero(~held_out)
    src_lens, tgt_lens = np.minimum(src_raw, max_len)[kept], np.minimum(tgt_raw, max_len)[kept]
    dropped_src = dropped_tgt = 0
    truncated = int(over.sum())
  if held_out.any():
    _warn_once(f"{name} train: left out {int(held_out.sum())} of {len(store)} pairs whose "
               "source sentence is also a validation or test source")
  if dropped_src + dropped_tgt:
    _warn_once(f"{name} train: dropped {dropped_src + dropped_tgt} of {len(store)} pairs longer "
               f"than data.max_len={max_len} tokens ({dropped_src} by the source side, "
               f"{dropped_tgt} by the target side only)")
  if truncated:
    _warn_once(f"{name} train: truncated {truncated} of {len(store)} pairs to "
               f"data.max_len={max_len} tokens")
  if len(kept) == 0:
    raise DataError(f"{name} train: all {len(store)} pairs are longer than "
                    f"data.max_len={max_len}; raise data.max_len or set data.overlong=truncate")
  return TrainingSet(examples=grain.MapDataset.source(_Examples(store, max_len)), kept=kept,
                     src_lens=src_lens, tgt_lens=tgt_lens, num_pairs=len(store),
                     dropped_src=dropped_src, dropped_tgt=dropped_tgt, truncated=truncated,
                     max_len=max_len, held_out=int(held_out.sum()))


def _held_out_in_train(config: ml_collections.ConfigDict, records: Sequence[Any],
                       store_path: epath.Path | None) -> np.ndarray:
  """:func:`sources.train_sources_held_out`, cached beside the token store."""
  path = store_path and store_path.with_name(store_path.stem + "-held-out.npz")
  return _cached_arrays(path, lambda: {"mask": sources.train_sources_held_out(config, records)},
                        lambda saved: len(saved["mask"]) == len(records))["mask"]


# ----------------------------------------------------------------------------- batches


def pad_batch(examples: Sequence[dict[str, np.ndarray] | None], rows: int, src_len: int,
              tgt_len: int) -> Batch:
  """Stacks examples into a [rows, src_len] / [rows, tgt_len] batch, zero-padded
  (a None example leaves its row empty)."""
  batch = {"src": np.zeros((rows, src_len), np.int32),
           "tgt_in": np.zeros((rows, tgt_len), np.int32),
           "tgt_out": np.zeros((rows, tgt_len), np.int32)}
  for r, ex in enumerate(examples):
    if ex is None:
      continue
    for key, array in batch.items():
      array[r, :len(ex[key])] = ex[key]
  return batch


class _BatchPlanIterator(grain.DatasetIterator):
  """Yields (bucket, stored pair index of each of this process's rows, -1 for an empty
  row); see `_BatchPlan`."""

  def __init__(self, plan: "_BatchPlan"):
    super().__init__()
    self._plan = plan
    self._epoch, self._batch, self._carry = 0, 0, [[] for _ in plan.buckets]
    self._batches: list[tuple[int, list[int]]] | None = None
    self._carry_out: list[list[int]] = []

  def _epoch_plan(self) -> list[tuple[int, list[int]]]:
    if self._batches is None:
      plan = self._plan
      order = np.random.default_rng([plan.seed, self._epoch]).permutation(len(plan.bucket_of))
      last = plan.num_epochs is not None and self._epoch == plan.num_epochs - 1
      self._batches, self._carry_out = bucketing.plan_epoch(
          order, plan.bucket_of, [b.rows for b in plan.buckets], self._carry, flush=last)
    return self._batches

  def __next__(self) -> tuple[int, list[int]]:
    plan = self._plan
    while True:
      if plan.num_epochs is not None and self._epoch >= plan.num_epochs:
        raise StopIteration
      batches = self._epoch_plan()
      if self._batch < len(batches):
        break
      self._epoch, self._batch, self._carry = self._epoch + 1, 0, self._carry_out
      self._batches = None
    k, ids = batches[self._batch]
    self._batch += 1
    # a part-filled batch (the last of a finite run) has empty rows at its end
    return k, [int(plan.kept[ids[r]]) if r < len(ids) else -1
               for r in plan.rows.indices(plan.buckets[k].rows)]

  def get_state(self) -> dict[str, Any]:
    return {"epoch": self._epoch, "batch": self._batch,
            "carry": [list(map(int, c)) for c in self._carry]}

  def set_state(self, state: dict[str, Any]) -> None:
    self._epoch, self._batch = int(state["epoch"]), int(state["batch"])
    self._carry = [list(map(int, c)) for c in state["carry"]]
    self._batches = None


class _BatchPlan(grain.IterDataset):
  """Global batch plan of bucketed (or pad-to-max) batching; each process takes its rows.

  Every process plans the same global batches (same seed, same lengths), so the
  processes' batches have the same shape at every step; a process takes the rows
  `rows.indices(bucket rows)` of each global batch.
  """

  def __init__(self, kept: np.ndarray, bucket_of: np.ndarray, buckets: list[bucketing.Bucket],
               *, seed: int, num_epochs: int | None, rows: RowShare):
    super().__init__()
    self.kept, self.bucket_of, self.buckets = kept, bucket_of, buckets
    self.seed, self.num_epochs, self.rows = int(seed), num_epochs, rows

  def __iter__(self) -> _BatchPlanIterator:
    return _BatchPlanIterator(self)


class _Assemble(grain.transforms.Map):
  """(bucket, stored indices) -> this process's padded batch of that bucket's shape."""

  def __init__(self, examples: grain.MapDataset, buckets: list[bucketing.Bucket]):
    self._examples, self._buckets = examples, buckets

  def map(self, item: tuple[int, list[int]]) -> Batch:
    k, indices = item
    bucket = self._buckets[k]
    return pad_batch([self._examples[i] if i >= 0 else None for i in indices], len(indices),
                     bucket.src_len, bucket.tgt_len)


class _FinishPacked(grain.transforms.Map):
  """Grain packer output -> our packed batch keys, padded with empty rows to `rows`."""

  def __init__(self, rows: int):
    self._rows = rows

  def map(self, packed: dict[str, np.ndarray]) -> Batch:
    names = {"src": "src", "tgt_in": "tgt_in", "tgt_out": "tgt_out",
             "src_segment_ids": "src_segments", "src_positions": "src_positions",
             "tgt_in_segment_ids": "tgt_segments", "tgt_in_positions": "tgt_positions"}
    out = {}
    for theirs, ours in names.items():
      array = np.asarray(packed[theirs], np.int32)
      if array.shape[0] < self._rows:
        array = np.concatenate(
            [array, np.zeros((self._rows - array.shape[0],) + array.shape[1:], np.int32)])
      out[ours] = array
    return out


def pack_lengths(data: TrainingSet, pack_len: int) -> tuple[int, int]:
  """Packed row lengths (S, T): the shorter side `max(pack_len, max_len)`, the other
  scaled by the training token ratio, so that both sides fill alike."""
  base = max(int(pack_len), data.max_len)
  ratio = float(data.tgt_lens.sum()) / float(data.src_lens.sum())
  if ratio >= 1:
    return base, int(math.ceil(base * ratio))
  return int(math.ceil(base / ratio)), base


def _row_multiple(rows: RowShare, batch_multiple: int) -> int:
  """Rows of a global batch are a multiple of this: `batch_multiple` per batch shard."""
  if batch_multiple < 1:
    raise DataError(f"batch_multiple={batch_multiple} must be at least 1")
  return rows.num_shards * batch_multiple


def batch_buckets(config: ml_collections.ConfigDict, data: TrainingSet, *,
                  row_multiple: int = 1) -> tuple[list[bucketing.Bucket], np.ndarray]:
  """Global buckets for `data.batching` "bucket" or "pad" (rows a multiple of
  `row_multiple`), and each kept pair's bucket."""
  mode = config.data.batching
  if mode == "bucket":
    num = int(config.data.num_buckets)
    if num < 1:
      raise DataError(f"data.num_buckets={num}: expected at least 1")
    try:
      boundaries = bucketing.optimal_boundaries(data.src_lens, data.tgt_lens, num,
                                                int(config.data.length_multiple))
    except ValueError as e:
      raise DataError(str(e)) from None
  elif mode == "pad":
    boundaries = [(data.max_len, data.max_len)]
  else:
    raise DataError(f"data.batching={mode!r} has no buckets (expected 'bucket' or 'pad')")
  try:
    buckets = bucketing.make_buckets(boundaries, int(config.batch_tokens), row_multiple)
  except ValueError as e:
    raise DataError(str(e)) from None
  return buckets, bucketing.assign(data.src_lens, data.tgt_lens, boundaries)


def train_iterator(config: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                   rows: RowShare = RowShare(), batch_multiple: int = 1,
                   num_epochs: int | None = None) -> grain.DatasetIterator:
  """This process's stream of training batches (see the module docstring for keys).

  `rows` says which rows of every global batch this process loads (default: all;
  a partitioner's `rows` on several processes). Endless by default (epoch after
  epoch, reshuffled with `config.seed` and the epoch number); `num_epochs` makes
  it finite, the last batches then part-filled and padded with empty rows. Each
  batch shard gets a multiple of `batch_multiple` rows (a global batch a multiple
  of `rows.num_shards * batch_multiple`); for "bucket"/"pad" all processes get
  batches of the same shape at each step, and processes of the same rows the
  same batches.

  Checkpointing: `get_state()` is a JSON-serialisable dict and `set_state(state)`
  resumes at exactly the next batch. With Orbax, save the iterator as an item
  `grain.checkpoint.CheckpointSave(iterator)` and restore it with
  `grain.checkpoint.CheckpointRestore(iterator)` (handler
  `grain.checkpoint.CheckpointHandler`, one JSON file per process).

  Raises:
    DataError: unknown `data.batching`, a budget too small, or no usable pair.
  """
  mode = config.data.batching
  if mode not in BATCHING_MODES:
    raise DataError(f"data.batching={mode!r}: expected one of {', '.join(BATCHING_MODES)}")
  data = training_set(config, tokenizer)
  seed = int(config.seed)
  if mode == "pack":
    return _packed_iterator(config, data, seed=seed, rows=rows, batch_multiple=batch_multiple,
                            num_epochs=num_epochs)
  buckets, bucket_of = batch_buckets(config, data,
                                     row_multiple=_row_multiple(rows, batch_multiple))
  plan = _BatchPlan(data.kept, bucket_of, buckets, seed=seed, num_epochs=num_epochs, rows=rows)
  return iter(plan.map(_Assemble(data.examples, buckets)))


def train_shapes(config: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                 rows: RowShare = RowShare(), batch_multiple: int = 1
                 ) -> list[bucketing.Bucket]:
  """The distinct global batch shapes of `train_iterator` (what the train step compiles for);
  rows are global (every process's rows together)."""
  data = training_set(config, tokenizer)
  if config.data.batching == "pack":
    local, src_len, tgt_len = packed_rows(config, data, rows=rows,
                                          batch_multiple=batch_multiple)
    return [bucketing.Bucket(rows.global_rows(local), src_len, tgt_len)]
  buckets, _ = batch_buckets(config, data, row_multiple=_row_multiple(rows, batch_multiple))
  return buckets


def packed_rows(config: ml_collections.ConfigDict, data: TrainingSet, *,
                rows: RowShare = RowShare(), batch_multiple: int = 1) -> tuple[int, int, int]:
  """(rows per process, S, T) of packed batches: each of the `rows.groups` groups of
  processes packs its own pairs into its share of `batch_tokens`."""
  src_len, tgt_len = pack_lengths(data, int(config.data.pack_len))
  multiple = _row_multiple(rows, batch_multiple) // rows.groups
  budget = int(config.batch_tokens) // rows.groups
  local = budget // max(src_len, tgt_len) // multiple * multiple
  if local == 0:
    raise DataError(f"batch_tokens={config.batch_tokens} over {rows.groups} group(s) of "
                    f"processes cannot hold {multiple} packed row(s) of "
                    f"{max(src_len, tgt_len)} tokens; raise batch_tokens or lower "
                    "data.pack_len / data.max_len")
  return local, src_len, tgt_len


def _packed_iterator(config: ml_collections.ConfigDict, data: TrainingSet, *, seed: int,
                     rows: RowShare, batch_multiple: int,
                     num_epochs: int | None) -> grain.DatasetIterator:
  local, src_len, tgt_len = packed_rows(config, data, rows=rows, batch_multiple=batch_multiple)
  ds = grain.MapDataset.source(data.kept)[rows.group::rows.groups]
  ds = ds.shuffle(seed=seed).repeat(num_epochs).map(lambda i: data.examples[int(i)])
  packed = grain.experimental.FirstFitPackIterDataset(
      ds.to_iter_dataset(grain.ReadOptions(num_threads=0)),
      length_struct={"src": src_len, "tgt_in": tgt_len, "tgt_out": tgt_len},
      num_packing_bins=local, seed=seed, shuffle_bins=True)
  return iter(packed.batch(local, drop_remainder=False).map(_FinishPacked(local)))


# ----------------------------------------------------------------------------- evaluation


def _src_len_slice(n: int, edges: Sequence[int]) -> str:
  low = 1
  for edge in edges:
    if n <= edge:
      return f"src_len:{low}-{edge}"
    low = edge + 1
  return f"src_len:{low}+"


def _ratio_slice(ratio: float) -> str:
  if ratio < 0.8:
    return "ratio:<0.8"
  if ratio <= 1.25:
    return "ratio:0.8-1.25"
  return "ratio:>1.25"


def _eval_example(tokenizer: Tokenizer, src_text: str, ref_text: str, edges: Sequence[int],
                  extra: Sequence[str] = ()) -> dict[str, Any]:
  src, tgt = tokenizer.encode_src(src_text), tokenizer.encode_tgt(ref_text)
  ratio = len(tgt) / max(len(src), 1)
  return {"src_text": src_text, "ref_text": ref_text,
          "src_ids": src + [EOS_ID], "tgt_ids": tgt + [EOS_ID],
          "src_len": len(src), "ratio": ratio,
          "slices": [*extra, _src_len_slice(len(src), edges), _ratio_slice(ratio)]}


def eval_examples(config: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str, *,
                  long_stress: bool = False) -> list[dict[str, Any]]:
  """Evaluation examples of `split` with their length slices.

  Each is a dict: `src_text`, `ref_text`; `src_ids` (source tokens + EOS, the
  encoder input) and `tgt_ids` (reference tokens + EOS); `src_len` (source tokens,
  EOS not counted); `ratio` (reference tokens / source tokens); `slices`, e.g.
  ["src_len:11-20", "ratio:0.8-1.25"] with edges `data.eval_src_len_edges`.

  The first `data.eval_max_examples` pairs of the split (all if 0). With
  `long_stress=True` instead: the "long" stress set, made by joining consecutive
  pairs of the split until the source exceeds `data.max_len` tokens (the longest
  any training pair may be), `data.eval_long_examples` of them; their slices
  start with "long".
  """
  pairs = sources.load_pairs(config, split)
  edges = tuple(config.data.eval_src_len_edges)
  if not long_stress:
    limit = int(config.data.eval_max_examples)
    chosen = pairs[:limit] if limit > 0 else pairs
    return [_eval_example(tokenizer, s, t, edges) for s, t in chosen]
  wanted = int(config.data.eval_long_examples)
  max_len = int(config.data.max_len)
  src_counts = [len(ids) for ids in tokenizer.encode_src_batch([s for s, _ in pairs])]
  out, start = [], 0
  while len(out) < wanted and start < len(pairs):
    end, total = start, 0
    while end < len(pairs) and total + 1 <= max_len:
      total += src_counts[end]
      end += 1
    src_text = " ".join(s for s, _ in pairs[start:end])
    while len(tokenizer.encode_src(src_text)) + 1 <= max_len and end < len(pairs):
      end += 1
      src_text = " ".join(s for s, _ in pairs[start:end])
    if len(tokenizer.encode_src(src_text)) + 1 <= max_len:
      break
    ref_text = " ".join(t for _, t in pairs[start:end])
    out.append(_eval_example(tokenizer, src_text, ref_text, edges, extra=("long",)))
    start = end
  if not out:
    raise DataError(f"{config.data.name} {split}: its {len(pairs)} pairs together are not "
                    f"longer than data.max_len={max_len} tokens; no long stress example")
  return out


def eval_batches(examples: Sequence[dict[str, Any]], batch_tokens: int, batch_multiple: int = 1,
                 *, num_shapes: int = EVAL_SHAPES, length_multiple: int = 1
                 ) -> list[tuple[Batch, list[int]]]:
  """Padded batches covering every example exactly once, with their example indices.

  Lengths are bucketed like training batches (`bucketing.optimal_boundaries` over
  these examples, lengths rounded up to `length_multiple`), so there are at most
  `num_shapes` (S, T) shapes; rows =
  batch_tokens // max(S, T) rounded down to a multiple of `batch_multiple` (at
  least `batch_multiple`); empty rows pad the last batch of a shape. Batches come
  in order of shape, examples in their given order.
  """
  if not examples:
    return []
  src_lens = np.asarray([len(ex["src_ids"]) for ex in examples])
  tgt_lens = np.asarray([len(ex["tgt_ids"]) for ex in examples])
  boundaries = bucketing.optimal_boundaries(src_lens, tgt_lens, num_shapes, length_multiple)
  bucket_of = bucketing.assign(src_lens, tgt_lens, boundaries)
  out = []
  for k, (src_len, tgt_len) in enumerate(boundaries):
    indices = np.flatnonzero(bucket_of == k).tolist()
    rows = max(batch_multiple, batch_tokens // max(src_len, tgt_len)
               // batch_multiple * batch_multiple)
    for start in range(0, len(indices), rows):
      chunk = indices[start:start + rows]
      rows_examples = [{"src": np.asarray(examples[i]["src_ids"], np.int32),
                        "tgt_in": np.asarray([BOS_ID] + list(examples[i]["tgt_ids"][:-1]),
                                             np.int32),
                        "tgt_out": np.asarray(examples[i]["tgt_ids"], np.int32)}
                       for i in chunk]
      out.append((pad_batch(rows_examples, rows, src_len, tgt_len), chunk))
  return out


# ----------------------------------------------------------------------------- measures


def batch_efficiency(batches: Sequence[Batch]) -> dict[str, Any]:
  """Real tokens / padded slots per side over `batches`, and their distinct shapes."""
  real_src = sum(int((b["src"] != PAD_ID).sum()) for b in batches)
  real_tgt = sum(int((b["tgt_out"] != PAD_ID).sum()) for b in batches)
  slots_src = sum(b["src"].size for b in batches)
  slots_tgt = sum(b["tgt_out"].size for b in batches)
  shapes = sorted({(b["src"].shape[0], b["src"].shape[1], b["tgt_out"].shape[1])
                   for b in batches})
  return {"src_efficiency": real_src / max(slots_src, 1),
          "tgt_efficiency": real_tgt / max(slots_tgt, 1),
          "shapes": len(shapes), "shape_list": [list(s) for s in shapes],
          "batches": len(batches)}

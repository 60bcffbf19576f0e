"""Length buckets with a bounded set of batch shapes, chosen from the length histogram.

A bucket is a padded shape (src_len S, tgt_len T); a pair (s, t) goes to the
cheapest bucket with S >= s and T >= t, and costs S + T padded slots. With at
most K buckets the padded slots are minimised exactly over nested bucket sets
(S_1 <= … <= S_K and T_1 <= … <= T_K, the last one holding the longest pair)
by dynamic programming over the 2-D histogram of (s, t):

    f_1(a, b) = N(a, b) (a + b)
    f_k(a, b) = min(f_{k-1}(a, b),
                    min_{a' <= a, b' <= b} f_{k-1}(a', b') + (N(a, b) - N(a', b')) (a + b))

where N(a, b) counts the pairs with s <= a and t <= b. Each bucket's batch has
`rows = batch_tokens // max(S, T)` rows (rounded down to a multiple), so a
bucket is one (rows, S, T) program shape for jit.

Batches are planned per epoch from a seeded permutation: pairs fill their
bucket in permutation order and a batch is emitted when its bucket is full.
What is left in the buckets at the end of an epoch is carried into the next one
(an endless stream) or emitted as part-filled batches padded with empty rows
(the last epoch of a finite stream).
"""
from __future__ import annotations

import dataclasses

import numpy as np

MAX_CANDIDATES = 96       # boundary candidates per side (all distinct lengths if fewer)
_CHUNK = 256              # target states per vectorised DP step


@dataclasses.dataclass(frozen=True)
class Bucket:
  """A padded batch shape: `rows` pairs of at most `src_len` / `tgt_len` tokens."""
  rows: int
  src_len: int
  tgt_len: int


def _candidates(lengths: np.ndarray) -> np.ndarray:
  """Sorted candidate boundaries: every distinct length, or quantiles if too many."""
  values = np.unique(lengths)
  if len(values) <= MAX_CANDIDATES:
    return values
  quantiles = np.quantile(lengths, np.linspace(0, 1, MAX_CANDIDATES), method="higher")
  return np.unique(np.append(quantiles.astype(values.dtype), values[-1]))


def round_up(lengths, multiple: int):
  """`lengths` (an int or an array) rounded up to a multiple of `multiple` (>= 1)."""
  multiple = int(multiple)
  if multiple < 1:
    raise ValueError(f"data.length_multiple={multiple}: expected at least 1")
  return -(-lengths // multiple) * multiple


def optimal_boundaries(src_lens: np.ndarray, tgt_lens: np.ndarray, num_buckets: int,
                       length_multiple: int = 1) -> list[tuple[int, int]]:
  """At most `num_buckets` nested (S, T) buckets minimising the padded slots.

  Args:
    src_lens, tgt_lens: [N] padded-side lengths of every pair (EOS/BOS included).
    num_buckets: the most buckets (distinct shapes) allowed, >= 1.
    length_multiple: every S and T is a multiple of this (the best such set).

  Returns:
    (S, T) boundaries sorted ascending; the last holds the longest pair (max src_len,
    max tgt_len, rounded up to `length_multiple`).
  """
  src_lens, tgt_lens = np.asarray(src_lens), np.asarray(tgt_lens)
  if len(src_lens) == 0:
    raise ValueError("no lengths to bucket")
  src_lens, tgt_lens = round_up(src_lens, length_multiple), round_up(tgt_lens, length_multiple)
  a_values, b_values = _candidates(src_lens), _candidates(tgt_lens)
  # Counts of pairs whose smallest candidate boundary is (i, j), then cumulated.
  i_of = np.searchsorted(a_values, src_lens)
  j_of = np.searchsorted(b_values, tgt_lens)
  counts = np.zeros((len(a_values), len(b_values)), np.float64)
  np.add.at(counts, (i_of, j_of), 1)
  covered = counts.cumsum(0).cumsum(1).ravel()                     # N(a, b)
  grid_a, grid_b = np.meshgrid(a_values, b_values, indexing="ij")
  grid_a, grid_b = grid_a.ravel(), grid_b.ravel()
  cost_per_pair = (grid_a + grid_b).astype(np.float64)             # a + b
  f = covered * cost_per_pair
  back = []
  for _ in range(1, max(1, int(num_buckets))):
    new_f, arg = f.copy(), np.arange(len(f))
    for start in range(0, len(f), _CHUNK):
      targets = slice(start, start + _CHUNK)
      dominated = ((grid_a[None, :] <= grid_a[targets, None])
                   & (grid_b[None, :] <= grid_b[targets, None]))
      values = np.where(dominated, f[None, :] - covered[None, :] * cost_per_pair[targets, None],
                        np.inf)
      best = values.argmin(axis=1)
      total = values[np.arange(len(best)), best] + covered[targets] * cost_per_pair[targets]
      better = total < new_f[targets] - 1e-9
      new_f[targets] = np.where(better, total, new_f[targets])
      arg[targets] = np.where(better, best, arg[targets])
    back.append(arg)
    f = new_f
  state = len(f) - 1                                               # (max a, max b)
  chain = [state]
  for arg in reversed(back):
    state = int(arg[state])
    chain.append(state)
  chosen = sorted({(int(grid_a[s]), int(grid_b[s])) for s in chain})
  return chosen


def assign(src_lens: np.ndarray, tgt_lens: np.ndarray, boundaries: list[tuple[int, int]]
           ) -> np.ndarray:
  """[N] index of the cheapest bucket holding each pair (boundaries sorted ascending).

  Raises:
    ValueError: a pair longer than every bucket.
  """
  src_lens, tgt_lens = np.asarray(src_lens), np.asarray(tgt_lens)
  bucket = np.full(len(src_lens), -1, np.int64)
  best_cost = np.full(len(src_lens), np.inf)
  for k, (s, t) in enumerate(boundaries):
    fits = (src_lens <= s) & (tgt_lens <= t) & (s + t < best_cost)
    bucket[fits], best_cost[fits] = k, s + t
  if (bucket < 0).any():
    i = int(np.argmax(bucket < 0))
    raise ValueError(f"pair of lengths ({src_lens[i]}, {tgt_lens[i]}) fits no bucket")
  return bucket


def make_buckets(boundaries: list[tuple[int, int]], batch_tokens: int, row_multiple: int
                 ) -> list[Bucket]:
  """Buckets whose rows * max(S, T) <= batch_tokens, rows a multiple of `row_multiple`.

  Raises:
    ValueError: `batch_tokens` too small for even `row_multiple` rows of a bucket.
  """
  buckets = []
  for s, t in boundaries:
    rows = int(batch_tokens) // max(s, t) // row_multiple * row_multiple
    if rows == 0:
      raise ValueError(f"batch_tokens={batch_tokens} cannot hold {row_multiple} row(s) of "
                       f"{max(s, t)} tokens; raise batch_tokens or lower data.max_len")
    buckets.append(Bucket(rows, int(s), int(t)))
  return buckets


def padded_slots(src_lens: np.ndarray, tgt_lens: np.ndarray,
                 boundaries: list[tuple[int, int]]) -> tuple[float, float]:
  """(src, tgt) efficiency of the bucket assignment alone, ignoring part-filled batches."""
  k = assign(src_lens, tgt_lens, boundaries)
  shapes = np.asarray(boundaries)
  return (float(np.sum(src_lens) / np.sum(shapes[k, 0])),
          float(np.sum(tgt_lens) / np.sum(shapes[k, 1])))


def efficiency_bound(lengths: np.ndarray, num_values: int) -> float:
  """Best efficiency of one side padded to at most `num_values` distinct lengths.

  Any set of `num_values` (S, T) shapes has at most that many distinct S, so this
  bounds the source (or target) efficiency of every such bucketing from above.
  """
  lengths = np.asarray(lengths)
  values, counts = np.unique(lengths, return_counts=True)
  below = np.concatenate([[0], np.cumsum(counts)])                 # pairs with length < v_i
  n = len(values)
  # g[i] = least slots covering values[:i+1] with the last boundary at values[i]
  g = below[1:] * values.astype(np.float64)
  for _ in range(1, max(1, int(num_values))):
    new = g.copy()
    for i in range(1, n):
      prev = g[:i] + (below[i + 1] - below[1:i + 1]) * float(values[i])
      new[i] = min(g[i], prev.min())
    g = new
  return float(lengths.sum() / g[-1])


def plan_epoch(order: np.ndarray, bucket_of: np.ndarray, rows: list[int],
               carry: list[list[int]], flush: bool
               ) -> tuple[list[tuple[int, list[int]]], list[list[int]]]:
  """Batches of one epoch in emission order, and what is left in each bucket.

  Args:
    order: [N] the epoch's permutation of pair ids.
    bucket_of: [N] bucket of each pair id.
    rows: rows of a full batch, per bucket.
    carry: pair ids left in each bucket by the previous epoch (emitted first).
    flush: emit part-filled batches at the end instead of carrying them.

  Returns:
    [(bucket, pair ids)] and the leftovers per bucket (empty lists when flushing).
  """
  order = np.asarray(order)
  of_order = bucket_of[order]
  events: list[tuple[int, int, list[int]]] = []
  leftovers: list[list[int]] = []
  for k, size in enumerate(rows):
    positions = np.flatnonzero(of_order == k)
    held = list(carry[k]) if k < len(carry) else []
    ids = np.concatenate([np.asarray(held, np.int64), order[positions]])
    times = np.concatenate([np.full(len(held), -1, np.int64), positions])
    full = len(ids) // size
    for q in range(full):
      events.append((int(times[(q + 1) * size - 1]), k, ids[q * size:(q + 1) * size].tolist()))
    rest = ids[full * size:].tolist()
    if flush and rest:
      events.append((len(order) + k, k, rest))
      rest = []
    leftovers.append(rest)
  events.sort(key=lambda e: e[0])
  return [(k, ids) for _, k, ids in events], leftovers

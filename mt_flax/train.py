"""Training: the loop over small helpers, and what a run writes into its workdir.

:func:`train_and_evaluate` trains (or resumes) the run in a workdir. Resuming
restores the latest good checkpoint (params, optimizer state, step, RNG and
data-iterator state), so per-step losses continue exactly as if uninterrupted, also
on other processes and devices that cut the global batches alike (:func:`write_run_info`);
on a finished run it returns at once. SIGTERM or a first Ctrl-C saves a
checkpoint and stops between steps (on several processes, at the next sync point:
every ``sync_every_steps``); a second Ctrl-C ends the process without saving. A
non-finite loss stops the run (:class:`TrainingDiverged`) and keeps the last good
checkpoint; a failed save stops it (:class:`SaveFailed`) with the previous
checkpoint intact. One run per workdir (``train.lock``); a run whose lock another
run took over stops without saving (:class:`WorkdirLost`).

The workdir receives ``config.json`` (resolved config), ``run.json`` (process, device
and batch shard counts of the latest run), ``git_commit.txt``, ``train.log``,
``tokenizer/``, ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/`` and ``DONE`` once
``num_train_steps`` are reached.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from mt_flax import checkpoint, data, inference, paths, sharding, steps, workdir_lock
from mt_flax.config import with_defaults
from mt_flax.errors import ConfigError, DataError, TrainingDiverged, WorkdirLost
from mt_flax.metrics import MetricWriter, read_metrics
from mt_flax.model import Transformer, TransformerConfig, count_params
from mt_flax.paths import CONFIG_FILE, DONE_FILE, GIT_FILE, RUN_FILE

PREEMPTED_EXIT = 143   # 128 + SIGTERM
INTERRUPTED_EXIT = 130  # 128 + SIGINT
# Train steps queued on the devices at most: the host waits for the step this many before
# the one it just queued (no stall: the device still has the later ones to run). Unbounded,
# the host queues a whole log period ahead; on the CPU client a device then reaches its cap
# of computations in flight while the others wait for it in a collective, and the run hangs.
STEPS_IN_FLIGHT = 2
BATCH_KEYS = ("src", "tgt_in", "tgt_out") + steps.MODEL_INPUTS

# Config keys and sections the resumed run must share with the run that made the workdir
# (the model, and everything that decides which examples make up each step's batch) ...
FIXED_ON_RESUME = ("model", "data", "seed", "batch_tokens", "grad_accum_steps", "mesh",
                   "parallelism")
# ... except where the data lives, which may move (e.g. to gs://), and how far ahead
# batches are built (the same batches either way).
MOVABLE = ("data.manual_dir", "data.tfds_data_dir", "data.prefetch")


# ----------------------------------------------------------------------------- config


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks the training keys' values (every key exists: see :func:`config.with_defaults`),
  the model's shape, the mesh against the devices and the data limits, all before anything
  is written; returns a complete copy."""
  config = with_defaults(config)
  checks = [
      (config.parallelism in ("jit", "pmap"), "parallelism", "'jit' or 'pmap'"),
      (config.schedule in ("rsqrt", "cosine"), "schedule", "'rsqrt' or 'cosine'"),
      (config.best_mode in ("min", "max"), "best_mode", "'min' or 'max'"),
      (int(config.num_train_steps) > 0, "num_train_steps", "a positive integer"),
      (int(config.eval_every_steps) > 0, "eval_every_steps", "a positive integer"),
      (int(config.checkpoint_every_steps) > 0, "checkpoint_every_steps", "a positive integer"),
      (int(config.log_every_steps) > 0, "log_every_steps", "a positive integer"),
      (int(config.sync_every_steps) > 0, "sync_every_steps", "a positive integer"),
      (int(config.grad_accum_steps) >= 1, "grad_accum_steps", "an integer >= 1"),
      (int(config.batch_tokens) > 0, "batch_tokens", "a positive integer"),
      (int(config.data.prefetch) >= 0, "data.prefetch", "0 (off) or a positive integer"),
      (0.0 <= float(config.label_smoothing) < 1.0, "label_smoothing", "a number in [0, 1)"),
      (float(config.learning_rate) > 0, "learning_rate", "a positive number"),
  ]
  for ok, key, expected in checks:
    if not ok:
      raise ConfigError(f"{key}={config[key]!r}: expected {expected}")
  _check_param_dtype(config)
  data.pipeline.check_data_config(config)
  vocab = int(config.data.vocab_size)
  try:
    TransformerConfig.from_config(config.model, vocab, vocab)
    if config.parallelism == "jit":
      sharding.maybe_initialize_distributed()      # before the first look at the devices
      sharding.mesh_shape(config.mesh, jax.device_count())
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return config


def _check_param_dtype(config: ml_collections.ConfigDict) -> None:
  """AdamW keeps its moments in the parameters' dtype; in bfloat16 both lose the small updates."""
  name = config.model.param_dtype
  try:
    narrow = jnp.finfo(name).bits < 32
  except (TypeError, ValueError):   # not a float dtype: TransformerConfig names the problem
    return
  if narrow and not config.allow_low_precision_params:
    raise ConfigError(
        f"model.param_dtype={name!r} trains {name} parameters and AdamW moments, which round "
        "small updates away; expected 'float32' (model.dtype='bfloat16' already computes in "
        "bfloat16), or set allow_low_precision_params=True to train them anyway")


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += _differences(a.get(k, "<unset>"), b.get(k, "<unset>"), f"{prefix}{k}.")
    return out
  return [] if a == b else [f"{prefix[:-1]}: {b!r} -> {a!r}"]


def _run_layout(config: ml_collections.ConfigDict) -> dict:
  """Processes, devices and batch shards of this run. The batch shards (the mesh's data x
  fsdp ways; every device under pmap) cut the rows of every global batch, so they and the
  config decide the global batches, whichever processes load them."""
  count = jax.device_count()
  shards = count if config.parallelism == "pmap" else sharding.batch_shards(config.mesh, count)
  return {"process_count": jax.process_count(), "device_count": count, "batch_shards": shards}


def write_run_info(workdir: str, config: ml_collections.ConfigDict, write: bool = True) -> None:
  """Writes ``config.json``, ``run.json`` (this run's layout) and ``git_commit.txt``; refuses
  a workdir made with other settings (one line naming each changed key with its old and new
  value). With ``write=False`` it only checks.

  A run resumes on other processes and devices while its batch shards, hence its global
  batches, stay the same (:func:`_run_layout`); packed batches (a state per process group)
  and a ``run.json`` saved without batch shards keep every recorded count.
  """
  path = paths.as_path(workdir) / CONFIG_FILE
  run_path = paths.as_path(workdir) / RUN_FILE
  new = json.loads(json.dumps(config.to_dict()))
  layout = _run_layout(config)
  if path.exists():
    old = json.loads(path.read_text())
    diffs = [d for k in FIXED_ON_RESUME
             for d in _differences(new.get(k, "<unset>"), old.get(k, "<unset>"), k + ".")
             if d.split(":")[0] not in MOVABLE]
    if run_path.exists():
      saved = json.loads(run_path.read_text())
      keys = (["batch_shards"] if "batch_shards" in saved and config.data.batching != "pack"
              else list(saved))
      diffs += _differences({k: layout.get(k, "<unset>") for k in keys},
                            {k: saved[k] for k in keys})
    if diffs:
      hint = ("; a run moves to other processes or devices only with as many batch_shards "
              "(the mesh's data x fsdp ways, or the devices under pmap) and data.batching "
              "other than 'pack'"
              if any(d.split(":")[0] in layout for d in diffs) else "")
      raise ConfigError(f"workdir {workdir!r} holds a run with different settings "
                        f"({'; '.join(diffs[:4])}); use a new --workdir or the same "
                        f"settings{hint}")
  if write and sharding.is_primary():   # atomic: the other processes may be reading them
    path.parent.mkdir(parents=True, exist_ok=True)
    paths.write_text(path, json.dumps(new, indent=2, sort_keys=True) + "\n")
    paths.write_text(run_path, json.dumps(layout, sort_keys=True) + "\n")
    (paths.as_path(workdir) / GIT_FILE).write_text(paths.source_commit() + "\n")


# ----------------------------------------------------------------------------- helpers


class _Preemption:
  """Records SIGTERM or a first SIGINT so the loop can checkpoint and stop between steps.

  A second SIGINT ends the process at once (status 130) without saving.
  """
  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested: Optional[str] = None    # name of the signal received
    self._previous: dict = {}

  def __enter__(self):
    try:
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    except ValueError:   # not the main thread: no handler
      self._previous = {}
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.requested == "SIGINT":
      print("mt_flax train: interrupted again: stopped at once without saving (re-run the same "
            "command to resume from the last checkpoint)", file=sys.stderr, flush=True)
      os._exit(INTERRUPTED_EXIT)
    self.requested = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)


def _host_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: np.asarray(batch[k], np.int32) for k in BATCH_KEYS if k in batch}


def _batch_placer(partitioner, allowed: frozenset = frozenset(), on_thread: bool = True
                  ) -> tuple[Callable[[dict], tuple], Callable[[tuple], tuple]]:
  """``(place, finish)`` of the input thread (:class:`data.Prefetcher`): pipeline batch ->
  (the batch on the devices, its :func:`_token_stats`). ``place`` checks the batch's shape
  against the ones every process agreed on (``allowed``, :func:`_check_batch_shape`) and,
  ``on_thread``, copies this process's rows to its own devices (no collective); otherwise
  ``finish`` copies them when the step takes the batch.

  On the CPU backend the copy stays with the step, so the thread makes no JAX call: XLA's
  CPU client runs every device's program on one thread pool, which programs waiting in a
  collective can hold while the others never start.
  """
  def build(raw: dict) -> tuple[dict, tuple[int, int]]:
    batch = _host_batch(raw)
    _check_batch_shape(batch, allowed)
    return batch, _token_stats(batch)

  def to_device(item: tuple) -> tuple[dict, tuple[int, int]]:
    return partitioner.shard_batch(item[0]), item[1]

  if on_thread:
    return (lambda raw: to_device(build(raw))), (lambda item: item)
  return build, to_device


def _token_stats(batch: dict[str, np.ndarray]) -> tuple[int, int]:
  """(non-pad source+target tokens, all source+target slots) of one host batch."""
  src, tgt = batch["src"], batch["tgt_out"]
  real = int(np.count_nonzero(src)) + int(np.count_nonzero(tgt))
  return real, src.size + tgt.size


def square_eval_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Pads source and target to one length ``max(S, T)``: fewer distinct shapes to compile.

  Padding carries no weight and is masked, so the metrics do not change.
  """
  length = max(batch["src"].shape[1], batch["tgt_out"].shape[1])
  return {k: np.pad(v, [(0, 0), (0, length - v.shape[1])]) for k, v in batch.items()}


def evaluate_validation(eval_fn: Callable, params: Any, batches: Sequence[dict],
                        partitioner) -> dict[str, float]:
  """Validation metrics of ``params``: ``eval_loss``, ``eval_accuracy``, ``eval_perplexity``.

  The one place validation metrics are computed; further metrics (e.g. BLEU
  from decoding) belong in the returned dict. ``batches`` are whole batches
  (the same on every process); each process feeds the rows its devices hold
  (``partitioner.rows``).
  """
  totals = {"nll": 0.0, "correct": 0.0, "tokens": 0.0}
  outs = [eval_fn(params, partitioner.shard_batch(partitioner.rows.take(b))) for b in batches]
  for out in outs:
    for k, v in partitioner.metrics_to_host(out).items():
      totals[k] += float(v)
  return steps.eval_metrics(totals)


def log(message: str) -> None:
  if sharding.is_primary():
    tqdm.write(f"[train] {message}", file=sys.stderr)


# ----------------------------------------------------------------------------- loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the run in ``workdir``; returns a summary dict.

  Summary keys: ``step``, ``wall_s``, ``train_steps_run``, ``tokens_per_s``
  (mean over this invocation's logged intervals, compile excluded),
  ``preempted`` (False or the signal's name), and the last validation metrics.
  """
  t_start = time.time()
  config = resolve_config(config)
  sharding.maybe_initialize_distributed()
  with _locked(workdir) as lost, _Preemption() as preemption:
    summary = _train_locked(config, workdir, preemption, lost)
  summary["wall_s"] = time.time() - t_start
  return summary


@contextlib.contextmanager
def _locked(workdir: str):
  """The workdir lock, taken by process 0 (the others stop too if it is busy); yields
  ``lost() -> str``: why this process no longer holds it ("" while it does, and always on
  the other processes)."""
  with contextlib.ExitStack() as stack:
    busy, lock = None, None
    if sharding.is_primary():
      try:
        lock = stack.enter_context(workdir_lock.hold(workdir))
      except workdir_lock.WorkdirBusy as e:
        busy = e
    if sharding.any_process(busy is not None):
      raise busy or workdir_lock.WorkdirBusy(f"workdir {workdir} is in use by another run")
    yield lambda: lock.lost_reason if lock is not None and lock.lost else ""


@dataclasses.dataclass
class _Run:
  """What the loop works with, made by :func:`_train_locked`."""
  config: ml_collections.ConfigDict
  workdir: str
  partitioner: Any
  checkpoints: checkpoint.Checkpointer
  writer: MetricWriter
  train_iter: Any
  train_fn: Callable
  validate: Callable[[Any], dict]   # params -> validation metrics
  start: int
  verified: bool                    # the state trained from was initialized or verified
  lost: Callable[[], str] = lambda: ""   # why the workdir lock was lost, "" while held


def _train_locked(config: ml_collections.ConfigDict, workdir: str, preemption: "_Preemption",
                  lost: Callable[[], str] = lambda: "") -> dict:
  """:func:`train_and_evaluate` once the workdir is locked: set up, restore, loop."""
  write_run_info(workdir, config, write=False)     # config.json once the data checks passed
  tokenizer = _tokenizer(config, workdir)
  try:
    model_cfg = TransformerConfig.from_config(config.model, tokenizer.src_vocab_size,
                                              tokenizer.tgt_vocab_size)
    partitioner = sharding.make_partitioner(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  model, optimizer = Transformer(model_cfg), steps.make_optimizer(config)
  accum, seed = int(config.grad_accum_steps), int(config.seed)
  train_iter = data.train_iterator(config, tokenizer, rows=partitioner.rows,
                                   batch_multiple=accum)
  write_run_info(workdir, config)
  partitioner.setup(functools.partial(steps.init_boxed_state, model, optimizer),
                    jax.random.key(seed))
  with checkpoint.Checkpointer(workdir, config, lost) as checkpoints:
    if checkpoints.removed:
      log(f"removed the temporary folders of unfinished saves: {', '.join(checkpoints.removed)}")
    restored = checkpoints.restore(partitioner.abstract_state())
    if restored is None:
      state, start = partitioner.init_state(jax.random.key(seed)), 0
    else:
      host_state, data_state, start = restored
      state = partitioner.from_checkpoint(host_state)
      if data_state is not None:
        train_iter.set_state(data_state)
      log(f"resumed from checkpoint step {start} in {checkpoints.directory}")
    if start >= int(config.num_train_steps):
      _mark_done(workdir)
      log(f"{workdir} already trained to step {start} (num_train_steps="
          f"{config.num_train_steps}); nothing to do")
      last = [r for r in read_metrics(workdir) if r.get("split") == "validation"][-1:]
      return {"step": start, "train_steps_run": 0, "preempted": False,
              **{k: v for r in last for k, v in r.items() if k not in ("step", "split")}}
    if sharding.is_primary():
      (paths.as_path(workdir) / DONE_FILE).unlink(missing_ok=True)   # trains again (more steps)
    log(f"model: {count_params(partitioner.abstract_state().params) / 1e6:.2f}M parameters; "
        f"{partitioner.mode} over {jax.device_count()} device(s), "
        f"{jax.process_count()} process(es); steps {start} -> {config.num_train_steps}")
    shapes = data.train_shapes(config, tokenizer, rows=partitioner.rows, batch_multiple=accum)
    log(f"{len(shapes)} training batch shape(s) to compile, rows x (source, target) tokens: "
        + ", ".join(f"{b.rows} x ({b.src_len}, {b.tgt_len})" for b in shapes))
    batch_shapes = _agree_on_shapes(config, shapes, partitioner.rows)
    train_fn = partitioner.compile_train_step(steps.make_train_step(
        model, optimizer, label_smoothing=float(config.label_smoothing), grad_accum_steps=accum,
        learning_rate_fn=steps.make_schedule(config), grad_norm=bool(config.log_grad_norm),
        jit=False))
    with MetricWriter(workdir, enabled=sharding.is_primary(), resume_step=start) as writer:
      # batches built and placed on the devices by a thread, data.prefetch steps ahead
      place, finish = _batch_placer(partitioner, batch_shapes,
                                    on_thread=jax.default_backend() != "cpu")
      feed = data.Prefetcher(train_iter, place, int(config.data.prefetch), finish=finish)
      run = _Run(config, workdir, partitioner, checkpoints, writer, feed, train_fn,
                 _make_validate(config, model, tokenizer, partitioner), start,
                 verified=restored is None or checkpoints.verified(start), lost=lost)
      try:
        summary = train_loop(run, state, preemption)
      except WorkdirLost:
        writer.discard()            # metrics.jsonl and tensorboard/ are the other run's now
        raise
      finally:
        feed.close()                # no thread left, no batch left on the devices
  if not summary["preempted"]:
    _mark_done(workdir)
  return summary


def train_loop(run: _Run, state: Any, preemption: "_Preemption") -> dict:
  """Steps from ``run.start`` to ``num_train_steps``: train, log, validate, checkpoint.

  Stops early, after saving, when a signal was received on any process, and without
  saving (:class:`WorkdirLost`) when process 0 lost the workdir lock to another run.

  On several processes a step between sync points runs no host-level collective
  (each is a device program queued behind the train step, so the host would wait
  for the device every step). The batch shapes were agreed before the loop
  (:func:`_agree_on_shapes`; each batch is checked locally against them), and
  signals, the lock's state and the save in flight are agreed by one gather at the
  sync points (:func:`_interrupted`): every ``sync_every_steps`` steps on several
  processes, every step, with no collective, on one. A signal thus stops the run at
  most ``sync_every_steps - 1`` steps later.

  Not JAX's preemption service (``multihost_utils.reached_preemption_sync_point``): its
  SIGTERM handler, installed in C++ by ``jax.distributed.initialize``, is replaced by
  :class:`_Preemption`'s, which one host and Ctrl-C need; a SIGTERM before its first call
  is missed by a run resumed at a later step; and the lock's and the save's state would
  still need a gather.
  """
  c = run.config
  num_steps, step, last_eval = int(c.num_train_steps), run.start, {}
  pending, shapes, timer, last = [], set(), Throughput(), {}
  preempted = _interrupted(run, preemption, step)   # signalled while setting up
  if preempted:
    log(f"{preemption.requested or 'SIGTERM'} before the first step: nothing new to save")
  # a bar on a terminal; in a redirected log, a plain line every log_every_steps instead
  lines = c.progress_bar and not sys.stderr.isatty()
  with tqdm(total=num_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
            disable=not (sharding.is_primary() and c.progress_bar) or lines,
            mininterval=1.0) as bar:
    while step < num_steps and not preempted:
      step += 1
      batch, stats = next(run.train_iter)       # on the devices; get_state() is after it
      shape = tuple((k, v.shape) for k, v in sorted(batch.items()))
      compiles = shape not in shapes            # a step that compiles is timed on its own
      if compiles and pending:
        _write_train_metrics(run, pending, timer)
      state, metrics = run.train_fn(state, batch)
      pending.append((step, metrics, stats))
      if len(pending) > STEPS_IN_FLIGHT:          # the host stays at most this far ahead
        jax.block_until_ready(pending[-STEPS_IN_FLIGHT - 1][1])
      bar.update(1)
      if compiles:
        shapes.add(shape)
        last = _write_train_metrics(run, pending, timer, compiled=True)
      if _sync_due(step, c.sync_every_steps):
        preempted = _interrupted(run, preemption, step)
      do_eval = _due(step, c.eval_every_steps) or step == num_steps
      do_save = _due(step, c.checkpoint_every_steps) or do_eval or preempted
      if pending and (_due(step, c.log_every_steps) or do_save):
        last = _write_train_metrics(run, pending, timer)
        bar.set_postfix(loss=f"{last['loss']:.3f}", refresh=False)
      if lines and last and _due(step, c.log_every_steps):
        log(f"step {step}/{num_steps}: loss={last['loss']:.3f}")
      if do_eval:
        last_eval = run.validate(run.partitioner.params_of(state))
        run.writer.write(step, last_eval, split="validation")
        log(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in last_eval.items()))
      if do_save:
        run.writer.flush()
        run.checkpoints.save(step, run.partitioner.to_checkpoint(state),
                             run.train_iter.get_state(), dict(last_eval) if do_eval else None)
      if do_eval or do_save:
        timer.restart()                          # validation and saving are not training time
  run.checkpoints.poll(wait=True)
  signal_name = (preemption.requested or "SIGTERM") if preempted else False
  if signal_name and step > run.start:
    log(f"{signal_name}: saved checkpoint step {step}; re-run the same command to resume")
  return {"step": step, "train_steps_run": step - run.start, "preempted": signal_name,
          "tokens_per_s": timer.mean(), **last_eval}


def _sync_due(step: int, every: int) -> bool:
  """Whether ``step`` is a sync point: every step on one process (nothing to gather), every
  ``every`` steps on several (the same steps on all of them)."""
  return jax.process_count() == 1 or _due(step, every)


def _interrupted(run: _Run, preemption: "_Preemption", step: int) -> bool:
  """At a sync point: whether a signal asks any process to save and stop. One gather of the
  signal, the lock's state and the save in flight (:meth:`checkpoint.Checkpointer.status`).

  Raises WorkdirLost when process 0 lost the workdir lock (another run trains there now),
  and SaveFailed when the save in flight failed on any process.
  """
  reason = run.lost()
  preempted, lost, *saves = sharding.any_of_processes(
      [bool(preemption.requested), bool(reason), *run.checkpoints.status()])
  if lost:
    raise workdir_lock.lost_error(run.workdir, reason, f"step {step}")
  run.checkpoints.settle(*saves)
  return preempted


def _agree_on_shapes(config: ml_collections.ConfigDict, shapes: Sequence[Any],
                     rows: sharding.RowShare) -> frozenset:
  """Checks, with one gather, that every process will make the same global batch shapes;
  returns this process's ``(rows, source length, target length)`` of each.

  Every process plans the same global batches from the config and the data, so
  their local batches have the same shape at every step and no step gathers them.
  """
  text = json.dumps([config.data.batching] + [[b.rows, b.src_len, b.tgt_len] for b in shapes])
  try:
    sharding.same_on_all_processes(text, "training batch shapes (rows, source, target)")
  except ValueError as e:
    raise DataError(str(e)) from None
  return frozenset((rows.local_rows(b.rows), b.src_len, b.tgt_len) for b in shapes)


def _check_batch_shape(batch: dict[str, np.ndarray], allowed: frozenset) -> None:
  """Checks a host batch locally, with no collective, against the shapes every process
  agreed on (``allowed``; empty: no check).

  Raises:
    DataError: a batch whose shape no other process would make.
  """
  src, tgt = batch["src"].shape, batch["tgt_out"].shape
  ok = src[0] == tgt[0] and all(
      v.shape == (src if k.startswith("src") else tgt) for k, v in batch.items())
  if allowed and not (ok and (src[0], src[1], tgt[1]) in allowed):
    raise DataError(
        "a training batch of shapes "
        + ", ".join(f"{k} {v.shape}" for k, v in sorted(batch.items()))
        + " is not one of the agreed (rows, source, target) shapes "
        + ", ".join(map(str, sorted(allowed))) + "; expected every batch of the data "
        "pipeline to have one of its planned shapes")


def _due(step: int, every: int) -> bool:
  return step % int(every) == 0


class Throughput:
  """Wall time between restarts, turned into rates; intervals that compiled are left out of
  the run's mean tokens/s."""

  def __init__(self):
    self.t0, self.tokens, self.seconds = time.time(), 0.0, 0.0

  def restart(self) -> None:
    self.t0 = time.time()

  def lap(self, real: int, slots: int, steps_done: int, compiled: bool) -> dict:
    """Rates of the ``steps_done`` steps since the last restart (which this one is)."""
    now = time.time()
    elapsed, self.t0 = max(now - self.t0, 1e-9), now
    if not compiled:
      self.tokens, self.seconds = self.tokens + real, self.seconds + elapsed
    rates = {"tokens_per_s": real / elapsed, "steps_per_s": steps_done / elapsed,
             "padding_efficiency": real / max(slots, 1)}
    return {**rates, "includes_compile": True} if compiled else rates

  def mean(self) -> Optional[float]:
    return self.tokens / self.seconds if self.seconds else None


def _write_train_metrics(run: _Run, pending: list, timer: Throughput,
                         compiled: bool = False) -> dict:
  """Waits for the ``pending`` steps, writes their train lines and empties ``pending``;
  returns the last step's metrics. Raises TrainingDiverged on a non-finite loss."""
  fetched = [(s, run.partitioner.metrics_to_host(m)) for s, m, _ in pending]
  rates = timer.lap(sum(st[0] for *_, st in pending), sum(st[1] for *_, st in pending),
                    len(pending), compiled)
  pending.clear()
  for step, m in fetched:
    run.writer.write(step, {**{k: float(v) for k, v in m.items() if k != "finite"}, **rates})
    if not m["finite"]:
      run.writer.flush()
      raise TrainingDiverged(_divergence_message(run, step, m))
  return {k: float(v) for k, v in fetched[-1][1].items()}


def _divergence_message(run: _Run, step: int, metrics: dict) -> str:
  norm = f", grad_norm={float(metrics['grad_norm'])}" if "grad_norm" in metrics else ""
  stopped = (f"loss or gradients are not finite at step {step} (loss={float(metrics['loss'])}"
             f"{norm}); stopped. ")
  directory, latest = run.checkpoints.directory, run.checkpoints.latest_step()
  if not run.verified:
    return stopped + (f"This run resumed from checkpoint step {run.start} of {directory}, saved "
                      "without digests, so it could not be verified and may be damaged; move it "
                      "aside and re-run to resume from an older one")
  if latest is None:
    return stopped + (f"No checkpoint was saved: the run diverged at step {step}; lower "
                      "learning_rate, raise warmup_steps or set grad_clip_norm and start again")
  return stopped + (f"The last good checkpoint (step {latest}) is kept in {directory}; lower "
                    "learning_rate, raise warmup_steps or set grad_clip_norm, then re-run to "
                    "resume from it")


def _make_validate(config, model, tokenizer, partitioner) -> Callable[[Any], dict]:
  """``params -> metrics``: loss, accuracy and perplexity on the validation split, plus BLEU
  and chrF on its first ``eval_bleu_examples`` pairs when that is positive.

  With ``jit`` the examples are decoded over the training mesh with the params where they
  are (sharded as trained, never gathered to a host), each process feeding its rows of
  every batch; with ``pmap`` each process decodes them all with its first device's copy.
  Every process gets every hypothesis, so all of them agree on the best checkpoint.
  """
  examples = data.eval_examples(config, tokenizer, "validation")
  batches = [square_eval_batch(_host_batch(b)) for b, _ in data.eval_batches(
      examples, int(config.batch_tokens), batch_multiple=partitioner.global_batch_multiple,
      num_shapes=int(config.data.eval_shapes), length_multiple=int(config.data.length_multiple))]
  eval_fn = partitioner.compile_eval_step(steps.make_eval_step(model, jit=False))
  subset = examples[:max(int(config.eval_bleu_examples), 0)]

  def validate(params) -> dict:
    metrics = evaluate_validation(eval_fn, params, batches, partitioner)
    if subset:
      jit = partitioner.mode == "jit"
      metrics.update(inference.validation_bleu(
          config, model, params if jit else partitioner.first_copy(params), tokenizer, subset,
          partitioner=partitioner if jit else None))
    return metrics
  return validate


def _tokenizer(config, workdir):
  """Process 0 trains (or loads) the tokenizer first; the others then load it."""
  if jax.process_count() > 1:
    if sharding.is_primary():
      tok = data.load_or_train_tokenizer(config, workdir)
    sharding.barrier("mt_flax_tokenizer")
    if not sharding.is_primary():
      tok = data.load_or_train_tokenizer(config, workdir)
    return tok
  return data.load_or_train_tokenizer(config, workdir)


def _mark_done(workdir: str) -> None:
  if sharding.is_primary():
    (paths.as_path(workdir) / DONE_FILE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))

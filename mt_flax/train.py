r"""Training: ``python -m mt_flax train --config FILE --workdir DIR [--config.key=value ...]``.

Re-running the same command on an existing workdir resumes from its latest good
checkpoint (params, optimizer state, step, RNG and data-iterator state), so
the per-step losses continue exactly as if uninterrupted; on a finished run
it returns at once. SIGTERM (e.g. TPU preemption) saves a checkpoint and exits
with status 143; Ctrl-C (SIGINT) does the same and exits with 130, and a second
Ctrl-C stops at once without saving. A non-finite loss stops the run (status 1)
and keeps the last good checkpoint. A checkpoint save that fails in the
background (e.g. disk full) stops the run at the next step (status 1) with the
previous checkpoint intact.

One run at a time: the run holds ``train.lock`` in the workdir (see
:mod:`mt_flax.workdir_lock`); a second run on the same workdir stops at once.
Errors reach the terminal as one line; tracebacks and third-party log output
(absl, Orbax, XLA, asyncio) go to ``train.log`` in the workdir.

The workdir receives ``config.json`` (resolved config), ``run.json`` (process and
device counts), ``git_commit.txt``, ``train.log``,
``tokenizer/``, ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/`` and
``DONE`` once ``num_train_steps`` are reached. The command line keeps compiled
programs in ``~/.cache/mt_flax/jax_compilation_cache`` (or
``$JAX_COMPILATION_CACHE_DIR``) so resumed and repeated runs skip compiling.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Optional, Sequence

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from mt_flax import checkpoint, cli, data, inference, paths, sharding, steps, workdir_lock
from mt_flax.config import load_config, with_defaults
from mt_flax.errors import ConfigError, SaveFailed, TrainingDiverged, UserError
from mt_flax.runlog import LogRouting, failure_cause, log_path
from mt_flax.metrics import MetricWriter, read_metrics
from mt_flax.model import Transformer, TransformerConfig, count_params

DONE_FILE = "DONE"
GIT_FILE = "git_commit.txt"
PREEMPTED_EXIT = 143   # 128 + SIGTERM
INTERRUPTED_EXIT = 130  # 128 + SIGINT
COMPILATION_CACHE = os.path.expanduser("~/.cache/mt_flax/jax_compilation_cache")
BATCH_KEYS = ("src", "tgt_in", "tgt_out") + steps.MODEL_INPUTS

# Config keys and sections the resumed run must share with the run that made the workdir
# (the model, and everything that decides which examples make up each step's batch) ...
FIXED_ON_RESUME = ("model", "data", "seed", "batch_tokens", "grad_accum_steps", "mesh",
                   "parallelism")
# ... except where the data lives, which may move (e.g. to gs://).
MOVABLE = ("data.manual_dir", "data.tfds_data_dir")
# The devices the run was made on: how each batch is split over processes (run.json).
RUN_FILE = "run.json"


# ----------------------------------------------------------------------------- config


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks the training keys' values (every key exists: see :func:`config.with_defaults`);
  returns a complete copy."""
  config = with_defaults(config)
  checks = [
      (config.parallelism in ("jit", "pmap"), "parallelism", "'jit' or 'pmap'"),
      (config.schedule in ("rsqrt", "cosine"), "schedule", "'rsqrt' or 'cosine'"),
      (config.best_mode in ("min", "max"), "best_mode", "'min' or 'max'"),
      (int(config.num_train_steps) > 0, "num_train_steps", "a positive integer"),
      (int(config.eval_every_steps) > 0, "eval_every_steps", "a positive integer"),
      (int(config.checkpoint_every_steps) > 0, "checkpoint_every_steps", "a positive integer"),
      (int(config.log_every_steps) > 0, "log_every_steps", "a positive integer"),
      (int(config.grad_accum_steps) >= 1, "grad_accum_steps", "an integer >= 1"),
      (int(config.batch_tokens) > 0, "batch_tokens", "a positive integer"),
      (0.0 <= float(config.label_smoothing) < 1.0, "label_smoothing", "a number in [0, 1)"),
      (float(config.learning_rate) > 0, "learning_rate", "a positive number"),
  ]
  for ok, key, expected in checks:
    if not ok:
      raise ConfigError(f"{key}={config[key]!r}: expected {expected}")
  return config


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += _differences(a.get(k, "<unset>"), b.get(k, "<unset>"), f"{prefix}{k}.")
    return out
  return [] if a == b else [f"{prefix[:-1]}: {b!r} -> {a!r}"]


def _run_devices() -> dict:
  return {"process_count": jax.process_count(), "device_count": jax.device_count()}


def write_run_info(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes ``config.json``, ``run.json`` and ``git_commit.txt``; refuses a workdir made with
  other settings (one line naming each changed key with its old and new value)."""
  path = paths.as_path(workdir) / checkpoint.CONFIG_FILE
  run_path = paths.as_path(workdir) / RUN_FILE
  new = json.loads(json.dumps(config.to_dict()))
  devices = _run_devices()
  if path.exists():
    old = json.loads(path.read_text())
    diffs = [d for k in FIXED_ON_RESUME
             for d in _differences(new.get(k, "<unset>"), old.get(k, "<unset>"), k + ".")
             if d.split(":")[0] not in MOVABLE]
    if run_path.exists():
      diffs += _differences(devices, json.loads(run_path.read_text()))
    if diffs:
      raise ConfigError(f"workdir {workdir!r} holds a run with different settings "
                        f"({'; '.join(diffs[:4])}); use a new --workdir or the same settings")
  if sharding.is_primary():
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")
    run_path.write_text(json.dumps(devices, sort_keys=True) + "\n")
    (paths.as_path(workdir) / GIT_FILE).write_text(git_commit() + "\n")


def git_commit() -> str:
  """The source tree's commit (``-dirty`` with uncommitted changes), or ``unknown``."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                         text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return sha + ("-dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown"


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
  (the same on every process); each process feeds its share of rows.
  """
  totals = {"nll": 0.0, "correct": 0.0, "tokens": 0.0}
  outs = [eval_fn(params, partitioner.shard_batch(sharding.process_rows(b))) for b in batches]
  for out in outs:
    for k, v in partitioner.metrics_to_host(out).items():
      totals[k] += float(v)
  return steps.eval_metrics(totals)


def _log(message: str) -> None:
  if sharding.is_primary():
    tqdm.write(f"[train] {message}", file=sys.stderr)


# ----------------------------------------------------------------------------- loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the run in ``workdir``; returns a summary dict.

  Summary keys: ``step``, ``wall_s``, ``train_steps_run``, ``tokens_per_s``
  (mean over this invocation's logged intervals, compile excluded),
  ``preempted``, and the last validation metrics (``eval_loss``, ...).
  """
  t_start = time.time()
  config = resolve_config(config)
  sharding.maybe_initialize_distributed()
  with _locked(workdir), _Preemption() as preemption:
    return _train_locked(config, workdir, preemption, t_start)


def _locked(workdir: str):
  """The workdir lock, taken by process 0 (the others stop too if it is busy)."""
  stack = contextlib.ExitStack()
  busy = None
  if sharding.is_primary():
    try:
      stack.enter_context(workdir_lock.hold(workdir))
    except workdir_lock.WorkdirBusy as e:
      busy = e
  if sharding.any_process(busy is not None):
    stack.close()
    raise busy or workdir_lock.WorkdirBusy(f"workdir {workdir} is in use by another run")
  return stack


def _train_locked(config: ml_collections.ConfigDict, workdir: str, preemption: "_Preemption",
                  t_start: float) -> dict:
  """:func:`train_and_evaluate` once the workdir is locked."""
  write_run_info(workdir, config)
  tokenizer = _tokenizer(config, workdir)
  try:
    model_cfg = TransformerConfig.from_config(config.model, tokenizer.src_vocab_size,
                                              tokenizer.tgt_vocab_size)
    partitioner = sharding.make_partitioner(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  model = Transformer(model_cfg)
  optimizer = steps.make_optimizer(config)
  accum = int(config.grad_accum_steps)
  partitioner.setup(functools.partial(steps.init_boxed_state, model, optimizer),
                    jax.random.key(int(config.seed)))
  if sharding.is_primary():   # what a failed or killed save left (the workdir is locked)
    stale = checkpoint.remove_temporary(paths.as_path(workdir) / checkpoint.CHECKPOINT_DIR)
    if stale:
      _log(f"removed the temporary folders of unfinished saves: {', '.join(sorted(stale))}")
  manager = checkpoint.make_manager(
      workdir, keep=config.keep_checkpoints, best_metric=config.best_metric,
      best_mode=config.best_mode, async_save=config.async_checkpointing)

  train_iter = data.train_iterator(config, tokenizer, process_index=jax.process_index(),
                                   process_count=jax.process_count(),
                                   batch_multiple=partitioner.local_batch_multiple * accum)
  restored = checkpoint.restore_latest_good(manager, partitioner.abstract_state())
  if restored is None:
    state, start = partitioner.init_state(jax.random.key(int(config.seed))), 0
  else:
    host_state, data_state, start = restored
    state = partitioner.from_checkpoint(host_state)
    if data_state is not None:
      train_iter.set_state(data_state)
    _log(f"resumed from checkpoint step {start} in {manager.directory}")

  num_steps = int(config.num_train_steps)
  if start >= num_steps:
    manager.close()
    _mark_done(workdir)
    last = [{k: v for k, v in r.items() if k not in ("step", "split")}
            for r in read_metrics(workdir) if r.get("split") == "validation"]
    _log(f"{workdir} already trained to step {start} (num_train_steps={num_steps}); nothing to do")
    return {"step": start, "wall_s": time.time() - t_start, "train_steps_run": 0,
            "preempted": False, **(last[-1] if last else {})}

  if sharding.is_primary():
    (paths.as_path(workdir) / DONE_FILE).unlink(missing_ok=True)   # trains again (more steps)
  _log(f"model: {count_params(partitioner.abstract_state().params) / 1e6:.2f}M parameters; "
       f"{partitioner.mode} over {jax.device_count()} device(s), "
       f"{jax.process_count()} process(es); steps {start} -> {num_steps}")
  eval_examples = data.eval_examples(config, tokenizer, "validation")
  eval_batches = [square_eval_batch(_host_batch(b)) for b, _ in data.eval_batches(
      eval_examples, int(config.batch_tokens), batch_multiple=partitioner.global_batch_multiple)]
  schedule = steps.make_schedule(config)
  train_fn = partitioner.compile_train_step(steps.make_train_step(
      model, optimizer, label_smoothing=float(config.label_smoothing), grad_accum_steps=accum,
      learning_rate_fn=schedule, jit=False))
  eval_fn = partitioner.compile_eval_step(steps.make_eval_step(model, jit=False))

  writer = MetricWriter(workdir, enabled=sharding.is_primary(), resume_step=start)
  loop = _Loop(config, partitioner, manager, writer, train_iter, train_fn, eval_fn,
               eval_batches, start,
               bleu_fn=_make_bleu_fn(config, model, tokenizer, eval_examples, partitioner))
  loop.verified = restored is None or checkpoint.has_digests(manager, start)
  try:
    summary = loop.run(state, preemption)
    loop.poll_save(wait=True)
  finally:
    loop.close()
  if not summary["preempted"]:
    _mark_done(workdir)
  summary["wall_s"] = time.time() - t_start
  return summary


def _make_bleu_fn(config, model, tokenizer, examples, partitioner) -> Optional[Callable]:
  """``params -> {"bleu", "chrf"}`` on the first ``eval_bleu_examples`` validation pairs, or None.

  Every process decodes the same examples with one full copy of the params, so
  all of them agree on the best checkpoint.
  """
  count = int(config.eval_bleu_examples)
  if count <= 0:
    return None
  subset = examples[:count]

  def bleu_fn(params):
    if partitioner.mode == "pmap":
      params = partitioner.first_copy(params)
    elif jax.process_count() > 1:
      from jax.experimental import multihost_utils
      params = multihost_utils.process_allgather(params, tiled=True)
    return inference.validation_bleu(config, model, params, tokenizer, subset)
  return bleu_fn


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


def _all_processes(flags: Sequence[bool]) -> list[bool]:
  """``flags`` OR-ed over all processes (one gather on several hosts)."""
  if jax.process_count() == 1:
    return [bool(f) for f in flags]
  from jax.experimental import multihost_utils
  return [bool(f) for f in np.any(multihost_utils.process_allgather(np.array(flags)), axis=0)]


def _join_orbax_threads(timeout: float = 60) -> None:
  """Waits for Orbax's writer threads. After a failed save Orbax raises on its first failed
  thread while others may still write; what they wrote can only be removed after them.
  (Writes orphaned inside tensorstore cannot be waited for: the next run removes those.)
  Raises nothing: Orbax's threads re-raise their own failure from ``join``, and that failure
  is the save's, already reported by whoever waited for the save."""
  for thread in threading.enumerate():
    if type(thread).__module__.startswith("orbax.") and thread is not threading.current_thread():
      try:
        thread.join(timeout=timeout)
      except Exception:  # pylint: disable=broad-except
        logging.getLogger(__name__).debug("orbax thread %s ended with an error", thread.name,
                                          exc_info=True)


def _save_failure(manager, step: int, error: Optional[BaseException]) -> "SaveFailed":
  """The one-line error of a failed save; its temporary directory is removed."""
  directory = paths.as_path(manager.directory)
  _join_orbax_threads()
  if sharding.is_primary():
    checkpoint.remove_temporary(directory, step)
  previous = [s for s in manager.all_steps() if s < step and (directory / str(s)).exists()]
  kept = (f"the previous checkpoint (step {max(previous)}) is intact" if previous
          else "no earlier checkpoint exists")
  return SaveFailed(f"saving checkpoint step {step} failed: "
                    f"{failure_cause(error, str(directory.parent))}; stopped, {kept}; fix the "
                    "cause and re-run the same command to resume")


class _Loop:
  """The step loop: train, log, validate, checkpoint, stop on preemption or divergence."""

  def __init__(self, config, partitioner, manager, writer, train_iter, train_fn, eval_fn,
               eval_batches, start, bleu_fn: Optional[Callable] = None):
    self.config, self.partitioner = config, partitioner
    self.manager, self.writer, self.train_iter = manager, writer, train_iter
    self.train_fn, self.eval_fn, self.eval_batches = train_fn, eval_fn, eval_batches
    self.bleu_fn = bleu_fn
    self.start = start
    self.pending: list[tuple[int, Any, tuple[int, int]]] = []
    self.throughput: list[tuple[float, float]] = []   # (tokens, seconds) per logged interval
    self.last_eval: dict = {}
    self.saving: Optional[int] = None    # step of the save in flight
    self.verified = True                 # the state trained from was initialized or verified

  def _flush(self, t0: float, compiled: bool = False) -> dict:
    """Waits for the pending steps, writes their train lines, raises on a non-finite loss.

    Rates cover the wall time since ``t0``; an interval that ``compiled`` a new
    batch shape is marked ``includes_compile`` and left out of the run's mean.
    """
    fetched = [(s, self.partitioner.metrics_to_host(m), st) for s, m, st in self.pending]
    elapsed = max(time.time() - t0, 1e-9)
    real = sum(st[0] for _, _, st in fetched)
    slots = sum(st[1] for _, _, st in fetched)
    rates = {"tokens_per_s": real / elapsed, "steps_per_s": len(fetched) / elapsed,
             "padding_efficiency": real / max(slots, 1)}
    if compiled:
      rates["includes_compile"] = True
    for step, m, _ in fetched:
      row = {k: float(v) for k, v in m.items() if k != "finite"}
      row.update(rates)
      self.writer.write(step, row)
      if not m["finite"]:
        self.writer.flush()
        latest = self.manager.latest_step()
        stopped = (f"loss or gradients are not finite at step {step} (loss={float(m['loss'])}, "
                   f"grad_norm={float(m['grad_norm'])}); stopped. ")
        if not self.verified:
          raise TrainingDiverged(
              stopped + f"This run resumed from checkpoint step {self.start} of "
              f"{self.manager.directory}, saved without digests, so it could not be verified "
              "and may be damaged; move it aside and re-run to resume from an older one")
        raise TrainingDiverged(
            stopped + f"The last good checkpoint (step {latest}) is kept in "
            f"{self.manager.directory}; lower learning_rate, raise warmup_steps or set "
            "grad_clip_norm, then re-run to resume from it")
    if not compiled:
      self.throughput.append((real, elapsed))
    self.pending = []
    return {k: float(v) for k, v in fetched[-1][1].items()}

  def _save(self, step: int, state, metrics: Optional[dict] = None) -> None:
    self.poll_save(wait=True)
    data_state = self.train_iter.get_state()
    self.writer.flush()
    try:
      checkpoint.save(self.manager, step, self.partitioner.to_checkpoint(state), data_state,
                      self.config, metrics)
    except Exception as e:  # pylint: disable=broad-except  (its synchronous part failed)
      raise _save_failure(self.manager, step, e) from e
    self.saving = step

  def poll_save(self, wait: bool = False) -> None:
    """Checks the save in flight (waits for it with ``wait``); raises SaveFailed if it failed.

    Every process stops together: each reports whether its part finished and failed.
    """
    if self.saving is None:
      return
    done = wait or not self.manager.is_saving_in_progress()
    error = None
    if done:
      try:
        self.manager.wait_until_finished()
        if sharding.is_primary() and not (
            paths.as_path(self.manager.directory) / str(self.saving)).exists():
          raise RuntimeError("the save did not complete")
      except Exception as e:  # pylint: disable=broad-except  (reported in one line)
        error = e
    flags = _all_processes([done, error is not None])
    if flags[1]:
      step, self.saving = self.saving, None
      raise _save_failure(self.manager, step, error)
    if flags[0]:
      self.saving = None

  def close(self) -> None:
    """Waits for the save in flight and closes the manager and the writer, raising nothing
    (called on the way out of an error; a save failure is then in ``train.log``)."""
    for part in (lambda: self.poll_save(wait=True), self.manager.close):
      try:
        part()
      except Exception:  # pylint: disable=broad-except
        logging.getLogger(__name__).exception("closing the checkpoint manager")
    _join_orbax_threads()
    if sharding.is_primary():
      checkpoint.remove_temporary(self.manager.directory)
    self.writer.close()

  def run(self, state, preemption: _Preemption) -> dict:
    c = self.config
    num_steps = int(c.num_train_steps)
    every = lambda n, s: s % int(n) == 0
    bar = tqdm(total=num_steps, initial=self.start, desc="train", unit="step", dynamic_ncols=True,
               disable=not (sharding.is_primary() and c.progress_bar), mininterval=1.0)
    step, preempted = self.start, False
    seen_shapes: set = set()
    t0 = time.time()
    if sharding.any_process(bool(preemption.requested)):   # signalled while setting up
      _log(f"{preemption.requested or 'SIGTERM'} before the first step: nothing new to save")
      bar.close()
      return {"step": step, "train_steps_run": 0, "tokens_per_s": None,
              "preempted": preemption.requested or "SIGTERM"}
    try:
      while step < num_steps and not preempted:
        step += 1
        batch = _host_batch(next(self.train_iter))
        stats = _token_stats(batch)
        batch = sharding.common_batch_shape(batch)
        shape = tuple((k, v.shape) for k, v in sorted(batch.items()))
        compiles = shape not in seen_shapes   # a new shape compiles: time it on its own
        if compiles:
          seen_shapes.add(shape)
          if self.pending:
            self._flush(t0)
          t0 = time.time()
        state, metrics = self.train_fn(state, self.partitioner.shard_batch(batch))
        self.pending.append((step, metrics, stats))
        bar.update(1)
        if compiles:
          self._flush(t0, compiled=True)
          t0 = time.time()
        preempted = sharding.any_process(bool(preemption.requested))
        self.poll_save()
        do_eval = every(c.eval_every_steps, step) or step == num_steps
        do_save = every(c.checkpoint_every_steps, step) or do_eval or preempted
        if self.pending and (every(c.log_every_steps, step) or do_save):
          last = self._flush(t0)
          bar.set_postfix(loss=f"{last['loss']:.3f}", refresh=False)
          t0 = time.time()
        if do_eval:
          self.last_eval = evaluate_validation(self.eval_fn, self.partitioner.params_of(state),
                                               self.eval_batches, self.partitioner)
          if self.bleu_fn is not None:
            self.last_eval.update(self.bleu_fn(self.partitioner.params_of(state)))
          self.writer.write(step, self.last_eval, split="validation")
          _log(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in self.last_eval.items()))
        if do_save:
          self._save(step, state, dict(self.last_eval) if do_eval else None)
        if do_eval or do_save:
          t0 = time.time()
      if preempted:
        self.poll_save(wait=True)
        _log(f"{preemption.requested or 'SIGTERM'}: saved checkpoint step {step}; re-run the "
             "same command to resume")
    finally:
      bar.close()
    tokens = sum(t for t, _ in self.throughput)
    seconds = sum(s for _, s in self.throughput)
    preempted = (preemption.requested or "SIGTERM") if preempted else False
    return {"step": step, "train_steps_run": step - self.start, "preempted": preempted,
            "tokens_per_s": tokens / seconds if seconds else None, **self.last_eval}


# ----------------------------------------------------------------------------- CLI


def build_parser():
  parser = cli.new_parser("train", __doc__, config="required")
  parser.add_argument("--workdir", required=True,
                      help="where checkpoints, metrics and logs go (local or gs://); "
                           "re-running on it resumes")
  return parser


def run(args) -> int:
  config = load_config(args.config, args.overrides)
  try:
    routing = LogRouting(log_path(args.workdir))
  except OSError as e:
    raise ConfigError(f"cannot write the log file in {args.workdir}: "
                      f"{failure_cause(e, args.workdir)}") from None
  with routing:
    return _run(config, args.workdir, routing)


def _run(config: ml_collections.ConfigDict, workdir: str, routing: LogRouting) -> int:
  """Trains with output routed; every error is one line on the terminal (user errors through
  :func:`cli.entry`, the others here with a pointer to the log file)."""
  details = f"(details in {routing.path})"
  try:
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:   # resumes and repeats skip compiling
      jax.config.update("jax_compilation_cache_dir", COMPILATION_CACHE)
    summary = train_and_evaluate(config, workdir)
  except (TrainingDiverged, SaveFailed) as e:
    routing.write_exception(type(e).__name__, e)
    print(f"mt_flax train: error: {e} {details}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("mt_flax train: interrupted before training started; nothing saved", file=sys.stderr)
    return INTERRUPTED_EXIT
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (one line here, traceback in the log)
    routing.write_exception("unexpected error", e)
    print(f"mt_flax train: error: {failure_cause(e, workdir)} {details}", file=sys.stderr)
    return 1
  if summary.get("preempted"):
    return INTERRUPTED_EXIT if summary["preempted"] == "SIGINT" else PREEMPTED_EXIT
  shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()}
  _log("done: " + json.dumps(shown))
  return 0


main = cli.entry("train", build_parser, run)

"""Orbax checkpoints of a training run: save, exact resume, restore for inference.

``workdir/checkpoints/<step>/`` holds the items

- ``params``, ``opt_state``: the state arrays (saved asynchronously, sharded as trained);
- ``train``: ``{"step", "rng"}``;
- ``data``: the data-iterator state, one JSON file per process (Grain's handler);
- ``config``: the resolved config;
- ``digests``: a 64-bit fingerprint of every saved array (path -> hex), computed
  on the devices that hold it, and the SHA-256 of the data state.

The manager keeps the last ``keep_checkpoints`` steps and the best step by the
validation metric ``best_metric`` (``best_mode`` "min" or "max"), which is
attached to the checkpoints saved right after validation.

Every restore checks the arrays it read against ``digests`` and that the parameters
are finite. A fingerprint is of the global array, so a checkpoint verifies under any
sharding or process count. A checkpoint that cannot be read or fails those checks is
reported in one line; training moves it to ``workdir/checkpoints_unreadable/`` and
uses the previous one, inference (read-only) just uses the previous one.
:class:`Checkpointer` is what the training loop uses.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import threading
import types
from typing import Any, Callable, Optional, Sequence

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocp_managers

from mt_flax import paths, sharding, workdir_lock
from mt_flax.paths import (AVERAGED_DIR, AVERAGED_INFO, CHECKPOINT_DIR, CONFIG_FILE,
                           UNREADABLE_DIR)
from mt_flax.config import with_defaults
from mt_flax.errors import CheckpointError, SaveFailed, VerificationError
from mt_flax.runlog import failure_cause

_path = paths.as_path
_log = logging.getLogger(__name__)


# Orbax warns about things done here on purpose: checkpoints saved between validations carry
# no metrics; inference opens the directory read-only.
_EXPECTED_WARNINGS = ("did not provide metrics", "read_only=True", "directory is read only")
logging.getLogger("absl").addFilter(
    lambda record: not any(text in record.getMessage() for text in _EXPECTED_WARNINGS))


# ----------------------------------------------------------------------------- digests

DIGEST_ALGORITHM = "fmix32x2"   # what _leaf_check computes; other digests are not read
_MIX = (np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35))
_SEEDS = (np.uint32(0x9E3779B9), np.uint32(0x7F4A7C15))


def _fmix(x: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: every input bit flips each output bit with odds ~1/2."""
  x = x ^ (x >> 16)
  x = x * _MIX[0]
  x = x ^ (x >> 13)
  x = x * _MIX[1]
  return x ^ (x >> 16)


def _words(x: jax.Array) -> jax.Array:
  """The bits of every element as uint32 (8-byte elements: two words on a last axis)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if x.dtype.itemsize < 4:
    narrow = jnp.uint8 if x.dtype.itemsize == 1 else jnp.uint16
    return jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _leaf_check(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(64-bit fingerprint as two uint32, all finite) of one array, computed where it lives.

  The fingerprint is a position-keyed sum of mixed words over the global array,
  so it does not depend on how the array is sharded or on how many processes
  hold it, and a reduction over a sharded array never leaves the devices.
  """
  words = _words(x)
  index = jnp.zeros(words.shape, jnp.uint32)
  for axis in range(words.ndim):      # the flat position of each element, without a reshape
    stride = np.uint32(math.prod(words.shape[axis + 1:]) % (1 << 32))
    index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * stride
  sums = jnp.stack([jnp.sum(_fmix(words ^ _fmix(index ^ seed)), dtype=jnp.uint32)
                    for seed in _SEEDS])
  finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.array(True)
  return sums, finite


_tree_check = jax.jit(lambda tree: jax.tree.map(_leaf_check, tree))  # one compile per structure


def dispatch_checks(tree: Any, prefix: str) -> Callable[[], tuple[dict[str, str], list[str]]]:
  """Starts the fingerprints and finiteness checks of a tree of arrays; returns a function that
  waits for them: ``() -> ({prefix/leaf path: fingerprint hex}, paths holding NaN or inf)``;
  a leaf path reads ``decoder_1/mlp/Dense_0/kernel``.

  One compiled program on the arrays' own devices (every process must start
  it); every process gets the same answer, sharded or not. Starting it does not
  wait for the device, and the arrays may be donated to the next step at once.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  checks = jax.tree.leaves(_tree_check([leaf for _, leaf in leaves]))

  def result() -> tuple[dict[str, str], list[str]]:
    host = [np.asarray(c.addressable_data(0)) for c in checks]
    digests, non_finite = {}, []
    for (path, _), sums, finite in zip(leaves, host[0::2], host[1::2]):
      name = f"{prefix}/{jax.tree_util.keystr(path, simple=True, separator='/')}"
      digests[name] = "".join(f"{int(v):08x}" for v in sums)
      if not finite:
        non_finite.append(name)
    return digests, non_finite
  return result


def check_tree(tree: Any, prefix: str) -> tuple[dict[str, str], list[str]]:
  """:func:`dispatch_checks`, waited for."""
  return dispatch_checks(tree, prefix)()


def data_digest(data_state: Optional[dict]) -> str:
  return hashlib.sha256(json.dumps(data_state, sort_keys=True).encode()).hexdigest()


class _DigestHandler(ocp.JsonCheckpointHandler):
  """The ``digests`` item: its JSON is written by Orbax's background thread, which waits for
  the device to finish the fingerprints, so the training thread never does."""

  async def async_save(self, directory: epath.Path, item: Any = None, args: Any = None):
    async def write() -> None:
      digests = args.item()
      if sharding.is_primary():
        (directory / "metadata").write_text(json.dumps(digests))
    return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="mt_flax_digests")]


# Orbax uses a handler only with args registered for both save and restore (:func:`verify`
# reads the digests' file itself).
@ocp.args.register_with_handler(_DigestHandler, for_save=True, for_restore=True)
@dataclasses.dataclass
class _DigestArgs(ocp.args.CheckpointArgs):
  item: Optional[Callable[[], dict]] = None     # waits for and returns the digests


def verify(manager: ocp.CheckpointManager, step: int, params: Any, opt_state: Any = None,
           data_state: Any = None, check_data: bool = False) -> None:
  """Checks restored arrays against the digests saved with ``step`` (when it has digests of
  this algorithm) and that params are finite.

  Raises:
    VerificationError: a digest differs or a parameter is NaN/inf (one-line reason).
  """
  folder = epath.Path(manager.directory) / str(step) / "digests"
  saved = json.loads((folder / "metadata").read_text()) if folder.exists() else {}
  digests, non_finite = check_tree(params, "params")
  if saved.get("algorithm") == DIGEST_ALGORITHM:
    if opt_state is not None:
      digests.update(check_tree(opt_state, "opt_state")[0])
    bad = [name for name, value in digests.items()
           if name in saved["arrays"] and saved["arrays"][name] != value]
    if bad:
      raise VerificationError(f"{bad[0]} differs from the digest saved with it")
    if check_data and sharding.is_primary() and data_digest(data_state) != saved["data"]:
      raise VerificationError("the data-iterator state differs from the digest saved with it")
  if non_finite:
    raise VerificationError(f"{non_finite[0]} holds NaN or inf values")


def remove_temporary(directory, step: Optional[int] = None) -> list[str]:
  """Removes the temporary folders of unfinished saves (of ``step``, or all) in the manager
  ``directory``; returns their names. Only the one process writing checkpoints may call it.

  Best effort: a folder that a writer still fills ("Directory not empty") is logged and
  left, and the next training run removes it before it starts."""
  removed = []
  for tmp in _path(directory).glob(f"{step if step is not None else '*'}.orbax-checkpoint-tmp*"):
    try:
      tmp.rmtree(missing_ok=True)
      removed.append(tmp.name)
    except OSError:
      _log.exception("removing %s", tmp)
  return removed


REPLICA_SLICE_BYTES = 1 << 20


def make_manager(workdir: str, *, keep: int = 2, best_metric: str = "eval_loss",
                 best_mode: str = "min", async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """A ``CheckpointManager`` over ``workdir/checkpoints`` keeping the last ``keep`` and the best."""
  if best_mode not in ("min", "max"):
    raise ValueError(f"best_mode={best_mode!r}: expected 'min' or 'max'")
  worst = math.inf if best_mode == "min" else -math.inf

  def metric_fn(metrics: dict) -> float:
    value = float(metrics.get(best_metric, worst) if isinstance(metrics, dict) else worst)
    return worst if math.isnan(value) else value
  policy = ocp_managers.AnyPreservationPolicy([
      ocp_managers.LatestN(n=max(int(keep), 1)),
      ocp_managers.BestN(get_metric_fn=metric_fn, reverse=best_mode == "min", n=1,
                         keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      best_fn=metric_fn, best_mode=best_mode, preservation_policy=policy,
      enable_async_checkpointing=async_save, read_only=read_only, create=not read_only)
  # Orbax splits a replicated array among its replicas, each writing a slice; a slice costs
  # a dispatch per device (and on the first save a compile per device and shape), so only
  # arrays whose slices reach REPLICA_SLICE_BYTES are split (a model's embeddings and
  # large kernels, not its biases and norms).
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(
          min_slice_bytes_for_replica_parallel=REPLICA_SLICE_BYTES), override=True)
  handlers = {name: ocp.StandardCheckpointHandler() for name in ("params", "opt_state", "train")}
  handlers.update(data=grain.checkpoint.CheckpointHandler(), config=ocp.JsonCheckpointHandler(),
                  digests=_DigestHandler())
  return ocp.CheckpointManager(_path(workdir) / CHECKPOINT_DIR, options=options,
                               item_handlers=handlers)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: Optional[dict],
         config: ml_collections.ConfigDict, metrics: Optional[dict] = None) -> None:
  """Starts saving ``state`` (a ``steps.TrainState``) at ``step``; returns once arrays are copied.

  ``data_state`` is this process's ``iterator.get_state()`` taken now. The
  digests of the arrays are computed here, from the state being saved.
  """
  checks = [dispatch_checks(state.params, "params"), dispatch_checks(state.opt_state, "opt_state")]
  data, data_json = data_digest(data_state), json.dumps(data_state).encode()

  def digests() -> dict:     # called by Orbax's background thread (_DigestHandler)
    return {"algorithm": DIGEST_ALGORITHM,
            "arrays": {k: v for wait in checks for k, v in wait()[0].items()}, "data": data}

  args = ocp.args.Composite(
      digests=_DigestArgs(digests),
      params=ocp.args.StandardSave(state.params),
      opt_state=ocp.args.StandardSave(state.opt_state),
      train=ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
      # Grain's handler asks an iterator for its state; this one is the state taken now.
      data=grain.checkpoint.CheckpointSave(types.SimpleNamespace(get_state=lambda: data_json)),
      config=ocp.args.JsonSave(config.to_dict()))
  manager.save(step, args=args, metrics=metrics, force=True)


# ----------------------------------------------------------------------------- restore

def _read_data_state(manager: ocp.CheckpointManager, step: int) -> Optional[dict]:
  """This process's data-iterator state saved with ``step``, or process 0's when this process
  saved none (the run resumed on other processes).

  The state of a bucketed or padded batch plan is global, the same in every process's
  file; packed batches, whose state is per process group, resume on the processes and
  devices that saved them only (``train.write_run_info``).
  """
  folder = epath.Path(manager.directory) / str(step) / "data"
  own = folder / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  found = [own] if own.exists() else sorted(folder.glob("process_0-of-*.json"))
  if not found:
    raise ValueError(f"no data-iterator state in {folder}")
  return json.loads(found[0].read_text())


def _set_aside(manager: ocp.CheckpointManager, step: int) -> None:
  """Moves an unreadable step out of the manager's directory (kept for inspection)."""
  if sharding.is_primary():
    src = epath.Path(manager.directory) / str(step)
    dst = epath.Path(manager.directory).parent / UNREADABLE_DIR / str(step)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
      dst.rmtree()
    if src.exists():
      src.rename(dst)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"mt_flax_set_aside_{step}")
  manager.reload()


def _reason(e: Exception) -> str:
  """One line: the verification failure, or the read error's type and first words."""
  if isinstance(e, VerificationError):
    return f"failed verification: {e}"
  text = " ".join(str(e).split())[:300] or type(e).__name__
  return f"is unreadable ({type(e).__name__}: {text})"


def _first_good(manager: ocp.CheckpointManager, steps: Sequence[int],
                read: Callable[[int], Any], set_aside: bool) -> tuple[Any, int]:
  """``(read(step), step)`` for the first of ``steps`` that ``read`` reads and verifies.

  Every step that fails is reported on stderr: training (``set_aside``) moves it to
  ``UNREADABLE_DIR`` and reports it at once, one line each; inference leaves the
  directory alone and names the failed steps in one line with the step it uses.

  Raises:
    CheckpointError: none of ``steps`` is good.
  """
  errors = []
  for step in steps:
    try:
      result = read(step)
    except Exception as e:  # pylint: disable=broad-except  (any read failure: try older)
      why = _reason(e)
      errors.append(f"step {step} {why}")
      if set_aside:
        print(f"mt_flax: checkpoint step {step} in {manager.directory} {why}; moved to "
              f"{UNREADABLE_DIR}/ and using the previous one", file=sys.stderr, flush=True)
        _set_aside(manager, step)
      continue
    if errors and not set_aside:
      print(f"mt_flax: checkpoint {'; '.join(errors)}; using step {step} instead",
            file=sys.stderr, flush=True)
    return result, step
  if set_aside:
    raise CheckpointError(
        f"no good checkpoint in {manager.directory}: step(s) {', '.join(map(str, steps))} "
        f"failed and were moved to {UNREADABLE_DIR}/; re-run to start again from step 0")
  raise CheckpointError(f"no good checkpoint in {manager.directory} ({'; '.join(errors)})")


def restore_latest_good(manager: ocp.CheckpointManager,
                        abstract_state: Any) -> Optional[tuple[Any, Optional[dict], int]]:
  """Restores the newest checkpoint that reads and verifies into ``abstract_state``'s shapes.

  Returns ``(state, data_state, step)`` or None when there is no checkpoint.
  Newer steps that cannot be read or fail :func:`verify` on any process are
  reported on stderr (one line each) and set aside.

  Raises:
    CheckpointError: there were checkpoints but none was good.
  """
  def read(step: int) -> tuple[Any, Optional[dict], int]:
    out = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_state.params),
        opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
        train=ocp.args.StandardRestore({"step": abstract_state.step, "rng": abstract_state.rng})))
    state = abstract_state.replace(params=out.params, opt_state=out.opt_state,
                                   step=out.train["step"], rng=out.train["rng"])
    if int(state.step) != step:
      raise ValueError(f"holds step {int(state.step)}, not {step}")
    data_state, bad = _read_data_state(manager, step), None
    try:
      verify(manager, step, state.params, state.opt_state, data_state, check_data=True)
    except VerificationError as e:
      bad = e
    if sharding.any_process(bad is not None):
      raise bad or VerificationError("another process found it damaged")
    return state, data_state, step

  steps = sorted(manager.all_steps(), reverse=True)
  return _first_good(manager, steps, read, set_aside=True)[0] if steps else None


class Checkpointer:
  """The checkpoints of one training run: restore, save in the background, poll, close.

  Every process makes one and calls the same methods in the same order (Orbax writes from
  all of them). A save that fails, in its synchronous part or in the background, is raised
  as one :class:`SaveFailed` line by the next :meth:`save`, :meth:`poll`, :meth:`settle` or
  :meth:`close`, after its temporary folder is removed; the previous checkpoint stays
  intact. A run that lost the workdir lock (``lost``) saves nothing more. Used as a context
  manager, it waits for the save in flight and closes on the way out.

  How the save in flight went is agreed by a gather over the processes: one in :meth:`save`
  (with the lock's state) and :meth:`poll`; a caller that gathers anyway (the training loop
  at its sync points) sends :meth:`status` along and hands the agreed flags to
  :meth:`settle`, with no gather of its own. Between those, nothing here is collective.
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict,
               lost: Callable[[], str] = lambda: ""):
    self.config, self.workdir, self.lost = config, workdir, lost
    self.directory = _path(workdir) / CHECKPOINT_DIR
    # What a failed or killed save left; safe to remove: the caller holds the workdir lock.
    self.removed = remove_temporary(self.directory) if sharding.is_primary() else []
    self.manager = make_manager(workdir, keep=config.keep_checkpoints,
                                best_metric=config.best_metric, best_mode=config.best_mode,
                                async_save=config.async_checkpointing)
    self.saving: Optional[int] = None    # step of the save in flight (not yet agreed finished)
    self._error: Optional[BaseException] = None   # how this process's part of it failed

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def restore(self, abstract_state: Any) -> Optional[tuple[Any, Optional[dict], int]]:
    """:func:`restore_latest_good` of this run's checkpoints."""
    return restore_latest_good(self.manager, abstract_state)

  def verified(self, step: int) -> bool:
    """Whether ``step`` was saved with digests (so a restore of it was verified)."""
    return (self.directory / str(step) / "digests").exists()

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: Optional[dict],
           metrics: Optional[dict] = None) -> None:
    """Starts saving ``state`` at ``step`` once the previous save has finished.

    One gather: the lock's state and how the previous save went. Raises WorkdirLost,
    saving nothing, when ``lost()`` (the reason this run no longer holds the workdir
    lock, or "") is not empty on any process.
    """
    reason = self.lost()
    lost, *saves = sharding.any_of_processes([bool(reason), *self.status(wait=True)])
    if lost:
      raise workdir_lock.lost_error(self.workdir, reason, f"saving checkpoint step {step} refused")
    self.settle(*saves)
    try:
      save(self.manager, step, state, data_state, self.config, metrics)
    except Exception as e:  # pylint: disable=broad-except  (its synchronous part failed)
      raise self._failure(step, e) from e
    self.saving = step

  def status(self, wait: bool = False) -> list[bool]:
    """``[still saving, failed]`` of this process's part of the save in flight, looked at now
    (waited for with ``wait``), with no collective; ``[False, False]`` when none is in flight.
    """
    if self.saving is None:
      return [False, False]
    if not wait and self.manager.is_saving_in_progress():
      return [True, False]
    if self._error is None:
      try:
        self.manager.wait_until_finished()
        if sharding.is_primary() and not (self.directory / str(self.saving)).exists():
          raise RuntimeError("the save did not complete")
      except Exception as e:  # pylint: disable=broad-except  (reported in one line)
        self._error = e
    return [False, self._error is not None]

  def settle(self, saving: bool, failed: bool) -> None:
    """Applies the :meth:`status` flags OR-ed over every process: raises SaveFailed if the
    save failed on any; forgets the save once no process is still saving it."""
    if self.saving is None:
      return
    if failed:
      step, error, self.saving, self._error = self.saving, self._error, None, None
      raise self._failure(step, error)
    if not saving:
      self.saving = None

  def poll(self, wait: bool = False) -> None:
    """Checks the save in flight (waits for it with ``wait``) with one gather; raises SaveFailed
    if it failed on any process, so every process stops together."""
    if self.saving is not None:
      self.settle(*sharding.any_of_processes(self.status(wait)))

  def close(self) -> None:
    """Waits for the save in flight, closes the manager and removes what a failed save left.

    Raises nothing (it runs on the way out of errors too); a failure that no
    earlier call reported is logged to ``train.log``.
    """
    for part in (lambda: self.poll(wait=True), self.manager.close):
      try:
        part()
      except Exception:  # pylint: disable=broad-except
        _log.exception("closing the checkpoints")
    join_orbax_threads()
    if sharding.is_primary():
      remove_temporary(self.directory)

  def _failure(self, step: int, error: Optional[BaseException]) -> SaveFailed:
    """The one-line error of a failed save; its temporary folder is removed."""
    join_orbax_threads()
    if sharding.is_primary():
      remove_temporary(self.directory, step)
    previous = [s for s in self.manager.all_steps()
                if s < step and (self.directory / str(s)).exists()]
    kept = (f"the previous checkpoint (step {max(previous)}) is intact" if previous
            else "no earlier checkpoint exists")
    return SaveFailed(f"saving checkpoint step {step} failed: "
                      f"{failure_cause(error, str(self.directory.parent))}; stopped, {kept}; "
                      "fix the cause and re-run the same command to resume")


def join_orbax_threads(timeout: float = 60) -> None:
  """Waits for Orbax's writer threads, raising nothing.

  After a failed save Orbax raises on its first failed thread while others may still write;
  what they wrote can only be removed after them. Their ``join`` re-raises the thread's own
  failure, which is the save's, already reported. (Writes orphaned inside tensorstore cannot
  be waited for: the next run removes those.)
  """
  for thread in threading.enumerate():
    if type(thread).__module__.startswith("orbax.") and thread is not threading.current_thread():
      try:
        thread.join(timeout=timeout)
      except Exception:  # pylint: disable=broad-except
        _log.debug("orbax thread %s ended with an error", thread.name, exc_info=True)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config saved in ``workdir/config.json``."""
  path = _path(workdir) / CONFIG_FILE
  if not path.exists():
    raise CheckpointError(f"no {CONFIG_FILE} in workdir {workdir!r}; expected the workdir of a "
                          "`python -m mt_flax train` run")
  return with_defaults(json.loads(path.read_text()), os.fspath(path))


def read_only_manager(workdir: str) -> ocp.CheckpointManager:
  """The run's checkpoint manager, opened read-only (for inference and averaging)."""
  if not (_path(workdir) / CHECKPOINT_DIR).is_dir():
    raise CheckpointError(f"no checkpoints in workdir {workdir!r}; train first "
                          "(`python -m mt_flax train --workdir ...`)")
  config = read_config(workdir)
  return make_manager(workdir, best_metric=config.best_metric, best_mode=config.best_mode,
                      async_save=False, read_only=True)


def _targets(metadata: Any, placed: Optional[Any] = None) -> Any:
  """Restore targets for a tree of array metadata: every array in the sharding ``placed``
  (default: on this process's first device)."""
  placed = placed or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=placed), metadata)


def restore_params(manager: ocp.CheckpointManager, step: int, placed: Optional[Any] = None
                   ) -> Any:
  """The params of checkpoint ``step``, a plain tree of arrays (placed as :func:`_targets`
  says), verified against the digests saved with them (:func:`verify`)."""
  target = _targets(manager.item_metadata(step)["params"].tree, placed)
  params = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(target))).params
  verify(manager, step, params)
  return params


def restore_for_inference(workdir: str, which: str = "best", placed: Optional[Any] = None
                          ) -> tuple[ml_collections.ConfigDict, Any, int]:
  """Loads ``(config, params, step)`` from a training workdir for decoding (on the default
  device, or with every array in the sharding ``placed``).

  ``which``: "best" (best validation metric; the latest if none was validated)
  or "latest". A step that does not read or verify is named on stderr and the
  next newest is used; nothing is moved (the workdir may be read-only).
  """
  if which not in ("best", "latest"):
    raise ValueError(f"which={which!r}: expected 'best' or 'latest'")
  if not _path(workdir).is_dir():
    raise CheckpointError(f"workdir {workdir!r} does not exist; expected the workdir of a "
                          "`python -m mt_flax train` run")
  config = read_config(workdir)
  manager = read_only_manager(workdir)
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    raise CheckpointError(f"no checkpoints in {manager.directory}; train first")
  first = manager.best_step() if which == "best" else steps[0]
  params, step = _first_good(manager, [first] + [s for s in steps if s != first],
                             lambda s: restore_params(manager, s, placed), set_aside=False)
  return config, params, int(step)


# ----------------------------------------------------------------------------- averaged params

def save_averaged(workdir: str, params: Any, info: dict) -> str:
  """Writes ``params`` and ``info`` to ``workdir/averaged/`` (replacing it); returns the path.

  Written to a temporary folder first and renamed, so a reader never sees half of it. On
  several processes every one calls it (Orbax writes the arrays from all of them) and
  process 0 alone prepares, renames and removes folders.
  """
  final = _path(workdir) / AVERAGED_DIR
  tmp = _path(workdir) / f"{AVERAGED_DIR}.tmp"
  if sharding.is_primary() and tmp.exists():
    tmp.rmtree()
  sharding.barrier("mt_flax_averaged_tmp")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp / "params", params)
  checkpointer.wait_until_finished()
  if sharding.is_primary():
    (tmp / AVERAGED_INFO).write_text(json.dumps(info, indent=2))
    if final.exists():
      final.rmtree()
    tmp.rename(final)
  sharding.barrier("mt_flax_averaged")
  return os.fspath(final)


def restore_averaged(workdir: str, placed: Optional[Any] = None) -> tuple[Any, dict]:
  """``(params, info)`` written by :func:`save_averaged` (placed as :func:`_targets` says)."""
  folder = _path(workdir) / AVERAGED_DIR
  if not (folder / AVERAGED_INFO).exists():
    raise CheckpointError(f"no averaged parameters in {workdir!r}; make them with "
                          f"`python -m mt_flax average --workdir {workdir} --last N`")
  info = json.loads((folder / AVERAGED_INFO).read_text())
  checkpointer = ocp.StandardCheckpointer()
  meta = checkpointer.metadata(folder / "params")
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  return checkpointer.restore(folder / "params", _targets(tree, placed)), info

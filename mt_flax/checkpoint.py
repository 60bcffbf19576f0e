"""Orbax checkpoints of a training run: save, exact resume, restore for inference.

``workdir/checkpoints/<step>/`` holds the items

- ``params``, ``opt_state``: the state arrays (saved asynchronously, sharded as trained);
- ``train``: ``{"step", "rng"}``;
- ``data``: the data-iterator state, one JSON file per process (Grain's handler);
- ``config``: the resolved config.

The manager keeps the last ``keep_checkpoints`` steps and the best step by the
validation metric ``best_metric`` (``best_mode`` "min" or "max"), which is
attached to the checkpoints saved right after validation.

A checkpoint that cannot be read (corrupt or partial) is reported, moved to
``workdir/checkpoints_unreadable/`` and the previous one is used.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Any, Optional

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocp_managers

from mt_flax import paths
from mt_flax.cli import UserError
from mt_flax.config import with_defaults

CHECKPOINT_DIR = "checkpoints"
UNREADABLE_DIR = "checkpoints_unreadable"
CONFIG_FILE = "config.json"


class _QuietOrbax(logging.Filter):
  """Drops Orbax warnings about things we do on purpose: checkpoints saved between
  validations carry no metrics; inference opens the directory read-only."""
  EXPECTED = ("did not provide metrics", "read_only=True", "directory is read only")

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(text in message for text in self.EXPECTED)


logging.getLogger("absl").addFilter(_QuietOrbax())


class CheckpointError(UserError, RuntimeError):
  """A checkpoint is missing or unusable; the message is one line for the user."""


class _IteratorState:
  """A data-iterator state captured when the save starts (Grain's handler reads it)."""

  def __init__(self, state: Optional[dict] = None):
    self.state = state

  def get_state(self) -> bytes:
    return json.dumps(self.state).encode()

  def set_state(self, state: bytes) -> None:
    self.state = json.loads(state)

  def start_prefetch(self) -> None:
    pass


_path = paths.as_path


def _metric_fn(best_metric: str, best_mode: str):
  worst = math.inf if best_mode == "min" else -math.inf
  def fn(metrics: dict) -> float:
    value = metrics.get(best_metric, worst) if isinstance(metrics, dict) else worst
    value = float(value)
    return worst if math.isnan(value) else value
  return fn


def make_manager(workdir: str, *, keep: int = 2, best_metric: str = "eval_loss",
                 best_mode: str = "min", async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """A ``CheckpointManager`` over ``workdir/checkpoints`` keeping the last ``keep`` and the best."""
  if best_mode not in ("min", "max"):
    raise ValueError(f"best_mode={best_mode!r}: expected 'min' or 'max'")
  metric_fn = _metric_fn(best_metric, best_mode)
  policy = ocp_managers.AnyPreservationPolicy([
      ocp_managers.LatestN(n=max(int(keep), 1)),
      ocp_managers.BestN(get_metric_fn=metric_fn, reverse=best_mode == "min", n=1,
                         keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      best_fn=metric_fn, best_mode=best_mode, preservation_policy=policy,
      enable_async_checkpointing=async_save, read_only=read_only, create=not read_only)
  directory = _path(workdir) / CHECKPOINT_DIR
  handlers = {"params": ocp.StandardCheckpointHandler(),
              "opt_state": ocp.StandardCheckpointHandler(),
              "train": ocp.StandardCheckpointHandler(),
              "data": grain.checkpoint.CheckpointHandler(),
              "config": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: Optional[dict],
         config: ml_collections.ConfigDict, metrics: Optional[dict] = None) -> None:
  """Starts saving ``state`` (a ``steps.TrainState``) at ``step``; returns once arrays are copied.

  ``data_state`` is this process's ``iterator.get_state()`` taken now.
  """
  args = ocp.args.Composite(
      params=ocp.args.StandardSave(state.params),
      opt_state=ocp.args.StandardSave(state.opt_state),
      train=ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
      data=grain.checkpoint.CheckpointSave(_IteratorState(data_state)),
      config=ocp.args.JsonSave(config.to_dict()))
  manager.save(step, args=args, metrics=metrics, force=True)


def _restore_step(manager: ocp.CheckpointManager, step: int, abstract_state: Any):
  args = ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_state.params),
      opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
      train=ocp.args.StandardRestore({"step": abstract_state.step, "rng": abstract_state.rng}),
      data=grain.checkpoint.CheckpointRestore(_IteratorState()))
  out = manager.restore(step, args=args)
  state = abstract_state.replace(params=out.params, opt_state=out.opt_state,
                                 step=out.train["step"], rng=out.train["rng"])
  if int(state.step) != step:
    raise ValueError(f"holds step {int(state.step)}, not {step}")
  return state, out.data.state


def _set_aside(manager: ocp.CheckpointManager, step: int) -> None:
  """Moves an unreadable step out of the manager's directory (kept for inspection)."""
  if jax.process_index() == 0:
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


def restore_latest_good(manager: ocp.CheckpointManager,
                        abstract_state: Any) -> Optional[tuple[Any, Optional[dict], int]]:
  """Restores the newest readable checkpoint into ``abstract_state``'s shapes and shardings.

  Returns ``(state, data_state, step)`` or None when there is no checkpoint.
  Unreadable newer steps are reported on stderr and set aside.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state, data_state = _restore_step(manager, step, abstract_state)
      return state, data_state, step
    except Exception as e:  # pylint: disable=broad-except  (any read failure: try older)
      reason = " ".join(str(e).split())[:300] or type(e).__name__
      print(f"mt_flax: checkpoint step {step} in {manager.directory} is unreadable "
            f"({type(e).__name__}: {reason}); moved to {UNREADABLE_DIR}/ and using the "
            "previous one", file=sys.stderr, flush=True)
      _set_aside(manager, step)
  return None


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config saved in ``workdir/config.json``."""
  path = _path(workdir) / CONFIG_FILE
  if not path.exists():
    raise CheckpointError(f"no {CONFIG_FILE} in workdir {workdir!r}; expected the workdir of a "
                          "`python -m mt_flax train` run")
  return with_defaults(json.loads(path.read_text()), os.fspath(path))


def restore_for_inference(workdir: str, which: str = "best"
                          ) -> tuple[ml_collections.ConfigDict, Any, int]:
  """Loads ``(config, params, step)`` from a training workdir for decoding on one device.

  ``which``: "best" (best validation metric; the latest if none was validated)
  or "latest". Params are a plain tree of arrays on the default device.
  """
  if which not in ("best", "latest"):
    raise ValueError(f"which={which!r}: expected 'best' or 'latest'")
  if not _path(workdir).is_dir():
    raise CheckpointError(f"workdir {workdir!r} does not exist; expected the workdir of a "
                          "`python -m mt_flax train` run")
  config = read_config(workdir)
  if not (_path(workdir) / CHECKPOINT_DIR).is_dir():
    raise CheckpointError(f"no checkpoints in workdir {workdir!r}; train first "
                          "(`python -m mt_flax train --workdir ...`)")
  manager = make_manager(workdir, best_metric=config.best_metric,
                         best_mode=config.best_mode, async_save=False,
                         read_only=True)
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    raise CheckpointError(f"no checkpoints in {manager.directory}; train first")
  first = manager.best_step() if which == "best" else steps[0]
  candidates = [first] + [s for s in steps if s != first]
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  errors = []
  for step in candidates:
    try:
      meta = manager.item_metadata(step)["params"].tree
      target = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
      params = manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(target))).params
      if errors:
        print(f"mt_flax: using checkpoint step {step} instead ({'; '.join(errors)})",
              file=sys.stderr, flush=True)
      return config, params, int(step)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(f"step {step} unreadable: {type(e).__name__}")
  raise CheckpointError(f"no readable checkpoint in {manager.directory} "
                        f"({'; '.join(errors)})")


# ----------------------------------------------------------------------------- averaged params

AVERAGED_DIR = "averaged"          # workdir/averaged/: params only, never a training state
AVERAGED_INFO = "averaged.json"    # which steps were averaged


def read_only_manager(workdir: str) -> ocp.CheckpointManager:
  """The run's checkpoint manager, opened read-only (for inference and averaging)."""
  if not (_path(workdir) / CHECKPOINT_DIR).is_dir():
    raise CheckpointError(f"no checkpoints in workdir {workdir!r}; train first "
                          "(`python -m mt_flax train --workdir ...`)")
  config = read_config(workdir)
  return make_manager(workdir, best_metric=config.best_metric, best_mode=config.best_mode,
                      async_save=False, read_only=True)


def restore_params(manager: ocp.CheckpointManager, step: int) -> Any:
  """The params of checkpoint ``step``, a plain tree of arrays on the default device."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  meta = manager.item_metadata(step)["params"].tree
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
  return manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(target))).params


def save_averaged(workdir: str, params: Any, info: dict) -> str:
  """Writes ``params`` and ``info`` to ``workdir/averaged/`` (replacing it); returns the path.

  Written to a temporary folder first and renamed, so a reader never sees half of it.
  """
  final = _path(workdir) / AVERAGED_DIR
  tmp = _path(workdir) / f"{AVERAGED_DIR}.tmp"
  if tmp.exists():
    tmp.rmtree()
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp / "params", params)
  checkpointer.wait_until_finished()
  (tmp / AVERAGED_INFO).write_text(json.dumps(info, indent=2))
  if final.exists():
    final.rmtree()
  tmp.rename(final)
  return os.fspath(final)


def restore_averaged(workdir: str) -> tuple[Any, dict]:
  """``(params, info)`` written by :func:`save_averaged`."""
  folder = _path(workdir) / AVERAGED_DIR
  if not (folder / AVERAGED_INFO).exists():
    raise CheckpointError(f"no averaged parameters in {workdir!r}; make them with "
                          f"`python -m mt_flax average --workdir {workdir} --last N`")
  info = json.loads((folder / AVERAGED_INFO).read_text())
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  meta = checkpointer.metadata(folder / "params")
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  return checkpointer.restore(folder / "params", target), info

"""Checkpoint averaging: the mean of the parameters of a run's last N checkpoints.

Vaswani et al. (2017) report their base and big models with the last 5 and 20
checkpoints averaged. The mean is taken in float32, leaf by leaf, and stored
in each parameter's own dtype in ``DIR/averaged/`` with ``averaged.json``
(the steps averaged). Only parameters are written there, apart from
``DIR/checkpoints/``, so a training run never resumes from them; ``eval``,
``translate`` and ``audit`` load them with ``--checkpoint averaged``. On a pod every
process reads and averages the params on the devices of
:func:`mt_flax.sharding.inference_partitioner` and Orbax writes them from all of them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mt_flax import checkpoint, sharding
from mt_flax.config import ConfigError


def mean_params(manager, steps: list[int]):
  """The float32 mean of the params of ``steps``, cast back to each leaf's own dtype.

  One checkpoint is in memory at a time, besides the running sum.
  """
  total, dtypes, placed = None, None, sharding.inference_partitioner().replicated
  for step in steps:
    params = checkpoint.restore_params(manager, step, placed)
    as_f32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    total = as_f32 if total is None else jax.tree.map(jnp.add, total, as_f32)
    if dtypes is None:
      dtypes = jax.tree.map(lambda x: x.dtype, params)
  return jax.tree.map(lambda t, dtype: (t / len(steps)).astype(dtype), total, dtypes)


def average_last(workdir: str, last: int) -> dict:
  """Averages the last ``last`` checkpoints of ``workdir`` into ``workdir/averaged/``.

  Returns the written info: ``{"steps": [...], "last": N, "path": ...}``.

  Raises:
    ConfigError: ``last`` < 1.
    checkpoint.CheckpointError: no workdir, or fewer than ``last`` checkpoints.
  """
  if last < 1:
    raise ConfigError(f"--last {last}: expected a number of checkpoints >= 1")
  manager = checkpoint.read_only_manager(workdir)
  steps = sorted(manager.all_steps())
  if len(steps) < last:
    raise checkpoint.CheckpointError(
        f"{workdir} has {len(steps)} checkpoint(s) (steps {', '.join(map(str, steps)) or 'none'})"
        f", fewer than --last {last}; train with keep_checkpoints >= {last}")
  chosen = steps[-last:]
  info = {"steps": [int(s) for s in chosen], "last": int(last)}
  info["path"] = checkpoint.save_averaged(workdir, mean_params(manager, chosen), info)
  return info

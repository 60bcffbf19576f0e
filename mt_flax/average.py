r"""Checkpoint averaging: the mean of the parameters of a run's last N checkpoints.

    python -m mt_flax average --workdir DIR [--last 5]
    python -m mt_flax eval --workdir DIR --checkpoint averaged

Vaswani et al. (2017) report their base and big models with the last 5 and 20
checkpoints averaged. The mean is taken in float32, leaf by leaf, and stored
in each parameter's own dtype in ``DIR/averaged/`` with ``averaged.json``
(the steps averaged). Only parameters are written there, apart from
``DIR/checkpoints/``, so a training run never resumes from them; ``eval``,
``translate`` and ``audit`` load them with ``--checkpoint averaged``.

Keep enough checkpoints while training (``keep_checkpoints`` >= N, with
``checkpoint_every_steps`` setting their spacing).
"""
from __future__ import annotations


import jax
import jax.numpy as jnp

from mt_flax import checkpoint, cli
from mt_flax.config import ConfigError


def average_last(workdir: str, last: int) -> dict:
  """Averages the last ``last`` checkpoints of ``workdir`` into ``workdir/averaged/``.

  Returns the written info: ``{"steps": [...], "last": N, "path": ...}``.

  Raises:
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
  total, first = None, None
  for step in chosen:                      # one checkpoint in memory at a time
    params = checkpoint.restore_params(manager, step)
    as_f32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    total = as_f32 if total is None else jax.tree.map(jnp.add, total, as_f32)
    if first is None:
      first = jax.tree.map(lambda x: x.dtype, params)
  averaged = jax.tree.map(lambda t, dtype: (t / len(chosen)).astype(dtype), total, first)
  info = {"steps": [int(s) for s in chosen], "last": int(last)}
  info["path"] = checkpoint.save_averaged(workdir, averaged, info)
  return info


def build_parser():
  parser = cli.new_parser("average", __doc__)
  parser.add_argument("--workdir", required=True, help="workdir of a training run (local or gs://)")
  parser.add_argument("--last", type=int, default=5,
                      help="average the last N checkpoints (default 5)")
  return parser


def run(args) -> int:
  info = average_last(args.workdir, args.last)
  print(f"averaged steps {', '.join(map(str, info['steps']))} into {info['path']}; use "
        f"--checkpoint averaged with eval, translate or audit")
  return 0


main = cli.entry("average", build_parser, run)

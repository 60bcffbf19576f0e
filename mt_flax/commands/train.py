r"""Train a model: ``python -m mt_flax train --config FILE --workdir DIR [--config.key=value ...]``.

Re-running the same command on an existing workdir resumes from its latest good
checkpoint, so the per-step losses continue exactly as if uninterrupted; on a
finished run it returns at once. SIGTERM (e.g. TPU preemption) saves a
checkpoint and exits with status 143; Ctrl-C does the same and exits with 130,
and a second Ctrl-C stops at once without saving. A non-finite loss or a failed
checkpoint save stops the run with status 1, the last good checkpoint intact.
A second run on the same workdir stops with status 75 (``train.lock``; retry later): at once
on a local workdir; on gs:// once it saw the holder's heartbeat advance (it takes over a lock
whose heartbeat stopped, see :mod:`mt_flax.workdir_lock`). A run whose lock was taken over
stops without saving, with status 77.

Errors reach the terminal as one line; tracebacks and third-party log output
(absl, Orbax, XLA) go to ``train.log`` in the workdir. Compiled programs are
kept in ``config.compilation_cache_dir`` (a ``gs://`` folder serves every host of
a pod and outlives the VMs), else ``$JAX_COMPILATION_CACHE_DIR``, else
``~/.cache/mt_flax/jax_compilation_cache``, so resumed and repeated runs skip compiling.
"""
from __future__ import annotations

import json
import sys

from mt_flax import cli, paths, train
from mt_flax.config import load_config
from mt_flax.errors import ConfigError, SaveFailed, TrainingDiverged, UserError
from mt_flax.runlog import LogRouting, failure_cause, log_path

def build_parser():
  parser = cli.new_parser("train", __doc__, config="required")
  parser.add_argument("--workdir", required=True,
                      help="where checkpoints, metrics and logs go (local or gs://); "
                           "re-running on it resumes")
  return parser


def run(args) -> int:
  config = train.resolve_config(load_config(args.config, args.overrides))  # before any write
  try:
    routing = LogRouting(log_path(args.workdir))
  except OSError as e:
    raise ConfigError(f"cannot write the log file in {args.workdir}: "
                      f"{failure_cause(e, args.workdir)}") from None
  with routing:
    return _train(config, args.workdir, routing)


def _train(config, workdir: str, routing: LogRouting) -> int:
  """Trains with output routed; every error is one line on the terminal (user errors through
  :func:`cli.entry`, the others here with a pointer to the log file)."""
  details = f"(details in {routing.path})"
  try:
    paths.use_compilation_cache(config)
    summary = train.train_and_evaluate(config, workdir)
  except (TrainingDiverged, SaveFailed) as e:
    routing.write_exception(type(e).__name__, e)
    print(f"mt_flax train: error: {e} {details}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("mt_flax train: interrupted before training started; nothing saved", file=sys.stderr)
    return train.INTERRUPTED_EXIT
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (one line here, traceback in the log)
    routing.write_exception("unexpected error", e)
    print(f"mt_flax train: error: {failure_cause(e, workdir)} {details}", file=sys.stderr)
    return 1
  if summary.get("preempted"):
    return train.INTERRUPTED_EXIT if summary["preempted"] == "SIGINT" else train.PREEMPTED_EXIT
  shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()}
  train.log("done: " + json.dumps(shown))
  return 0


main = cli.entry("train", build_parser, run)

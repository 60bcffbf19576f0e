"""The errors every layer raises. Each message is one line naming what was wrong and what was
expected; the command layer prints it and exits with the class's ``exit_code``: 2 for what
the user must fix, 75 (``EX_TEMPFAIL``) for a busy workdir (try again later), 77
(``EX_NOPERM``) for a run whose workdir lock another run took over (do not restart it: the
other run trains there now), 1 for a run that stopped (divergence, failed save)."""
from __future__ import annotations


class UserError(Exception):
  """Something the user can fix (a command line, config, data file or checkpoint)."""
  exit_code = 2


class ConfigError(UserError, ValueError):
  """A config file, variant or override is wrong."""


class IdleGpus(ConfigError):
  """A SLURM layout that leaves GPUs of a node unused (JAX gives each task one GPU)."""


class DataError(UserError, ValueError):
  """A dataset, data file or data path is missing or malformed."""


class CheckpointError(UserError, RuntimeError):
  """A checkpoint or workdir is missing or unusable."""


class VerificationError(CheckpointError):
  """A checkpoint read back differs from what was saved, or holds non-finite parameters."""


class WorkdirBusy(UserError, RuntimeError):
  """Another run holds the workdir's lock: retry later."""
  exit_code = 75


class WorkdirLost(UserError, RuntimeError):
  """Another run took over this run's workdir lock (its heartbeat stopped or could not be
  written): this run stopped without saving."""
  exit_code = 77


class TrainingDiverged(UserError, RuntimeError):
  """The loss or gradients became NaN/inf."""
  exit_code = 1


class SaveFailed(RuntimeError):
  """A checkpoint save failed (in the background or at the end)."""

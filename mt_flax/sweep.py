r"""Hyperparameter sweeps: config-override trials run one after another, resumable.

A sweep file defines ``get_sweep() -> list[dict]``; each dict maps config keys
(dotted, as on the command line) to values, e.g. ``{"learning_rate": 1e-3,
"model.d_model": 64}``. :func:`grid` builds the cartesian product of axes.
Every trial is validated against the config before any runs, then trained
with the real ``python -m mt_flax train`` in its own workdir
``<sweep dir>/trial_003_learning_rate=0.001,...``; the name follows from the
trial's index and overrides, so a re-run finds it again: finished trials are
skipped and an interrupted one resumes from its checkpoint. Base overrides
apply to every trial (trial overrides win). Shard ``(I, N)`` runs trials
``I, I+N, I+2N, ...`` only, to fan a sweep out over N machines sharing one
(``gs://``) sweep directory.

When a trial finishes, the sweep scores its best checkpoint with ``eval --split
validation`` on the whole validation split (``--rank-examples N``: its first N
pairs), with the run's own decoding settings. The results table (``results.csv``,
``results.md``) is sorted by that BLEU (``--rank-by bleu``, the default; trials not
yet scored go last) or by the best validation loss in each trial's
``metrics.jsonl`` (``--rank-by loss``; on ``data.eval_max_examples`` pairs, all by
default).
"""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Any, Iterable, Mapping, Sequence

from etils import epath

from mt_flax import compare, paths
from mt_flax.config import ConfigError, load_config
from mt_flax.errors import UserError
from mt_flax.metrics import read_metrics


class SweepError(UserError, ValueError):
  """A sweep file or sweep directory is wrong; the message is one line for the user."""


# ----------------------------------------------------------------------------- sweep files


def grid(axes: Mapping[str, Sequence[Any]] | None = None, **kwargs: Sequence[Any]) -> list[dict[str, Any]]:
  """Cartesian product of axes, first axis slowest.

  ``grid({"learning_rate": [1e-3, 3e-3], "model.d_model": [64, 128]})`` gives 4
  override dicts. Dotted keys go in the mapping; plain keys may be keywords.
  """
  axes = {**(axes or {}), **kwargs}
  for key, values in axes.items():
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
      raise SweepError(f"grid axis {key!r}: expected a non-empty list of values, got {values!r}")
  keys = list(axes)
  return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


def load_sweep(path: str) -> list[dict[str, Any]]:
  """Returns the trials (override dicts) of the sweep file ``path``."""
  if not os.path.isfile(path):
    raise SweepError(f"sweep file {path!r} not found; expected a Python file such as "
                     "experiments/sweeps/bible_tiny_lr.py")
  spec = importlib.util.spec_from_file_location("mt_flax_sweep_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise SweepError(f"sweep file {path!r} defines no get_sweep()")
  trials = module.get_sweep()
  if not isinstance(trials, list) or not trials:
    raise SweepError(f"get_sweep() in {path!r} must return a non-empty list of dicts, got {trials!r}")
  for i, trial in enumerate(trials):
    if not isinstance(trial, dict) or not all(isinstance(k, str) for k in trial):
      raise SweepError(f"get_sweep() in {path!r}: trial {i} is {trial!r}, expected a dict "
                       "of config keys to values")
  names = [trial_name(i, t) for i, t in enumerate(trials)]
  for i, trial in enumerate(trials):
    if trial in trials[:i]:
      raise SweepError(f"get_sweep() in {path!r}: trial {i} repeats trial {trials.index(trial)} "
                       f"({names[i]})")
  return trials


def format_value(value: Any) -> str:
  """The command-line text of an override value (parsed back by mt_flax.config)."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, str):
    return value
  return repr(value)


def override_args(overrides: Mapping[str, Any]) -> list[str]:
  """``{"model.d_model": 64}`` -> ``["--config.model.d_model=64"]``."""
  return [f"--config.{key}={format_value(value)}" for key, value in overrides.items()]


def trial_name(index: int, overrides: Mapping[str, Any]) -> str:
  """Deterministic workdir name, e.g. ``trial_003_learning_rate=0.001,model.d_model=64``."""
  text = ",".join(f"{key}={format_value(value)}" for key, value in overrides.items())
  text = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)
  if len(text) > 80:  # keep paths short; the hash keeps names distinct
    text = text[:71] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
  return f"trial_{index:03d}" + (f"_{text}" if text else "")


def shard_indices(num_trials: int, shard: tuple[int, int]) -> list[int]:
  """Trial indices of shard ``(i, n)``: ``i, i+n, i+2n, ...``."""
  i, n = shard
  return list(range(i, num_trials, n))


def parse_shard(text: str) -> tuple[int, int]:
  m = re.fullmatch(r"(\d+)/(\d+)", text)
  if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
    raise SweepError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
  return int(m.group(1)), int(m.group(2))


# ----------------------------------------------------------------------------- trial state


def _is_validation(row: Mapping[str, Any]) -> bool:
  return row.get("split") == "validation"


def _best(rows: Iterable[Mapping[str, Any]], key: str, mode: str) -> float | None:
  values = [float(r[key]) for r in rows if _is_validation(r) and isinstance(r.get(key), (int, float))
            and math.isfinite(float(r[key]))]
  if not values:
    return None
  return max(values) if mode == "max" else min(values)


def read_trial_file(workdir: epath.Path) -> dict[str, Any]:
  path = workdir / paths.TRIAL_FILE
  if not path.exists():
    return {}
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError:
    raise SweepError(f"{path}: not valid JSON; delete it to restart this trial's bookkeeping") from None


def wall_seconds(workdir: epath.Path, info: Mapping[str, Any]) -> float:
  """Summed wall time of the trial's attempts, each counted once.

  An attempt whose sweep was killed has no end: it counts up to the last metrics
  write, but never past the start of the next attempt (whose writes those may be).
  """
  total = 0.0
  metrics = workdir / paths.METRICS_FILE
  attempts = info.get("attempts", [])
  for attempt, following in zip(attempts, [*attempts[1:], None]):
    end = attempt.get("end")
    if end is None and metrics.exists():
      end = metrics.stat().mtime
    if end is not None and following is not None:
      end = min(end, following["start"])
    if end is not None:
      total += max(0.0, end - attempt["start"])
  return total


def trial_summary(workdir: epath.Path, num_train_steps: int) -> dict[str, Any]:
  """Status and results of one trial from its workdir.

  status: "finished" (the trainer's DONE marker is there and the metrics reached
  ``num_train_steps``, which a re-run with more steps raises), "failed" (the last
  attempt exited nonzero), "partial" (started, not done) or "pending" (never started).
  """
  rows = read_metrics(workdir)
  info = read_trial_file(workdir)
  steps = max((int(r["step"]) for r in rows), default=0)
  attempts = info.get("attempts", [])
  if (workdir / paths.DONE_FILE).exists() and steps >= num_train_steps:
    status = "finished"
  elif attempts and attempts[-1].get("rc") not in (None, 0):
    status = "failed"
  elif attempts or rows:
    status = "partial"
  else:
    status = "pending"
  report = ranking_report(workdir)
  return {
      "status": status,
      "steps": steps,
      "wall_s": wall_seconds(workdir, info),
      "best_bleu": _best(rows, "bleu", "max"),
      "best_eval_loss": _best(rows, "eval_loss", "min"),
      "val_bleu": report.get("bleu"),
      "val_pairs": report["table"][0]["examples"] if report else None,
  }


def ranking_report(workdir: epath.Path) -> dict[str, Any]:
  """``eval/validation/report.json`` of the trial, if ``eval`` scored its finished run."""
  path = workdir / paths.EVAL_DIR / "validation" / paths.REPORT_JSON
  done = workdir / paths.DONE_FILE
  if not path.exists() or not done.exists() or path.stat().mtime < done.stat().mtime:
    return {}                    # none, or older than the run's last training
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError:
    return {}


# ----------------------------------------------------------------------------- results table


RANK_BY = {"bleu": "val_bleu", "loss": "best_eval_loss"}


def rank_rows(rows: list[dict[str, Any]], rank_by: str = "bleu"
              ) -> tuple[str, list[dict[str, Any]]]:
  """Sorts rows by validation BLEU (descending) or best eval loss (ascending).

  Returns (the metric used, sorted rows); rows without the metric go last, in trial order.
  """
  if rank_by not in RANK_BY:
    raise SweepError(f"--rank-by {rank_by}: expected one of {', '.join(RANK_BY)}")
  metric = RANK_BY[rank_by]
  sign = -1.0 if metric == "val_bleu" else 1.0

  def key(row):
    value = row.get(metric)
    return (value is None, sign * value if value is not None else 0.0, row["trial"])

  return metric, sorted(rows, key=key)


def _fmt(value: Any, digits: int) -> str:
  return "" if value is None else f"{value:.{digits}f}"


def _fmt_wall(seconds: float) -> str:
  s = int(round(seconds))
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


COLUMNS = ["rank", "trial", "overrides", "status", "steps", "wall_s", "val_bleu", "val_pairs",
           "best_eval_loss", "vs_best", "workdir"]


def table_csv(rows: Sequence[Mapping[str, Any]]) -> str:
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
  writer.writeheader()
  for rank, row in enumerate(rows, 1):
    writer.writerow({**{c: row.get(c) for c in COLUMNS}, "rank": rank,
                     "overrides": json.dumps(row["overrides"]),
                     "wall_s": f"{row['wall_s']:.1f}",
                     "val_bleu": _fmt(row.get("val_bleu"), 2),
                     "best_eval_loss": _fmt(row["best_eval_loss"], 4),
                     "vs_best": row.get("vs_best", "")})
  return out.getvalue()


def table_markdown(metric: str, rows: Sequence[Mapping[str, Any]], base: Sequence[str] = ()) -> str:
  by = ("validation BLEU of the best checkpoint (higher is better)" if metric == "val_bleu"
        else "best validation loss during training (lower is better)")
  common = [f"Every trial also had: `{' '.join(base)}`.", ""] if base else []
  lines = [f"Sweep results, sorted by {by}. val BLEU: `eval --split validation` of the best "
           "checkpoint on the pairs counted. vs best: among the trials it scored, `best` has "
           "the highest BLEU and `tie` marks those not significantly different from it "
           "(paired bootstrap, p >= 0.05).", "", *common,
           "| rank | trial | overrides | status | steps | wall time | val BLEU (pairs) "
           "| best eval loss | vs best |", "|---:|---|---|---|---:|---:|---:|---:|---|"]
  for rank, row in enumerate(rows, 1):
    overrides = ", ".join(f"{k}={format_value(v)}" for k, v in row["overrides"].items())
    bleu = (f"{row['val_bleu']:.2f} ({row['val_pairs']})" if row.get("val_bleu") is not None
            else "-")
    lines.append(f"| {rank} | {row['trial']} | {overrides} | {row['status']} | {row['steps']} | "
                 f"{_fmt_wall(row['wall_s'])} | {bleu} | "
                 f"{_fmt(row['best_eval_loss'], 4) or '-'} | {row.get('vs_best') or '-'} |")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- running


def _die_with_parent() -> None:
  """In the child: get SIGTERM (save and exit) if the sweep process dies, even by SIGKILL."""
  try:
    import ctypes
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass  # not Linux: a killed sweep leaves its trainer running


def run_trial(config_path: str, workdir: epath.Path, args: Sequence[str]) -> int:
  """Runs ``python -m mt_flax train`` for one trial and records the attempt; returns its exit code.

  SIGTERM to the sweep is passed on to the trainer (which checkpoints), then the sweep stops.
  """
  info = read_trial_file(workdir)
  attempt = {"start": time.time(), "end": None, "rc": None}
  info.setdefault("attempts", []).append(attempt)
  (workdir / paths.TRIAL_FILE).write_text(json.dumps(info, indent=1))
  cmd = [sys.executable, "-m", "mt_flax", "train", "--config", config_path, "--workdir",
         os.fspath(workdir), *args]
  print("[sweep] $ " + shlex.join(cmd), flush=True)
  proc = subprocess.Popen(cmd, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
  terminated = []

  def forward(signum, frame):
    terminated.append(signum)
    proc.send_signal(signum)

  previous = signal.signal(signal.SIGTERM, forward)
  try:
    rc = proc.wait()
  except KeyboardInterrupt:  # Ctrl-C reaches the trainer too (same process group): let it exit
    rc = proc.wait()
    terminated.append(signal.SIGINT)
  finally:
    signal.signal(signal.SIGTERM, previous)
  attempt.update(end=time.time(), rc=rc)
  (workdir / paths.TRIAL_FILE).write_text(json.dumps(info, indent=1))
  if terminated:
    raise KeyboardInterrupt
  return rc


def collect(sweep_dir: epath.Path, trials: Sequence[Mapping[str, Any]],
            steps: Sequence[int]) -> list[dict[str, Any]]:
  """One summary row per trial (pending ones included)."""
  rows = []
  for i, overrides in enumerate(trials):
    name = trial_name(i, overrides)
    workdir = sweep_dir / name
    rows.append({"trial": name, "overrides": dict(overrides), "workdir": os.fspath(workdir),
                 **trial_summary(workdir, steps[i])})
  return rows


def write_table(sweep_dir: epath.Path, rows: list[dict[str, Any]], base: Sequence[str] = (),
                rank_by: str = "bleu") -> str:
  """Writes ``results.csv`` and ``results.md``; returns the markdown."""
  metric, ranked = rank_rows(rows, rank_by)
  try:
    marks = compare.run_tie_marks({r["trial"]: r["workdir"] for r in ranked}, "validation")
  except compare.CompareError as e:
    print(f"[sweep] no significance marks: {e}", file=sys.stderr)
    marks = {}
  for row in ranked:
    row["vs_best"] = marks.get(row["trial"], "")
  md = table_markdown(metric, ranked, base)
  (sweep_dir / paths.RESULTS_CSV).write_text(table_csv(ranked))
  (sweep_dir / paths.RESULTS_MD).write_text(md)
  return md


def default_sweep_dir(config_path: str, sweep_path: str) -> str:
  stem = lambda p: os.path.splitext(os.path.basename(p))[0]
  return os.path.join("runs", "sweeps", f"{stem(config_path)}-{stem(sweep_path)}")


def config_digest(path: str) -> str:
  """sha256 of a config file: every trial of one sweep trains with the same file."""
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def check_same_config(sweep_dir: epath.Path, config_path: str, digest: str) -> None:
  """Refuses to go on with a sweep whose config file changed since it started."""
  saved = sweep_dir / paths.SWEEP_FILE
  old = json.loads(saved.read_text()).get("config_sha256") if saved.exists() else None
  if old and old != digest:
    raise SweepError(f"{config_path} changed since the sweep in {sweep_dir} started, so new "
                     "trials would not be comparable with the old ones; restore the file or "
                     "use a new --workdir")


def run_trials(config_path: str, base: Sequence[str], trials: Sequence[Mapping[str, Any]],
               steps: Sequence[int], sweep_dir: epath.Path, digest: str, *,
               shard: tuple[int, int] = (0, 1), writer: bool = True,
               rank_examples: int | None = 0) -> list[str]:
  """Runs shard ``shard``'s unfinished trials in order; returns the names of those that failed.

  ``writer``: whether this process keeps the books (trial files) and scores finished
  trials on ``rank_examples`` validation pairs (0 = all; None = no scoring); on a TPU
  pod only host 0 does, the other hosts just run the trainer.
  """
  failed = []
  mine = shard_indices(len(trials), shard)
  print(f"[sweep] {len(trials)} trials in {sweep_dir}; this run takes {len(mine)} of them "
        f"(shard {shard[0]}/{shard[1]})", flush=True)
  for n, i in enumerate(mine, 1):
    name = trial_name(i, trials[i])
    workdir = sweep_dir / name
    summary = trial_summary(workdir, steps[i])
    if summary["status"] == "finished":
      print(f"[sweep] ({n}/{len(mine)}) {name}: finished at step {summary['steps']}, skipped",
            flush=True)
      if writer and rank_examples is not None and not ranking_report(workdir):
        failed += score_trial(workdir, name, rank_examples)
      continue
    if config_digest(config_path) != digest:
      raise SweepError(f"{config_path} changed while the sweep was running; stopped before "
                       f"{name} (restore the file and re-run, or use a new --workdir)")
    verb = "resuming" if summary["status"] in ("partial", "failed") else "starting"
    print(f"[sweep] ({n}/{len(mine)}) {name}: {verb}", flush=True)
    workdir.mkdir(parents=True, exist_ok=True)
    args_i = [*base, *override_args(trials[i])]
    rc = run_trial(config_path, workdir, args_i) if writer else subprocess.call(
        [sys.executable, "-m", "mt_flax", "train", "--config", config_path,
         "--workdir", os.fspath(workdir), *args_i])
    if rc != 0:
      print(f"[sweep] {name} failed (exit code {rc}); continuing with the next trial",
            file=sys.stderr)
      failed.append(name)
    elif writer and rank_examples is not None:
      failed += score_trial(workdir, name, rank_examples)
  return failed


def score_trial(workdir: epath.Path, name: str, examples: int) -> list[str]:
  """``eval --split validation`` of a finished trial (its first ``examples`` pairs; 0 = all),
  for the ranking; returns ``[name]`` when it failed."""
  cmd = [sys.executable, "-m", "mt_flax", "eval", "--workdir", os.fspath(workdir),
         "--split", "validation", "--max-examples", str(examples), "--long-examples", "0"]
  print("[sweep] $ " + shlex.join(cmd), flush=True)
  rc = subprocess.call(cmd, stdout=subprocess.DEVNULL)
  if rc != 0:
    print(f"[sweep] scoring {name} failed (exit code {rc})", file=sys.stderr)
    return [name]
  return []


def trial_steps(config_path: str, sweep_path: str, trials: Sequence[Mapping[str, Any]],
                base: Sequence[str]) -> list[int]:
  """``num_train_steps`` of every trial; loading each trial's config checks its overrides
  before any trial runs."""
  steps = []
  for i, overrides in enumerate(trials):
    try:
      steps.append(int(load_config(config_path, [*base, *override_args(overrides)]).num_train_steps))
    except ConfigError as e:
      raise SweepError(f"{sweep_path}: trial {i} ({trial_name(i, overrides)}): {e}") from None
  return steps


def _write_sweep_file(sweep_dir: epath.Path, config_path: str, digest: str, sweep_path: str,
                      base: Sequence[str], trials: Sequence[Mapping[str, Any]]) -> None:
  (sweep_dir / paths.SWEEP_FILE).write_text(json.dumps(
      {"config": config_path, "config_sha256": digest, "sweep": sweep_path,
       "base_overrides": list(base),
       "trials": [{"name": trial_name(i, t), "overrides": t} for i, t in enumerate(trials)]},
      indent=1, default=repr))


def run_sweep(config_path: str, sweep_path: str, *, sweep_dir: str | None = None,
              base: Sequence[str] = (), shard: tuple[int, int] = (0, 1),
              table_only: bool = False, writer: bool = True, rank_by: str = "bleu",
              rank_examples: int = 0) -> list[str]:
  """Runs (or, with ``table_only``, only tabulates) a sweep; returns the names of failed trials.

  ``sweep_dir`` defaults to :func:`default_sweep_dir`; ``base`` are
  ``--config.KEY=VALUE`` overrides for every trial. The writer prints and
  writes the results table at the end. A SIGTERM or Ctrl-C while a trial
  runs raises KeyboardInterrupt once the trainer has exited.
  """
  rank_rows([], rank_by)                      # a wrong --rank-by stops before anything runs
  if rank_examples < 0:
    raise SweepError(f"--rank-examples {rank_examples}: expected an integer >= 0 (0 = all)")
  trials = load_sweep(sweep_path)
  steps = trial_steps(config_path, sweep_path, trials, base)
  folder = paths.as_path(sweep_dir or default_sweep_dir(config_path, sweep_path))
  digest = config_digest(config_path)
  failed = []
  if not table_only:
    check_same_config(folder, config_path, digest)
    folder.mkdir(parents=True, exist_ok=True)
    if writer:
      _write_sweep_file(folder, config_path, digest, sweep_path, base, trials)
    failed = run_trials(config_path, base, trials, steps, folder, digest, shard=shard,
                        writer=writer, rank_examples=rank_examples if rank_by == "bleu" else None)
  if writer:
    folder.mkdir(parents=True, exist_ok=True)
    print(write_table(folder, collect(folder, trials, steps), base, rank_by), end="")
    print(f"[sweep] table written to {folder / paths.RESULTS_MD} and {folder / paths.RESULTS_CSV}")
  return failed

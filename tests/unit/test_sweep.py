"""Sweep machinery without training: grid expansion, naming, trial state, table, skip logic."""
import csv
import io
import json
import os
import re

import pytest
from etils import epath

from mt_flax import paths, sweep
from mt_flax.commands import sweep as sweep_command
from mt_flax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "experiments", "bible_en_es_tiny.py")


def write_sweep(tmp_path, body: str) -> str:
  path = tmp_path / "my_sweep.py"
  path.write_text(body)
  return str(path)


def write_metrics(workdir, rows) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def test_grid_is_the_cartesian_product_first_axis_slowest():
  trials = sweep.grid({"learning_rate": [1e-3, 3e-3], "model.d_model": [64, 128, 256]}, seed=[0])
  assert len(trials) == 6
  assert trials[0] == {"learning_rate": 1e-3, "model.d_model": 64, "seed": 0}
  assert trials[1] == {"learning_rate": 1e-3, "model.d_model": 128, "seed": 0}
  assert trials[3] == {"learning_rate": 3e-3, "model.d_model": 64, "seed": 0}
  assert len({json.dumps(t, sort_keys=True) for t in trials}) == 6


@pytest.mark.parametrize("axes", [{"learning_rate": []}, {"learning_rate": 1e-3}, {"data.name": "bible"}])
def test_grid_rejects_axes_that_are_not_lists(axes):
  with pytest.raises(sweep.SweepError, match="expected a non-empty list"):
    sweep.grid(axes)


def test_shipped_sweep_files_load_and_validate_against_the_config():
  sweeps_dir = os.path.join(ROOT, "experiments", "sweeps")
  files = sorted(f for f in os.listdir(sweeps_dir) if f.endswith(".py"))
  assert "bible_tiny_lr.py" in files
  for name in files:
    trials = sweep.load_sweep(os.path.join(sweeps_dir, name))
    for trial in trials:
      cfg = load_config(CONFIG, sweep.override_args(trial))
      for key, value in trial.items():
        node = cfg
        for part in key.split("."):
          node = node[part]
        assert node == value, (name, key)
  assert len(sweep.load_sweep(os.path.join(sweeps_dir, "bible_tiny_lr.py"))) == 4


def test_override_args_round_trip_through_the_config_parser():
  trial = {"learning_rate": 0.0003, "model.d_model": 96, "model.pre_ln": False,
           "schedule": "cosine", "data.max_len": 64}
  cfg = load_config(CONFIG, sweep.override_args(trial))
  assert cfg.learning_rate == 0.0003 and cfg.model.d_model == 96 and cfg.model.pre_ln is False
  assert cfg.schedule == "cosine" and cfg.data.max_len == 64


@pytest.mark.parametrize("body, message", [
    ("x = 1\n", "defines no get_sweep"),
    ("def get_sweep():\n  return []\n", "non-empty list"),
    ("def get_sweep():\n  return [{'learning_rate': 1e-3}, 5]\n", "trial 1 is 5"),
    ("def get_sweep():\n  return [{'seed': 1}, {'seed': 2}, {'seed': 1}]\n", "trial 2 repeats trial 0"),
])
def test_bad_sweep_files_are_one_line_errors(tmp_path, body, message):
  with pytest.raises(sweep.SweepError, match=message):
    sweep.load_sweep(write_sweep(tmp_path, body))


def test_missing_sweep_file():
  with pytest.raises(sweep.SweepError, match="not found"):
    sweep.load_sweep("/nonexistent/sweep.py")


def test_trial_names_are_deterministic_safe_and_distinct():
  a = sweep.trial_name(3, {"learning_rate": 0.001, "model.d_model": 64})
  assert a == "trial_003_learning_rate=0.001,model.d_model=64"
  assert sweep.trial_name(3, {"learning_rate": 0.001, "model.d_model": 64}) == a
  assert sweep.trial_name(0, {}) == "trial_000"
  odd = sweep.trial_name(1, {"data.name": "wmt14_translate/de-en", "mesh": {"data": -1}})
  assert "/" not in odd and " " not in odd and "{" not in odd
  long_a = sweep.trial_name(2, {f"key{i}": "x" * 20 for i in range(5)})
  long_b = sweep.trial_name(2, {f"key{i}": "x" * 20 + ("y" if i == 4 else "") for i in range(5)})
  assert len(long_a) <= 90 and len(long_b) <= 90 and long_a != long_b


def test_shards_partition_the_trials():
  seen = []
  for i in range(3):
    seen += sweep.shard_indices(7, sweep.parse_shard(f"{i}/3"))
  assert sorted(seen) == list(range(7))
  for bad in ("3/3", "1", "a/b", "0/0"):
    with pytest.raises(sweep.SweepError, match="expected I/N"):
      sweep.parse_shard(bad)


def test_trial_status_from_the_workdir(tmp_path):
  wd = epath.Path(tmp_path / "t")
  assert sweep.trial_summary(wd, 100)["status"] == "pending"
  write_metrics(wd, [{"step": 25, "loss": 5.0}, {"step": 50, "loss": 4.0},
                     {"step": 50, "split": "validation", "eval_loss": 4.2, "bleu": 1.5},
                     {"step": 75, "loss": 3.5}])
  with open(wd / "metrics.jsonl", "a") as f:
    f.write('{"step": 100, "lo')  # torn last line of a killed run
  s = sweep.trial_summary(wd, 100)
  assert s["status"] == "partial" and s["steps"] == 75
  assert s["best_bleu"] == 1.5 and s["best_eval_loss"] == 4.2
  (wd / paths.TRIAL_FILE).write_text(json.dumps({"attempts": [{"start": 0, "end": 10, "rc": 1}]}))
  assert sweep.trial_summary(wd, 100)["status"] == "failed"
  assert sweep.trial_summary(wd, 75)["status"] == "failed"     # steps reached, no DONE marker
  (wd / paths.DONE_FILE).write_text("")
  assert sweep.trial_summary(wd, 75)["status"] == "finished"   # the trainer's marker
  assert sweep.trial_summary(wd, 100)["status"] == "failed"    # more steps asked for: resume


def test_best_metrics_and_wall_time(tmp_path):
  wd = epath.Path(tmp_path / "t")
  write_metrics(wd, [
      {"step": 10, "split": "validation", "eval_loss": 3.0, "bleu": 2.0},
      {"step": 20, "split": "validation", "eval_loss": 2.5, "bleu": 4.0},
      {"step": 30, "split": "validation", "eval_loss": 2.7, "bleu": 3.0},
      {"step": 30, "loss": 0.1, "bleu": 99.0},  # not a validation line
  ])
  (wd / paths.TRIAL_FILE).write_text(json.dumps({"attempts": [
      {"start": 100.0, "end": 160.0, "rc": -9}, {"start": 200.0, "end": 230.5, "rc": 0}]}))
  s = sweep.trial_summary(wd, 30)
  assert s["best_bleu"] == 4.0 and s["best_eval_loss"] == 2.5
  assert s["wall_s"] == pytest.approx(90.5)
  # the sweep was killed during the first attempt (no end), then re-run: the metrics file
  # was last written by the second attempt, which the first must not count again
  os.utime(wd / paths.METRICS_FILE, (250.0, 250.0))
  (wd / paths.TRIAL_FILE).write_text(json.dumps({"attempts": [
      {"start": 100.0, "end": None, "rc": None}, {"start": 200.0, "end": 250.0, "rc": 0}]}))
  assert sweep.trial_summary(wd, 30)["wall_s"] == pytest.approx(150.0)
  (wd / paths.TRIAL_FILE).write_text(json.dumps({"attempts": [
      {"start": 200.0, "end": None, "rc": None}]}))                 # still running or killed
  assert sweep.trial_summary(wd, 30)["wall_s"] == pytest.approx(50.0)


def rows_for_table():
  def row(name, bleu, loss, status="finished"):
    return {"trial": name, "overrides": {"learning_rate": 0.001}, "status": status, "steps": 30,
            "wall_s": 61.0, "best_bleu": None, "val_bleu": bleu, "val_pairs": 1000,
            "best_eval_loss": loss, "workdir": "/x/" + name}
  return [row("trial_000", 3.0, 2.0), row("trial_001", None, None, "pending"),
          row("trial_002", 7.5, 2.4), row("trial_003", 5.0, 1.9)]


def test_table_is_sorted_by_validation_bleu_or_by_loss():
  metric, ranked = sweep.rank_rows(rows_for_table())
  assert metric == "val_bleu"
  assert [r["trial"] for r in ranked] == ["trial_002", "trial_003", "trial_000", "trial_001"]
  assert "| 7.50 (1000) |" in sweep.table_markdown(metric, ranked)
  metric, ranked = sweep.rank_rows(rows_for_table(), "loss")
  assert metric == "best_eval_loss"
  assert [r["trial"] for r in ranked] == ["trial_003", "trial_000", "trial_002", "trial_001"]
  md = sweep.table_markdown(metric, ranked)
  assert "sorted by best validation loss" in md
  assert md.splitlines()[4].startswith("| 1 | trial_003 | learning_rate=0.001 | finished | 30 | 0:01:01 |")
  with pytest.raises(sweep.SweepError, match="--rank-by chrf: expected one of bleu, loss"):
    sweep.rank_rows(rows_for_table(), "chrf")


def test_csv_has_every_trial_with_its_overrides():
  metric, ranked = sweep.rank_rows(rows_for_table())
  rows = list(csv.DictReader(io.StringIO(sweep.table_csv(ranked))))
  assert [r["trial"] for r in rows] == ["trial_002", "trial_003", "trial_000", "trial_001"]
  assert rows[0]["rank"] == "1" and rows[0]["val_bleu"] == "7.50"
  assert json.loads(rows[0]["overrides"]) == {"learning_rate": 0.001}
  assert rows[3]["val_bleu"] == "" and rows[3]["status"] == "pending"


def test_ranking_reads_the_validation_report_of_the_finished_run(tmp_path):
  wd = epath.Path(tmp_path / "t")
  write_metrics(wd, [{"step": 30, "split": "validation", "eval_loss": 2.0, "bleu": 9.0}])
  report = wd / paths.EVAL_DIR / "validation" / paths.REPORT_JSON
  report.parent.mkdir(parents=True)
  report.write_text(json.dumps({"bleu": 12.5, "table": [{"name": "all", "examples": 1000}]}))
  (wd / paths.DONE_FILE).write_text("")
  os.utime(report, (100.0, 100.0))
  os.utime(wd / paths.DONE_FILE, (200.0, 200.0))      # trained again after the report
  assert sweep.trial_summary(wd, 30)["val_bleu"] is None
  os.utime(report, (300.0, 300.0))
  s = sweep.trial_summary(wd, 30)
  assert (s["val_bleu"], s["val_pairs"], s["best_bleu"]) == (12.5, 1000, 9.0)


def test_config_typo_in_a_trial_stops_the_sweep_before_anything_runs(tmp_path, capsys):
  path = write_sweep(tmp_path, "def get_sweep():\n"
                     "  return [{'learning_rate': 1e-3}, {'model.d_modle': 64}]\n")
  rc = sweep_command.main([CONFIG, path, "--workdir", str(tmp_path / "sw")])
  err = capsys.readouterr().err
  assert rc == 2
  assert "trial 1" in err and "model.d_modle" in err and "model.d_model" in err
  assert len(err.strip().splitlines()) == 1
  assert not (tmp_path / "sw").exists()


def test_finished_trials_are_skipped_and_the_table_written(tmp_path, capsys):
  path = write_sweep(tmp_path, "from mt_flax.sweep import grid\n"
                     "def get_sweep():\n  return grid({'learning_rate': [1e-3, 2e-3], 'seed': [0, 1]})\n")
  sweep_dir = tmp_path / "sw"
  trials = sweep.load_sweep(path)
  for i, trial in enumerate(trials):  # all finished: 20 steps each, the base override below
    workdir = sweep_dir / sweep.trial_name(i, trial)
    write_metrics(workdir, [{"step": 20, "loss": 1.0},
                            {"step": 20, "split": "validation", "eval_loss": 3.0 - i / 10}])
    (workdir / paths.DONE_FILE).write_text("")
  rc = sweep_command.main([CONFIG, path, "--workdir", str(sweep_dir), "--rank-by", "loss",
                           "--config.num_train_steps=20"])
  out = capsys.readouterr().out
  assert rc == 0
  assert out.count("finished at step 20, skipped") == 4 and "$ " not in out
  md = (sweep_dir / "results.md").read_text()
  assert md in out and "Every trial also had: `--config.num_train_steps=20`." in md
  assert md.index("trial_003") < md.index("trial_002") < md.index("trial_000")
  saved = json.loads((sweep_dir / "sweep.json").read_text())
  assert saved["base_overrides"] == ["--config.num_train_steps=20"] and len(saved["trials"]) == 4


def test_table_only_shows_pending_trials(tmp_path, capsys):
  path = write_sweep(tmp_path, "def get_sweep():\n  return [{'seed': 1}, {'seed': 2}]\n")
  rc = sweep_command.main([CONFIG, path, "--workdir", str(tmp_path / "sw"), "--table-only"])
  out = capsys.readouterr().out
  assert rc == 0 and out.count("| pending |") == 2
  assert (tmp_path / "sw" / "results.csv").exists()


def test_a_sweep_refuses_a_config_file_changed_since_it_started(tmp_path, capsys):
  config = tmp_path / "config.py"
  config.write_text(open(CONFIG).read())
  path = write_sweep(tmp_path, "def get_sweep():\n  return [{'seed': 1}]\n")
  sweep_dir = tmp_path / "sw"
  workdir = sweep_dir / sweep.trial_name(0, {"seed": 1})
  write_metrics(workdir, [{"step": 20, "loss": 1.0}])
  (workdir / paths.DONE_FILE).write_text("")
  argv = [str(config), path, "--workdir", str(sweep_dir), "--rank-by", "loss",
          "--config.num_train_steps=20"]
  assert sweep_command.main(argv) == 0
  changed = re.sub(r"warmup_steps=(\d+)", lambda m: f"warmup_steps={int(m.group(1)) + 1}",
                   config.read_text(), count=1)
  assert changed != config.read_text()
  config.write_text(changed)
  capsys.readouterr()
  assert sweep_command.main(argv) == 2
  assert "changed since the sweep" in capsys.readouterr().err
  assert sweep_command.main([*argv, "--table-only"]) == 0  # reading the results is still fine


def test_a_config_changed_mid_sweep_stops_before_the_next_trial(tmp_path):
  path = write_sweep(tmp_path, "def get_sweep():\n  return [{'seed': 1}]\n")
  with pytest.raises(sweep.SweepError, match="changed while the sweep was running"):
    sweep.run_trials(CONFIG, [], sweep.load_sweep(path), [10], epath.Path(tmp_path / "sw"),
                     digest="0" * 64, writer=True)
  assert not (tmp_path / "sw").exists()  # nothing was started


def test_table_marks_trials_not_significantly_worse_than_the_best(tmp_path):
  """Trials that ``eval --split validation`` scored get ``best``/``tie`` by paired bootstrap;
  a clearly worse one gets no mark, an unscored one a dash."""
  words = "the cat sees a small red house near the old river and the big tree".split()
  refs = [" ".join(words[i % 7:i % 7 + 6 + i % 5]) for i in range(80)]
  systems = {"trial_000": refs,                                           # perfect
             "trial_001": [r.replace("red", "blue") if i == 3 else r for i, r in enumerate(refs)],
             "trial_002": ["a tree" for _ in refs]}                          # far worse
  rows = []
  for name, hyps in (*systems.items(), ("trial_003", None)):
    folder = tmp_path / name / "eval" / "validation"
    folder.mkdir(parents=True)
    if hyps is not None:
      (folder / "validation.hyp.txt").write_text("\n".join(hyps) + "\n")
      (folder / "validation.ref.txt").write_text("\n".join(refs) + "\n")
    rows.append({"trial": name, "overrides": {"seed": len(rows)}, "status": "finished",
                 "steps": 30, "wall_s": 10.0, "val_bleu": 10.0 - len(rows), "val_pairs": 80,
                 "best_eval_loss": 2.0, "workdir": str(tmp_path / name)})
  md = sweep.write_table(epath.Path(tmp_path), rows)
  marks = {line.split(" | ")[1]: line.rstrip(" |").split(" | ")[-1]
           for line in md.splitlines() if line.startswith("| ") and "trial_" in line}
  assert marks == {"trial_000": "best", "trial_001": "tie", "trial_002": "-", "trial_003": "-"}
  table = list(csv.DictReader(io.StringIO((tmp_path / "results.csv").read_text())))
  assert [r["vs_best"] for r in table] == ["best", "tie", "", ""]

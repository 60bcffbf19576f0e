"""Configs are checked before anything is written: a refused command leaves the workdir as it
was, so the corrected command then works on the same workdir."""
import os
import subprocess
import sys

import pytest

from mt_flax import train, workdir_lock
from mt_flax.commands import train as train_command
from mt_flax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "experiments", "bible_en_es_tiny.py") + ":test"


def refused(argv, capsys) -> str:
  """The one error line of ``mt_flax train argv`` (exit status 2; warnings may precede it)."""
  code = train_command.main(argv)
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and err[-1].startswith("mt_flax train: error:"), err
  assert not any("Traceback" in line or "error" in line for line in err[:-1]), err
  return err[-1]


@pytest.mark.parametrize("override, expected", [
    ("model.num_heads=3", "model.d_model=32 must be divisible by model.num_heads=3"),
    ("mesh.data=3", "uses 3 devices; expected 8"),
    ("mesh.fsdp=3", "8 devices are not divisible by 3"),
    ("data.vocab_size=1", "data.vocab_size=1: expected more than 4"),
    ("data.max_len=1", "data.max_len=1: expected at least 2"),
    ("data.prefetch=-1", "data.prefetch=-1: expected 0 (off) or a positive integer"),
])
def test_structural_errors_are_refused_before_the_workdir_is_made(tmp_path, capsys, override,
                                                                   expected):
  workdir = tmp_path / "run"
  assert expected in refused(["--config", CONFIG, "--workdir", str(workdir),
                              f"--config.{override}"], capsys)
  assert not workdir.exists()


def test_a_config_file_that_raises_is_one_line_naming_file_and_line(tmp_path, capsys):
  path = tmp_path / "broken.py"
  path.write_text("def get_config():\n  sizes = {}\n  return sizes['d_model']\n")
  line = refused(["--config", str(path), "--workdir", str(tmp_path / "run")], capsys)
  assert f"{path}' line 3: get_config() raised KeyError: 'd_model'" in line
  assert not (tmp_path / "run").exists()


def test_limits_found_in_the_data_leave_no_config_behind(tmp_path, tiny_training, capsys):
  """A max_len no pair fits, and a vocabulary smaller than the data's characters: refused
  before config.json is written; the workdir then takes the corrected settings."""
  workdir = tiny_training.new_workdir(tmp_path, "run")
  line = refused(["--config", CONFIG, "--workdir", workdir, "--config.data.max_len=2"], capsys)
  assert "data.max_len=2" in line
  assert not os.path.exists(os.path.join(workdir, "config.json"))
  fresh = str(tmp_path / "fresh")
  line = refused(["--config", CONFIG, "--workdir", fresh, "--config.data.vocab_size=10"], capsys)
  assert "data.vocab_size=10: expected at least" in line
  assert not {"config.json", "tokenizer"} & set(os.listdir(fresh))
  for folder in (workdir, fresh):   # the settings check of the corrected command passes
    train.write_run_info(folder, train.resolve_config(load_config(CONFIG)), write=False)


def test_a_busy_workdir_exits_75_a_config_error_2(tmp_path, capsys):
  """A scheduler retries 75 (EX_TEMPFAIL) later; 2 needs a corrected command."""
  workdir = str(tmp_path / "run")
  with workdir_lock.hold(workdir):
    assert train_command.main(["--config", CONFIG, "--workdir", workdir]) == 75
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"mt_flax train: error: workdir {workdir} is in use by another run")
    assert train_command.main(["--config", CONFIG, "--workdir", workdir,
                               "--config.model.num_heads=3"]) == 2
  assert not os.path.exists(os.path.join(workdir, "config.json"))


def test_warnings_are_one_line_each_and_third_party_ones_hidden(tmp_path):
  """Importing Orbax puts a plain stderr handler on the root logger; a command replaces it:
  mt_flax's warnings in one format, gcsfs's and absl's only with --verbose."""
  script = (
      "import logging, sys, orbax.checkpoint\n"
      "from mt_flax import cli\n"
      "def run(args):\n"
      "  logging.getLogger('gcsfs').warning('gcsfs noise')\n"
      "  logging.getLogger('absl').warning('absl noise')\n"
      "  logging.getLogger('mt_flax.data.pipeline').warning('dropped 3 pairs')\n"
      "main = cli.entry('demo', lambda: cli.new_parser('demo'), run)\n"
      "main([])\n"
      "print('--', file=sys.stderr)\n"
      "main(['--verbose'])\n")
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                        timeout=120)
  quiet, loud = done.stderr.split("--\n")
  assert done.returncode == 0 and quiet == "mt_flax.data.pipeline: warning: dropped 3 pairs\n"
  assert "gcsfs: warning: gcsfs noise" in loud and "absl noise" in loud
  assert loud.count("dropped 3 pairs") == 1

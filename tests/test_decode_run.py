"""A tiny trained Bible run, made once per test session with the real `python -m mt_flax train`.

The translate, eval and audit tests import :func:`trained_run` from here. The
model is barely trained (plumbing, not quality); BLEU quality is measured on
the default experiment.
"""
import atexit
import functools
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BASE_CONFIG = str(ROOT / "experiments" / "bible_en_es_tiny.py")
CONFIG = f'''
import importlib.util

def get_config():
  spec = importlib.util.spec_from_file_location("base", {BASE_CONFIG!r})
  base = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(base)
  c = base.get_config()
  c.num_train_steps, c.warmup_steps, c.learning_rate = 40, 10, 5e-3
  c.eval_every_steps = c.checkpoint_every_steps = 40
  c.log_every_steps = 20
  c.batch_tokens = 1024
  c.progress_bar = False
  c.data.vocab_size, c.data.tokenizer_type, c.data.max_len = 1000, "bpe", 64
  c.data.batching, c.data.eval_max_examples = "pad", 24
  c.model.d_model, c.model.num_heads, c.model.mlp_dim = 32, 2, 64
  c.model.num_encoder_layers = c.model.num_decoder_layers = 1
  return c
'''


def cli_env() -> dict:
  """Environment of CLI subprocesses: one CPU device (quicker to compile)."""
  return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
          "JAX_PLATFORMS": "cpu"}


def run_cli(*args: str, stdin: bytes = b"", timeout: int = 600) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "mt_flax", *args], input=stdin, cwd=ROOT,
                        env=cli_env(), capture_output=True, timeout=timeout)


@functools.lru_cache(maxsize=None)
def _train() -> tuple:
  """(workdir, None) once trained, or (None, reason to skip)."""
  from mt_flax import data
  from mt_flax.config import load_config

  folder = tempfile.mkdtemp(prefix="mt_flax_decode_run_")
  atexit.register(shutil.rmtree, folder, True)
  config_path = os.path.join(folder, "tiny.py")
  with open(config_path, "w") as f:
    f.write(CONFIG)
  try:
    data.get_builder(load_config(config_path))       # prepares the Bible data if needed
  except data.DataError as e:
    return None, f"the Bible data is not available here: {e}"
  workdir = os.path.join(folder, "run")
  proc = run_cli("train", "--config", config_path, "--workdir", workdir)
  tail = proc.stderr.decode(errors="replace")[-2000:]
  assert proc.returncode == 0, f"tiny training run failed:\n{tail}"
  return workdir, None


def trained_run() -> str:
  """The workdir of the shared tiny run (skips when the Bible data cannot be had)."""
  workdir, reason = _train()
  if workdir is None:
    pytest.skip(reason)
  return workdir


@functools.lru_cache(maxsize=None)
def loaded_run():
  """The shared run loaded in this process (params, model, tokenizer)."""
  from mt_flax.inference import load_trained
  return load_trained(trained_run())


def call_main(main, argv, stdin: bytes = b"", monkeypatch=None) -> int:
  """Runs a CLI ``main(argv)`` in this process with ``stdin`` as its standard input."""
  monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
  return main(list(argv))


def test_the_run_has_what_inference_needs():
  workdir = Path(trained_run())
  for name in ("config.json", "tokenizer", "checkpoints", "DONE"):
    assert (workdir / name).exists(), name
  run = loaded_run()
  assert run.step == 40 and run.model.config.d_model == 32
  assert run.tokenizer.tgt_vocab_size == run.model.config.tgt_vocab_size

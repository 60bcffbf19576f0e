"""Shared test set-up: 8 simulated CPU devices, tiny models and batches, a synthetic
corpus, and one small trained run per session made with the real ``train`` command.

Fixtures (no test module imports another; helpers come from here):
  ``tiny_model``      factory ``(seed=0, **TransformerConfig overrides) -> (model, params)``
  ``ragged_batch``    factory ``(seed, rows, s_len, t_len) -> (src [B, S], tgt_in [B, T])``
  ``keras_cross_mask`` the Keras example's wrong cross mask, to monkeypatch in
  ``synthetic_corpus`` factory writing a spa-eng.zip of a toy English->Spanish lexicon
  ``trained_run``     workdir of a tiny model trained on that corpus (session-scoped)
  ``loaded_run``      that run loaded for inference in this process
  ``run_cli``         ``python -m mt_flax ...`` in a subprocess (one CPU device)
  ``call_main``       a command's ``main(argv)`` in this process with a given stdin
  ``tiny_training``   short real runs of the default experiment with a tiny model
  ``gcs_emulator``    a GCS emulator on 127.0.0.1 (tools/gcs_emulator.py) for gs:// workdirs
"""
import dataclasses
import io
import os
import random
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import linen as nn  # noqa: E402

from mt_flax.model import Transformer, TransformerConfig, init_params  # noqa: E402
from mt_flax.special_ids import BOS_ID, FIRST_WORD_ID, PAD_ID  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 48


def pytest_collection_modifyitems(config, items):
  """Tests that need the trained run are end-to-end tests: they get the ``slow`` marker."""
  for item in items:
    if {"trained_run", "loaded_run", "trained_config"} & set(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.slow)

# A toy lexicon: English word i translates to Spanish word i, so a few dozen updates
# of a tiny model already produce recognisable output.
LEXICON = dict(zip(
    ("the cat dog house red blue small big runs eats sees quickly slowly tree river mountain "
     "friend teacher book table window green yellow happy sad old new").split(),
    ("el gato perro casa rojo azul pequeño grande corre come ve rápido lento árbol río montaña "
     "amigo maestro libro mesa ventana verde amarillo feliz triste viejo nuevo").split()))


def random_params(model: Transformer, seed: int):
  """Random weights drawn with numpy on the model's parameter shapes (no init compile)."""
  shapes = jax.eval_shape(lambda: nn.meta.unbox(init_params(model, jax.random.PRNGKey(0))))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "scale":
      return jnp.ones(leaf.shape, leaf.dtype)
    if name == "bias":
      return jnp.zeros(leaf.shape, leaf.dtype)
    return jnp.asarray(rng.normal(0.0, leaf.shape[-1] ** -0.5, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="session")
def tiny_model():
  """``make(seed=0, **overrides) -> (model, params)``: 2+2 layers, d_model 32, vocabulary 48."""
  def make(seed: int = 0, **overrides):
    base = dict(src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, d_model=32, num_heads=4,
                num_encoder_layers=2, num_decoder_layers=2, mlp_dim=64, max_len=64)
    model = Transformer(TransformerConfig(**{**base, **overrides}))
    return model, random_params(model, seed)
  return make


def make_ragged_batch(seed: int = 0, rows: int = 3, s_len: int = 6, t_len: int = 8,
                      vocab: int = VOCAB) -> tuple[np.ndarray, np.ndarray]:
  """src [B, S] and tgt_in [B, T] (BOS first); each row has its own length, the last the longest."""
  rng = np.random.default_rng(seed)
  src, tgt = np.zeros((rows, s_len), np.int32), np.zeros((rows, t_len), np.int32)
  for b in range(rows):
    n, m = (s_len, t_len) if b == rows - 1 else (rng.integers(1, s_len + 1), rng.integers(2, t_len + 1))
    src[b, :n] = rng.integers(FIRST_WORD_ID, vocab, n)
    tgt[b, 0], tgt[b, 1:m] = BOS_ID, rng.integers(FIRST_WORD_ID, vocab, m - 1)
  return src, tgt


@pytest.fixture(scope="session")
def ragged_batch():
  return make_ragged_batch


def write_synthetic_corpus(folder: Path, n: int = 600, seed: int = 0, max_words: int = 30) -> Path:
  """``folder/spa-eng.zip`` with ``n`` pairs of 1..max_words words (skewed to short ones)."""
  rng = random.Random(seed)
  english = list(LEXICON)
  lines = []
  for i in range(n):
    k = min(max_words, max(1, int(rng.lognormvariate(1.6, 0.6))))
    words = [rng.choice(english) for _ in range(k)]
    lines.append(" ".join(words).capitalize() + f" {i}.\t"
                 + " ".join(LEXICON[w] for w in words).capitalize() + f" {i}.\n")
  folder.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(folder / "spa-eng.zip", "w") as archive:
    archive.writestr("spa-eng/spa.txt", "".join(lines))
  return folder


@pytest.fixture(scope="session")
def keras_cross_mask():
  """The Keras example's bug: the decoder's own padding mask given to cross-attention."""
  from mt_flax import masks
  return lambda tgt, src, *segments: masks.padding_mask(tgt != PAD_ID, tgt != PAD_ID)


@pytest.fixture(scope="session")
def synthetic_corpus():
  return write_synthetic_corpus


def cli_env(**extra: str) -> dict:
  """Environment of CLI subprocesses: one CPU device (quicker to compile)."""
  return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
          "JAX_PLATFORMS": "cpu", **extra}


def _run_cli(*args: str, stdin: bytes = b"", timeout: int = 600) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "mt_flax", *args], input=stdin, cwd=ROOT,
                        env=cli_env(), capture_output=True, timeout=timeout)


@pytest.fixture(scope="session")
def run_cli():
  return _run_cli


@pytest.fixture
def call_main(monkeypatch):
  """``call(main, argv, stdin=b"") -> exit status``, in this process."""
  def call(main, argv, stdin: bytes = b"") -> int:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    return main(list(argv))
  return call


TRAINED_CONFIG = '''
from mt_flax.default_config import get_config as default_config

def get_config():
  c = default_config()
  c.num_train_steps, c.warmup_steps, c.learning_rate = 40, 10, 5e-3
  c.eval_every_steps = c.checkpoint_every_steps = 40
  c.log_every_steps = 20
  c.batch_tokens = 1024
  c.eval_bleu_examples = 8
  c.progress_bar = False
  c.data.name, c.data.manual_dir, c.data.tfds_data_dir = "spa_eng", {manual!r}, {tfds!r}
  c.data.vocab_size, c.data.tokenizer_type, c.data.max_len = 150, "bpe", 48
  c.data.batching, c.data.eval_max_examples = "pad", 24
  c.model.d_model, c.model.num_heads, c.model.mlp_dim = 32, 2, 64
  c.model.num_encoder_layers = c.model.num_decoder_layers = 1
  return c
'''


@pytest.fixture(scope="session")
def trained_config(tmp_path_factory) -> str:
  """A config file for a 40-step tiny model on the synthetic corpus."""
  root = tmp_path_factory.mktemp("trained")
  write_synthetic_corpus(root / "manual")
  path = root / "tiny.py"
  path.write_text(TRAINED_CONFIG.format(manual=str(root / "manual"), tfds=str(root / "tfds")))
  return str(path)


@pytest.fixture(scope="session")
def trained_run(trained_config) -> str:
  """Workdir of the config above trained with ``python -m mt_flax train`` (once a session)."""
  workdir = str(Path(trained_config).parent / "run")
  proc = _run_cli("train", "--config", trained_config, "--workdir", workdir)
  assert proc.returncode == 0, f"tiny training run failed:\n{proc.stderr.decode()[-3000:]}"
  return workdir


@pytest.fixture(scope="session")
def loaded_run(trained_run):
  from mt_flax.inference import load_trained
  return load_trained(trained_run)

# ----------------------------------------------------------------------------- tiny training runs

class TinyTraining:
  """Short real training runs of the default experiment (the Bible) with a tiny model.

  ``overrides(**kw)``: ``--config.KEY=VALUE`` flags of the tiny settings (``a__b`` is
  ``a.b``); ``new_workdir(folder, name)``: a workdir holding the tokenizer trained once
  for the session; ``finish(proc)``: ``(exit status, stderr)`` of a started run;
  ``wait(predicate, proc, what)`` and ``has_checkpoint(workdir, step)``: waiting on a
  started run; ``losses(workdir)``: the logged training loss per step.
  """
  config = str(ROOT / "experiments" / "bible_en_es_tiny.py")
  vocab = 256
  settings = {
      "data.vocab_size": vocab, "data.num_buckets": 1, "data.eval_max_examples": 24,
      "batch_tokens": 1024, "learning_rate": 3e-3, "warmup_steps": 8, "log_every_steps": 1,
      "model.d_model": 32, "model.num_heads": 2, "model.num_encoder_layers": 1,
      "model.num_decoder_layers": 1, "model.mlp_dim": 64, "model.dropout_rate": 0.1,
      "eval_bleu_examples": 0, "best_metric": "eval_loss", "best_mode": "min",
  }

  def __init__(self, tokenizer_dir: Path):
    self.tokenizer_dir = tokenizer_dir

  @classmethod
  def overrides(cls, **kw) -> list[str]:
    values = {**cls.settings, **{k.replace("__", "."): v for k, v in kw.items()}}
    return [f"--config.{k}={v}" for k, v in values.items()]

  def new_workdir(self, folder, name: str) -> str:
    import shutil
    workdir = Path(folder) / name
    shutil.copytree(self.tokenizer_dir, workdir / "tokenizer")
    return str(workdir)

  @staticmethod
  def wait(predicate, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    """Polls ``predicate()`` until true; fails if ``proc`` ends first or after ``timeout``."""
    deadline = time.time() + timeout
    while not predicate():
      if proc.poll() is not None:
        raise AssertionError(f"run ended before {what}: {proc.stderr.read()[-2000:]}")
      if time.time() > deadline:
        proc.kill()
        raise AssertionError(f"no {what} after {timeout}s")
      time.sleep(0.02)

  @staticmethod
  def has_checkpoint(workdir: str, step: int):
    """A predicate for :meth:`wait`: checkpoint ``step`` of ``workdir`` exists."""
    return lambda: os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))

  @staticmethod
  def losses(workdir: str) -> dict[int, float]:
    """Training loss per step, from ``workdir/metrics.jsonl`` (local or gs://)."""
    from mt_flax.metrics import read_metrics
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}

  @staticmethod
  def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
      _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      proc.kill()
      raise
    return proc.returncode, err


@pytest.fixture(scope="session")
def tiny_training(tmp_path_factory) -> TinyTraining:
  """Trains the tiny tokenizer once; workdirs get a copy (then loaded, not retrained)."""
  from mt_flax import data
  from mt_flax.config import load_config
  folder = tmp_path_factory.mktemp("tokenizer_source")
  data.load_or_train_tokenizer(load_config(TinyTraining.config, TinyTraining.overrides()),
                               str(folder))
  return TinyTraining(folder / "tokenizer")


# ----------------------------------------------------------------------------- GCS emulator

@dataclasses.dataclass(frozen=True)
class GcsEmulator:
  """A running emulator: ``url`` (``$STORAGE_EMULATOR_HOST``) and a ``bucket`` that exists."""
  url: str
  bucket: str

  def path(self, name: str) -> str:
    """``gs://BUCKET/name``."""
    return f"gs://{self.bucket}/{name}"

  @staticmethod
  def env(devices: int = 1) -> dict:
    """Environment of ``mt_flax`` subprocesses: they see ``STORAGE_EMULATOR_HOST`` only
    (mt_flax derives ``TENSORSTORE_GCS_HTTP_URL`` itself) and ``devices`` CPU devices."""
    from mt_flax import paths
    env = {k: v for k, v in os.environ.items() if k != paths.TENSORSTORE_GCS_ENV}
    env.update(PYTHONPATH=str(ROOT), XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return env

  def run(self, *args: str, stdin: str = "", devices: int = 1,
          timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m mt_flax ARGS`` against the emulator."""
    return subprocess.run([sys.executable, "-m", "mt_flax", *args], input=stdin, text=True,
                          capture_output=True, env=self.env(devices), cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="session")
def gcs_emulator():
  """gcp-storage-emulator (tools/gcs_emulator.py, in memory) on 127.0.0.1 for the session.

  Sets ``STORAGE_EMULATOR_HOST`` (gcsfs, and through mt_flax.paths tensorstore)
  for this process and its subprocesses; restores the environment afterwards.
  """
  pytest.importorskip("gcp_storage_emulator", reason="needs gcp-storage-emulator (test extra)")
  import portpicker
  port = portpicker.pick_unused_port()
  url, bucket = f"http://127.0.0.1:{port}", "mt-flax-test"
  script = str(ROOT / "tools" / "gcs_emulator.py")
  proc = subprocess.Popen([sys.executable, script, str(port), bucket],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
  try:
    deadline = time.time() + 120
    while True:
      try:
        urllib.request.urlopen(url + "/", timeout=5).read()
        break
      except OSError:
        if proc.poll() is not None or time.time() > deadline:
          raise RuntimeError(f"the GCS emulator did not start on {url}") from None
        time.sleep(0.2)
    os.environ["STORAGE_EMULATOR_HOST"] = url
    os.environ.pop("TENSORSTORE_GCS_HTTP_URL", None)
    from mt_flax import paths
    paths.use_gcs_emulator_for_tensorstore()
    yield GcsEmulator(url, bucket)
  finally:
    proc.kill()
    proc.wait()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v

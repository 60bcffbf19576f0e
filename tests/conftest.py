"""Shared test set-up of every tier: 8 simulated CPU devices, tiny models and batches,
and short real training runs of the default experiment's ``:test`` variant
(``experiments/bible_en_es_tiny.py:test``, the Bible data).

Fixtures (no test module imports another; helpers come from here; tier-specific ones are
in ``tests/<tier>/conftest.py``):
  ``tiny_model``      factory ``(seed=0, **TransformerConfig overrides) -> (model, params)``
  ``ragged_batch``    factory ``(seed, rows, s_len, t_len) -> (src [B, S], tgt_in [B, T])``
  ``keras_cross_mask`` the Keras example's wrong cross mask, to monkeypatch in
  ``call_main``       a command's ``main(argv)`` in this process with a given stdin
  ``tiny_training``   short real runs of the ``:test`` variant (tokenizer trained once)
  ``trained``         ``(workdir, summary)``: the ``:test`` variant trained in this process
                      (24 steps; session-scoped); ``trained_run`` is its workdir
  ``loaded_run``      that run loaded for inference in this process
  ``variant_flags``   the ``:test`` variant as ``--config.KEY=VALUE`` flags
  ``tmpfs``, ``small_disk``, ``fill_disk``  small file systems to fill up (root only)
  ``shared_compilation_cache`` (automatic) one JAX compilation cache per session
  ``synthetic_corpus`` factory writing a spa-eng.zip of a toy English->Spanish lexicon
"""
import contextlib
import io
import os
import random
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

# XLA ends a process whose CPU collective has waited 40 s for its device threads; with 8
# simulated devices on 2 busy cores (two xdist workers, subprocess runs beside them) that
# happens. This process and every one the tests start wait longer. They also compile
# without LLVM's optimisations: a tiny train step compiles in about half the time and runs
# about 3x slower, and the tests compile far more than they run.
os.environ["MT_FLAX_TEST_XLA_FLAGS"] = (
    "--xla_cpu_collective_call_terminate_timeout_seconds=1800 "
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds=600 "
    "--xla_backend_optimization_level=0")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      + os.environ["MT_FLAX_TEST_XLA_FLAGS"])
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
# The default experiment's test variant: what every test that trains starts from.
TEST_CONFIG = str(ROOT / "experiments" / "bible_en_es_tiny.py") + ":test"


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


@pytest.fixture(scope="session")
def keras_cross_mask():
  """The Keras example's bug: the decoder's own padding mask given to cross-attention."""
  from mt_flax import masks
  return lambda tgt, src, *segments: masks.padding_mask(tgt != PAD_ID, tgt != PAD_ID)


@pytest.fixture
def call_main(monkeypatch):
  """``call(main, argv, stdin=b"") -> exit status``, in this process."""
  def call(main, argv, stdin: bytes = b"") -> int:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    return main(list(argv))
  return call


@pytest.fixture(scope="session")
def variant_flags() -> list[str]:
  """The ``:test`` variant as ``--config.KEY=VALUE`` flags over the plain experiment file, for
  what takes no variant (``launch.sh``'s default run, ``mt_flax sweep``'s config digest)."""
  from mt_flax.config import load_config

  def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
      out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict)
                 else {prefix + key: value})
    return out
  plain = flat(load_config(TEST_CONFIG.rpartition(":")[0]).to_dict())
  test = flat(load_config(TEST_CONFIG).to_dict())
  return [f"--config.{key}={value}" for key, value in test.items() if plain[key] != value]


def pytest_collection_modifyitems(config, items):
  """The subprocess tier (tests/e2e) first: on pytest-xdist workers (``--dist loadfile``, as
  ``./launch.sh test`` runs them: each file on one worker, its module fixtures built once)
  its long files start early instead of ending the run alone."""
  items.sort(key=lambda item: "e2e" not in item.path.parts)


CACHE_ENV = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
  """This process and the processes the tests start share one JAX compilation cache in the
  session's temporary folder (each xdist worker its own; never the user's ``~/.cache``),
  every program cached: a program compiled by one run, such as the ``:test`` variant's
  train step, is loaded by the next."""
  saved = {k: os.environ.get(k) for k in CACHE_ENV}
  folder = str(tmp_path_factory.mktemp("jax_cache"))
  os.environ.update(zip(CACHE_ENV, (folder, "0")))
  # this process too: the in-process runs of the :test variant load what another compiled
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  yield
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value



# ----------------------------------------------------------------------------- tiny training runs

class TinyTraining:
  """Short real training runs of the default experiment's ``:test`` variant (the Bible).

  ``config``: that config (``FILE:test``); ``overrides(**kw)``: ``--config.KEY=VALUE``
  flags (``a__b`` is ``a.b``); ``new_workdir(folder, name)``: a workdir holding the
  tokenizer trained once for the session; ``finish(proc)``: ``(exit status, stderr)`` of a
  started run; ``wait(predicate, proc, what)`` and ``has_checkpoint(workdir, step)``:
  waiting on a started run; ``losses(workdir)``: the logged training loss per step;
  ``tensorboard_steps(workdir)``: the steps of the TensorBoard training losses.
  """
  config = TEST_CONFIG

  def __init__(self, tokenizer_dir: Path):
    self.tokenizer_dir = tokenizer_dir

  @staticmethod
  def overrides(**kw) -> list[str]:
    return [f"--config.{k.replace('__', '.')}={v}" for k, v in kw.items()]

  def new_workdir(self, folder, name: str) -> str:
    """``folder/name`` (a local folder or gs://) holding a copy of the session's tokenizer."""
    if not str(folder).startswith("gs://"):
      shutil.copytree(self.tokenizer_dir, Path(folder) / name / "tokenizer")
      return str(Path(folder) / name)
    from etils import epath
    workdir = epath.Path(folder) / name
    for src in self.tokenizer_dir.rglob("*"):
      if src.is_file():
        (workdir / "tokenizer" / src.relative_to(self.tokenizer_dir)).write_bytes(src.read_bytes())
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
  def tensorboard_steps(workdir: str) -> list[int]:
    """Steps of the ``train/loss`` scalars in all event files (TFRecord: length, crc, data,
    crc)."""
    from tensorboardX.proto import event_pb2
    steps = []
    folder = os.path.join(workdir, "tensorboard")
    for name in os.listdir(folder):
      blob, at = open(os.path.join(folder, name), "rb").read(), 0
      while at + 12 <= len(blob):
        length = int.from_bytes(blob[at:at + 8], "little")
        event = event_pb2.Event()
        event.ParseFromString(blob[at + 12:at + 12 + length])
        at += 12 + length + 4
        if any(v.tag == "train/loss" for v in event.summary.value):
          steps.append(int(event.step))
    return sorted(steps)

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
  """Trains the tiny tokenizer once and tokenizes the training split with it once; workdirs get
  a copy of both (the tokenizer folder holds the token cache), loaded, not redone."""
  from mt_flax import data
  from mt_flax.config import load_config
  folder = tmp_path_factory.mktemp("tokenizer_source")
  config = load_config(TEST_CONFIG)
  data.training_set(config, data.load_or_train_tokenizer(config, str(folder)))
  assert list((folder / "tokenizer" / "cache").glob("train-*.npz"))
  return TinyTraining(folder / "tokenizer")


@pytest.fixture(scope="session")
def trained(tiny_training, tmp_path_factory) -> tuple[str, dict]:
  """``(workdir, summary)`` of the ``:test`` variant trained in this process (once a session):
  24 steps, validations and checkpoints at steps 12 and 24."""
  from mt_flax import train
  from mt_flax.config import load_config
  workdir = tiny_training.new_workdir(tmp_path_factory.mktemp("trained"), "run")
  summary = train.train_and_evaluate(load_config(TEST_CONFIG), workdir)
  return workdir, summary


@pytest.fixture(scope="session")
def trained_run(trained) -> str:
  """The workdir of :func:`trained`."""
  return trained[0]


@pytest.fixture(scope="session")
def loaded_run(trained_run):
  from mt_flax.inference import load_trained
  return load_trained(trained_run)


# ----------------------------------------------------------------------------- full disks

@contextlib.contextmanager
def _tmpfs(mount, size: str = "40m"):
  """A small tmpfs mounted on the folder ``mount`` (root only; skips otherwise); unmounted after."""
  os.makedirs(mount, exist_ok=True)
  if os.geteuid() != 0:
    pytest.skip("mounting a small tmpfs needs root")
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                        capture_output=True, text=True)
  if done.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
  try:
    yield mount
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder) -> None:
  """Writes zeros to ``folder/filler`` until the file system is full."""
  fd = os.open(os.path.join(folder, "filler"), os.O_WRONLY | os.O_CREAT)
  try:
    for size in (1 << 16, 1 << 10, 1):
      try:
        while os.write(fd, b"\0" * size):
          pass
      except OSError:
        continue
  finally:
    os.close(fd)


@pytest.fixture(scope="session")
def tmpfs():
  """``tmpfs(folder, size="40m")``: a context manager mounting a small tmpfs on ``folder``."""
  return _tmpfs


@pytest.fixture
def small_disk(tmp_path):
  """A 40 MB tmpfs (``tmp_path/disk``) for the test."""
  with _tmpfs(tmp_path / "disk") as mount:
    yield mount


@pytest.fixture(scope="session")
def fill_disk():
  """``fill_disk(folder)``: writes zeros to ``folder/filler`` until its file system is full."""
  return _fill


# ----------------------------------------------------------------------------- a synthetic corpus

# A toy lexicon: English word i translates to Spanish word i, so a few dozen updates
# of a tiny model already produce recognisable output.
LEXICON = dict(zip(
    ("the cat dog house red blue small big runs eats sees quickly slowly tree river mountain "
     "friend teacher book table window green yellow happy sad old new").split(),
    ("el gato perro casa rojo azul pequeño grande corre come ve rápido lento árbol río montaña "
     "amigo maestro libro mesa ventana verde amarillo feliz triste viejo nuevo").split()))


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
def synthetic_corpus():
  return write_synthetic_corpus

"""Several processes on loopback (CPU collectives) train like one process, and a run
resumes on another number of processes.

Each process runs this file as a worker: it joins ``jax.distributed`` through
:func:`mt_flax.sharding.maybe_initialize_distributed`. Two processes of 2 devices
feed only their own rows of each global batch (trimmed to their own lengths, so the
processes' shapes differ and are made common), train with ``jit`` on a mesh
spanning both, save and restore an Orbax checkpoint in a shared directory, then train
the ``:test`` variant with ``mesh.tensor=4``: a tensor axis across the processes, whose
devices all hold the same rows. Four processes of 1 device train it with ``mesh.data=2
mesh.tensor=2``: processes pair up, a tensor axis across each pair, on each half of the
rows. Both match one process of 4 devices on the same mesh (per-step and validation
losses), and their steps between sync points run no host-level collective. The four
processes' run resumed on one process, and the one process's run stopped at step 3
resumed on two processes of 2 devices, reach step 6 with the losses of the uninterrupted
run. ``pmap`` across processes is run by
``test_pod.py``.
"""
import functools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

V = 48
NUM_STEPS = 3
ROWS = 8
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "experiments", "bible_en_es_tiny.py") + ":test"
# The :test variant without dropout, validated and saved every 3 steps on one pair (one
# batch shape to compile); 768 tokens make 8 rows of (96, 96). The rsqrt schedule does not
# depend on num_train_steps, so a run of 3 steps is the first half of one of 6.
TRAIN = dict(warmup_steps=2, schedule="rsqrt", eval_every_steps=3, checkpoint_every_steps=3,
             eval_bleu_examples=0, batch_tokens=768, model__dropout_rate=0.0,
             data__eval_max_examples=1)
# The meshes of the layouts ("PxD": P processes of D devices): 2x2 puts a tensor axis across
# the processes (every device holds all rows); 4x1 pairs processes up on each half of them.
MESHES = {"tensor": dict(mesh__tensor=4), "data_tensor": dict(mesh__data=2, mesh__tensor=2)}
STOP, END = 3, 6      # steps of a run (then resumed), of the uninterrupted reference


def make_batch(seed: int) -> dict:
  """Ragged real rows (src, BOS+y, y+EOS); rows 0-3 are short, rows 4-7 long."""
  rng = np.random.default_rng(seed)
  batch = {k: np.zeros((ROWS, n), np.int32) for k, n in (("src", 12), ("tgt_in", 10),
                                                          ("tgt_out", 10))}
  for r in range(ROWS):
    n, m = (rng.integers(2, 6), rng.integers(2, 5)) if r < 4 else (12, 10)
    batch["src"][r, :n] = rng.integers(4, V, n)
    y = rng.integers(4, V, m - 1)
    batch["tgt_in"][r, :m] = np.concatenate([[2], y])
    batch["tgt_out"][r, :m] = np.concatenate([y, [3]])
  return batch


def trim(batch: dict) -> dict:
  """Drops trailing all-pad columns (each process then has its own lengths)."""
  out = {}
  for k, v in batch.items():
    used = np.flatnonzero(v.any(axis=0))
    out[k] = v[:, :(used[-1] + 1 if len(used) else 1)]
  return out


def train_run(partitioner, per_process_rows: bool):
  """Losses of NUM_STEPS updates, eval sums and the final state."""
  import jax
  import ml_collections
  from mt_flax import sharding, steps
  from mt_flax.model import Transformer, TransformerConfig
  model = Transformer(TransformerConfig(
      src_vocab_size=V, tgt_vocab_size=V, d_model=32, num_heads=4, num_encoder_layers=1,
      num_decoder_layers=1, mlp_dim=64, dropout_rate=0.1))
  opt = steps.make_optimizer(ml_collections.ConfigDict(dict(
      learning_rate=2e-3, warmup_steps=2, num_train_steps=10, grad_clip_norm=1.0)))
  partitioner.setup(functools.partial(steps.init_boxed_state, model, opt), jax.random.key(0))
  state = partitioner.init_state(jax.random.key(0))
  train = partitioner.compile_train_step(steps.make_train_step(
      model, opt, label_smoothing=0.1, jit=False))
  losses = []
  for i in range(NUM_STEPS):
    batch = make_batch(i)
    if per_process_rows:
      batch = sharding.common_batch_shape(trim(partitioner.rows.take(batch)))
    state, m = train(state, partitioner.shard_batch(batch))
    losses.append(float(partitioner.metrics_to_host(m)["loss"]))
  from mt_flax.train import evaluate_validation
  evaluate = partitioner.compile_eval_step(steps.make_eval_step(model, jit=False))
  metrics = evaluate_validation(evaluate, state.params, [make_batch(7)], partitioner)
  return losses, metrics, state


def _same_params(restored, state, partitioner) -> bool:
  import jax
  first = lambda x: np.asarray(x.addressable_data(0) if hasattr(x, "addressable_data") else x)
  got = jax.tree.leaves(restored.params)
  want = jax.tree.leaves(partitioner.to_checkpoint(state).params)
  return all(np.array_equal(first(a), first(b)) for a, b in zip(got, want))


def flags(**kw) -> list[str]:
  return [f"--config.{k.replace('__', '.')}={v}" for k, v in kw.items()]


def train_pipeline(workdir: str, steps: int, mesh: str) -> list[int]:
  """``train`` of the :test variant (its data pipeline and validation) to ``steps``; returns
  the host-level collectives (gathers and barriers of ``multihost_utils``) this process made
  before each train step."""
  from jax.experimental import multihost_utils
  from mt_flax import sharding, train
  from mt_flax.config import load_config
  calls, before = [], []
  for name in ("process_allgather", "sync_global_devices"):
    def counted(*args, _original=getattr(multihost_utils, name), **kwargs):
      calls.append(_original)
      return _original(*args, **kwargs)
    setattr(multihost_utils, name, counted)
  compile_train_step = sharding.JitPartitioner.compile_train_step

  def compile_counted(self, step_fn):
    train_fn = compile_train_step(self, step_fn)
    return lambda *args: (before.append(len(calls)), train_fn(*args))[1]
  sharding.JitPartitioner.compile_train_step = compile_counted
  summary = train.train_and_evaluate(
      load_config(CONFIG, flags(**TRAIN, **MESHES[mesh], num_train_steps=steps)), workdir)
  assert summary["step"] == steps
  return before


def worker(out_dir: str, layout: str, workdir: str, steps: str, mesh: str, checks: str) -> None:
  """One process of ``layout`` training ``workdir`` to ``steps`` on ``mesh``; first, with
  ``checks`` == "1", the steps and the checkpoint of :func:`train_run` on every process's
  devices."""
  import jax
  import ml_collections
  from mt_flax import checkpoint, sharding
  sharding.maybe_initialize_distributed()
  processes, devices = map(int, layout.split("x"))
  assert (jax.process_count(), jax.device_count()) == (processes, processes * devices)
  result = {}
  if checks == "1":
    part = sharding.JitPartitioner(sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1)))
    losses, metrics, state = train_run(part, per_process_rows=True)
    # a checkpoint written by both processes into one directory, read back by both
    manager = checkpoint.make_manager(os.path.join(out_dir, "run"))
    checkpoint.save(manager, NUM_STEPS, part.to_checkpoint(state),
                    {"process": jax.process_index()}, ml_collections.ConfigDict({"seed": 0}))
    manager.wait_until_finished()
    restored, data_state, step = checkpoint.restore_latest_good(manager, part.abstract_state())
    same = _same_params(restored, state, part)
    manager.close()
    result = {"losses": losses, "metrics": metrics, "restored_step": step,
              "restored_same": same, "data_state": data_state}
  result["gathers_before_step"] = train_pipeline(workdir, int(steps), mesh)
  with open(os.path.join(out_dir, f"process_{jax.process_index()}.json"), "w") as f:
    json.dump(result, f)


def run_processes(out_dir, layout: str, workdir: str, steps: int, mesh: str = "tensor",
                  checks: bool = False) -> list[dict]:
  """Starts the workers of ``layout`` ("PxD": P processes of D CPU devices) on loopback;
  returns their JSON results."""
  import portpicker
  processes, devices = map(int, layout.split("x"))
  out_dir.mkdir(parents=True, exist_ok=True)
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
             + os.environ["MT_FLAX_TEST_XLA_FLAGS"], JAX_PLATFORMS="cpu")
  if processes > 1:
    env.update(MT_FLAX_COORDINATOR=f"127.0.0.1:{portpicker.pick_unused_port()}",
               MT_FLAX_NUM_PROCESSES=str(processes))
  logs = [open(out_dir / f"process_{i}.log", "w") for i in range(processes)]   # a pipe can fill
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(out_dir), layout,
                             workdir, str(steps), mesh, "1" if checks else "0"],
                            env=dict(env, MT_FLAX_PROCESS_ID=str(i)), cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
           for i, log in enumerate(logs)]
  try:
    for p in procs:
      p.wait(timeout=600)
  finally:
    for p, log in zip(procs, logs):        # never leave a straggler behind
      if p.poll() is None:
        p.kill()
        p.wait()
      log.close()
  for i, p in enumerate(procs):
    assert p.returncode == 0, (out_dir / f"process_{i}.log").read_text()[-3000:]
  return [json.loads((out_dir / f"process_{i}.json").read_text()) for i in range(processes)]


@pytest.fixture(scope="module")
def reference(tiny_training, tmp_path_factory) -> str:
  """The workdir of one process of 4 devices trained on the data x tensor mesh for END steps
  without a stop: what the 4x1 layout and every resumed run must match."""
  folder = tmp_path_factory.mktemp("reference")
  workdir = tiny_training.new_workdir(folder, "run")
  run_processes(folder / "out", "1x4", workdir, END, mesh="data_tensor")
  return workdir


def layout_workdir(folder, reference: str) -> str:
  """A workdir with the reference run's tokenizer."""
  workdir = os.path.join(folder, "pipeline")
  shutil.copytree(os.path.join(reference, "tokenizer"), os.path.join(workdir, "tokenizer"))
  return workdir


@pytest.fixture(scope="module")
def four_processes(reference, tmp_path_factory) -> tuple[str, list[dict]]:
  """(workdir, results) of four processes of 1 device trained on the data x tensor mesh for
  STOP steps."""
  folder = tmp_path_factory.mktemp("four_processes")
  workdir = layout_workdir(folder, reference)
  return workdir, run_processes(folder, "4x1", workdir, STOP, mesh="data_tensor")


def check_pipeline_run(tiny_training, workdir: str, reference: str, results: list[dict],
                       steps: int = STOP) -> None:
  """Per-step training losses and the validation losses of ``workdir`` (trained to ``steps``)
  equal ``reference``'s; the last 3 steps it ran (before the sync point, save and
  validation) made no host-level collective on any process."""
  for r in results:
    before = r["gathers_before_step"]
    assert len(before) == 3 and before[0] == before[1] == before[2], before
  from mt_flax.metrics import read_metrics
  got, want = tiny_training.losses(workdir), tiny_training.losses(reference)
  assert sorted(got) == list(range(1, steps + 1)) and set(got) <= set(want)
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(got)],
                             rtol=1e-4)
  evals = lambda w: {r["step"]: r["eval_loss"] for r in read_metrics(w) if "eval_loss" in r}
  got, want = evals(workdir), evals(reference)
  assert sorted(got) == list(range(STOP, steps + 1, STOP))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(got)],
                             rtol=1e-4)


def test_two_processes_match_one(tiny_training, reference, tmp_path):
  """2 processes x 2 devices with a tensor axis of 4 across them: the steps and checkpoint of
  :func:`train_run`, then the :test variant, against one process of 4 devices (the
  reference, on its data x tensor mesh: the same rows and the same losses)."""
  import jax
  from mt_flax import sharding
  workdir = layout_workdir(tmp_path, reference)
  results = run_processes(tmp_path, "2x2", workdir, STOP, checks=True)
  one = sharding.JitPartitioner(sharding.make_mesh(dict(data=1, fsdp=1, tensor=1),
                                                   jax.devices()[:1]))
  losses, metrics, _ = train_run(one, per_process_rows=False)
  check_results(results, losses, metrics)
  check_pipeline_run(tiny_training, workdir, reference, results)


def test_processes_sharing_rows_pair_up_like_one_process(tiny_training, reference,
                                                         four_processes):
  """4 processes x 1 device, data=2 x tensor=2: processes 0, 1 load the first half of every
  global batch, 2, 3 the second; each pair feeds one batch shard."""
  workdir, results = four_processes
  check_pipeline_run(tiny_training, workdir, reference, results)


def test_a_run_resumes_on_another_number_of_processes(tmp_path, tiny_training, reference,
                                                      four_processes):
  """The four processes' run resumed on one process of 4 devices (whose data-iterator state
  file is process 0's of 4), and the reference stopped at step STOP (its checkpoint then;
  the resumed run drops the later metrics) resumed on two processes of 2 devices, each
  loading half the rows and reading the one process's file: both continue the reference's
  batches, losses and validations to END."""
  resumed, stopped = tmp_path / "from_four", tmp_path / "from_one"
  shutil.copytree(four_processes[0], resumed)
  check_pipeline_run(tiny_training, str(resumed), reference,
                     run_processes(tmp_path / "one", "1x4", str(resumed), END, "data_tensor"), END)
  shutil.copytree(reference, stopped)
  shutil.rmtree(stopped / "checkpoints" / str(END))
  check_pipeline_run(tiny_training, str(stopped), reference,
                     run_processes(tmp_path / "two", "2x2", str(stopped), END, "data_tensor"), END)
  for workdir, processes in ((resumed, 1), (stopped, 2)):   # the layout the next resume checks
    assert json.loads((workdir / "run.json").read_text()) == {
        "process_count": processes, "device_count": 4, "batch_shards": 2}


def check_results(results: list[dict], losses: list[float], metrics: dict) -> None:
  for i, r in enumerate(results):
    np.testing.assert_allclose(r["losses"], losses, rtol=2e-5)
    for k in ("eval_loss", "eval_accuracy"):
      assert r["metrics"][k] == pytest.approx(metrics[k], rel=2e-5)
    assert r["metrics"]["eval_tokens"] == metrics["eval_tokens"]
    assert r["restored_step"] == NUM_STEPS and r["restored_same"]
    assert r["data_state"] == {"process": i}          # each process got its own iterator state

if __name__ == "__main__":
  worker(*sys.argv[1:7])

"""Two processes on loopback (CPU collectives) train like one process.

Each process runs this file as a worker: it joins ``jax.distributed`` through
:func:`mt_flax.sharding.maybe_initialize_distributed`, feeds only its own rows
of each global batch (trimmed to its own lengths, so the processes' shapes
differ and are made common), trains with ``jit`` on a mesh spanning both
processes, then saves and restores an Orbax checkpoint in a shared directory.
``pmap`` across processes is run by ``test_pod.py``.
"""
import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

V = 48
NUM_STEPS = 3
ROWS = 8


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
      batch = sharding.common_batch_shape(trim(sharding.process_rows(batch)))
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


def worker(out_dir: str) -> None:
  import jax
  import ml_collections
  from mt_flax import checkpoint, sharding
  sharding.maybe_initialize_distributed()
  assert jax.process_count() == 2 and jax.device_count() == 4
  part = sharding.JitPartitioner(sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1)))
  losses, metrics, state = train_run(part, per_process_rows=True)
  # a checkpoint written by both processes into one directory, read back by both
  manager = checkpoint.make_manager(os.path.join(out_dir, "run"))
  checkpoint.save(manager, NUM_STEPS, part.to_checkpoint(state), {"process": jax.process_index()},
                  ml_collections.ConfigDict({"seed": 0}))
  manager.wait_until_finished()
  restored, data_state, step = checkpoint.restore_latest_good(manager, part.abstract_state())
  same = _same_params(restored, state, part)
  manager.close()
  result = {"losses": losses, "metrics": metrics, "restored_step": step, "restored_same": same,
            "data_state": data_state}
  with open(os.path.join(out_dir, f"process_{jax.process_index()}.json"), "w") as f:
    json.dump(result, f)


def run_two_processes(out_dir) -> list[dict]:
  """Starts two workers (2 CPU devices each) on loopback; returns their JSON results."""
  import portpicker
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2 "
             + os.environ["MT_FLAX_TEST_XLA_FLAGS"],
             JAX_PLATFORMS="cpu", MT_FLAX_COORDINATOR=f"127.0.0.1:{portpicker.pick_unused_port()}",
             MT_FLAX_NUM_PROCESSES="2")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  logs = [open(out_dir / f"process_{i}.log", "w") for i in range(2)]   # files: a pipe can fill
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(out_dir)],
                            env=dict(env, MT_FLAX_PROCESS_ID=str(i)), cwd=root,
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
  return [json.loads((out_dir / f"process_{i}.json").read_text()) for i in range(2)]


def test_two_processes_match_one(tmp_path):
  import jax
  from mt_flax import sharding
  results = run_two_processes(tmp_path)
  single = sharding.JitPartitioner(sharding.make_mesh(dict(data=1, fsdp=1, tensor=1),
                                                      jax.devices()[:1]))
  losses, metrics, _ = train_run(single, per_process_rows=False)
  check_results(results, losses, metrics)


def check_results(results: list[dict], losses: list[float], metrics: dict) -> None:
  for i, r in enumerate(results):
    np.testing.assert_allclose(r["losses"], losses, rtol=2e-5)
    for k in ("eval_loss", "eval_accuracy"):
      assert r["metrics"][k] == pytest.approx(metrics[k], rel=2e-5)
    assert r["metrics"]["eval_tokens"] == metrics["eval_tokens"]
    assert r["restored_step"] == NUM_STEPS and r["restored_same"]
    assert r["data_state"] == {"process": i}          # each process got its own iterator state

if __name__ == "__main__":
  worker(sys.argv[1])

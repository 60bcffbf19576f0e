"""One side of ``python -m bench.train_step --compare``: a train step timed on request.

    PYTHONPATH=CHECKOUT python bench/step_worker.py '{"batch": 64, "length": 32, ...}'

Run as a script (not ``-m``) so that ``mt_flax`` comes from ``CHECKOUT`` on
``PYTHONPATH`` and nothing of this ``bench`` package is imported: the worker
uses only the stable public names (``TransformerConfig``, ``Transformer``,
``make_optimizer``, ``create_train_state``, ``make_train_step``), so it builds
the step of any revision that has them. It compiles and runs one step, prints
one JSON line ``{"ready": ...}``, then for each line ``step`` on stdin runs one
step and prints ``{"seconds": wall, "cpu_seconds": cpu, "peak_rss_mib": ...}``
(CPU time of all the process's threads, the process's peak resident memory so
far); an empty line or end of input ends it.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Any

TRAINING = dict(learning_rate=1e-3, warmup_steps=1000, schedule="rsqrt", num_train_steps=10000,
                weight_decay=0.0, grad_clip_norm=1.0, adam_b1=0.9, adam_b2=0.98, adam_eps=1e-9)
MODEL_KEYS = ("d_model", "num_heads", "num_encoder_layers", "num_decoder_layers", "mlp_dim",
              "dropout_rate", "attention_dropout_rate")


def build(shape: dict[str, Any]):
  """The jitted step, its state and a random full batch for ``shape``; returns ``run()``."""
  import jax
  import ml_collections
  import numpy as np
  from mt_flax import steps
  from mt_flax.model import Transformer, TransformerConfig

  vocab = int(shape["vocab"])
  config = TransformerConfig(src_vocab_size=vocab, tgt_vocab_size=vocab, share_embeddings=True,
                             tie_output=True, **{k: shape[k] for k in MODEL_KEYS})
  model = Transformer(config)
  optimizer = steps.make_optimizer(ml_collections.ConfigDict(TRAINING))
  state = steps.create_train_state(model, optimizer, jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = jax.device_put({k: rng.integers(4, vocab, (shape["batch"], shape["length"]),
                                          dtype=np.int32) for k in ("src", "tgt_in", "tgt_out")})
  step = steps.make_train_step(model, optimizer, label_smoothing=float(shape["label_smoothing"]))
  holder = {"state": state}

  def run() -> dict[str, float]:
    holder["state"], metrics = step(holder["state"], batch)
    jax.block_until_ready((holder["state"], metrics))
    return {k: float(metrics[k]) for k in ("nll", "finite")}

  return run


def main() -> int:
  if sys.path and sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)   # this folder's modules must not shadow anything
  shape = json.loads(sys.argv[1])
  import mt_flax
  start = time.perf_counter()
  run = build(shape)
  first = run()
  print(json.dumps({"ready": True, "mt_flax": mt_flax.__file__,
                    "compile_and_first_step_s": round(time.perf_counter() - start, 2),
                    **first}), flush=True)
  for line in sys.stdin:
    if line.strip() != "step":
      break
    t0, c0 = time.perf_counter(), time.process_time()
    run()
    print(json.dumps({"seconds": time.perf_counter() - t0,
                      "cpu_seconds": time.process_time() - c0,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}),
          flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

"""mt_flax's train step against the Flax WMT example's, compiled ahead of time for a TPU slice.

    python -m bench.wmt_example_compile --flax-wmt DIR [--topology v5e-4] [--rows 64]
        [--length 64] [--variant base] [--mt-flax-only] [--top N] [--config.KEY=VALUE ...]

``DIR`` is the ``examples/wmt`` folder of a Flax checkout: its ``models.py`` is imported
from there (nothing of it is kept here). Both models are Transformer base (or big) with
one shared 32k vocabulary, bfloat16 compute, dropout 0.1 and label smoothing 0.1. The
example's step is written here the way its ``train.py`` computes it: a one-hot smoothed
cross-entropy over the whole vocabulary, Adam(0.9, 0.98, 1e-9) with its warmup/rsqrt
schedule and no clipping. mt_flax's is ``steps.make_train_step`` with the WMT experiment's
settings. Both see ``rows x length`` source and target tokens per chip, data-parallel
over the slice, and are compiled by the same libtpu (needs the ``tpu`` extra, no TPU).

Prints one JSON object: per train step the HBM per chip, FLOPs, bytes accessed and the
roofline bound (as ``python -m mt_flax compile`` reports them), and the ratios of the
example's roofline bound and HBM to mt_flax's (above 1: mt_flax's is the smaller).
``--hlo-out DIR`` writes both compiled programs' HLO text, to look for the bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from bench import load_flax_example
from mt_flax import compile as aot
from mt_flax.config import load_config
from mt_flax.data import bucketing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 32000


def _with_hlo(row: dict, text: str, name: str, hlo_out: str | None) -> dict:
  """``row``, after writing ``text`` to ``hlo_out/name.hlo`` when ``hlo_out`` is given."""
  if hlo_out:
    os.makedirs(hlo_out, exist_ok=True)
    with open(os.path.join(hlo_out, f"{name}.hlo"), "w") as f:
      f.write(text)
  return row


def load_example(folder: str):
  """The example's ``models`` module, imported from ``folder``."""
  return load_flax_example(os.path.join(folder, "models.py"), "--flax-wmt", "models.py",
                           "Transformer")


def example_step(models, variant: str, warmup: int = 4000):
  """The example's model and its train step: (model, init_fn, step_fn)."""
  width = {"base": (512, 8, 2048), "big": (1024, 16, 4096)}[variant]
  cfg = models.TransformerConfig(
      vocab_size=VOCAB, output_vocab_size=VOCAB, share_embeddings=True,
      logits_via_embedding=True, dtype=jnp.bfloat16, emb_dim=width[0], num_heads=width[1],
      qkv_dim=width[0], mlp_dim=width[2], num_layers=6, max_len=256, dropout_rate=0.1,
      attention_dropout_rate=0.1, deterministic=False, decode=False)
  model = models.Transformer(cfg)
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, 0.0625 / np.sqrt(width[0]), warmup),
       lambda n: 0.0625 / np.sqrt(width[0]) * (n + warmup) ** -0.5 * warmup ** 0.5],
      [warmup])
  tx = optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.0)

  def init(rng, inputs, targets):
    params = model.init(rng, inputs, targets)["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt": tx.init(params)}

  def step(state, batch, rng):
    inputs, targets = batch["inputs"], batch["targets"]
    weights = (targets > 0).astype(jnp.float32)
    rng = jax.random.fold_in(rng, state["step"])
    smoothing = 0.1
    low = smoothing / (VOCAB - 1)
    constant = -((1 - smoothing) * np.log(1 - smoothing) + smoothing * np.log(low + 1e-20))

    def loss_fn(params):
      logits = model.apply({"params": params}, inputs, targets, rngs={"dropout": rng})
      soft = jax.nn.one_hot(targets, VOCAB) * (1 - smoothing - low) + low
      loss = -jnp.sum(soft * jax.nn.log_softmax(logits), axis=-1) - constant
      return jnp.sum(loss * weights) / jnp.sum(weights), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    metrics = {"loss": loss * jnp.sum(weights), "denominator": jnp.sum(weights),
               "accuracy": jnp.sum((jnp.argmax(logits, -1) == targets) * weights)}
    return ({"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
             "opt": opt}, metrics)

  return init, step


def compile_example(models, variant: str, topology, devices, rows: int, length: int, top: int,
                    hlo_out: str | None = None):
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  replicated, rows_sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  init, step = example_step(models, variant)
  tokens = jax.ShapeDtypeStruct((rows * len(devices), length), jnp.int32, sharding=rows_sharded)
  state = jax.eval_shape(init, jax.random.key(0), tokens, tokens)
  state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                       state)
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
  jitted = jax.jit(step, donate_argnums=(0,))
  compiled = jitted.lower(state, {"inputs": tokens, "targets": tokens}, key).compile()
  row = aot.analyse(compiled, topology.chip, rows * len(devices) * length, topology.chips, top=top)
  return _with_hlo(row, compiled.as_text(), "flax_wmt", hlo_out)


def compile_mt_flax(variant: str, overrides: list[str], topology, devices, rows: int,
                    length: int, top: int, hlo_out: str | None = None):
  config = load_config(os.path.join(ROOT, "experiments", "wmt14_en_de.py") + f":{variant}",
                       [f"--config.data.vocab_size={VOCAB}", *overrides])
  bucket = bucketing.Bucket(rows=rows * len(devices), src_len=length, tgt_len=length)
  texts = {}
  report = aot.compile_steps(config, topology, [bucket], VOCAB, VOCAB, devices=devices,
                             top=top, log=lambda _: None, hlo=texts)[0]["train"]
  return _with_hlo(report, texts["train"], "mt_flax", hlo_out)


def summary(row: dict) -> dict:
  return {"hbm_gib": row["hbm"]["total_gib"], "tflops": row["flops"] / 1e12,
          "bytes_accessed_gib": row["bytes_accessed"] / aot.GiB,
          "roofline_ms": row["roofline"]["bound_s"] * 1e3, "bound_by": row["roofline"]["bound_by"],
          "hbm": {k: v for k, v in row["hbm"].items() if k.endswith("_gib")},
          **({"largest_instructions": row["largest_instructions"]}
             if "largest_instructions" in row else {})}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--flax-wmt", help="the examples/wmt folder of a Flax checkout")
  parser.add_argument("--topology", default="v5e-4")
  parser.add_argument("--rows", type=int, default=64, help="rows per chip")
  parser.add_argument("--length", type=int, default=64, help="source and target tokens per row")
  parser.add_argument("--variant", choices=("base", "big"), default="base")
  parser.add_argument("--mt-flax-only", action="store_true")
  parser.add_argument("--top", type=int, default=0, help="list the N largest instructions")
  parser.add_argument("--hlo-out", default=None, help="write each compiled step's HLO text here")
  args, overrides = parser.parse_known_args(argv)
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")
  topology = aot.parse_topology(args.topology)
  devices = aot.tpu_devices(topology)
  out = {"topology": topology.name, "rows_per_chip": args.rows, "length": args.length,
         "variant": args.variant, "overrides": overrides}
  out["mt_flax"] = summary(compile_mt_flax(args.variant, overrides, topology, devices,
                                           args.rows, args.length, args.top, args.hlo_out))
  if not args.mt_flax_only:
    if not args.flax_wmt:
      parser.error("--flax-wmt DIR is needed (or --mt-flax-only)")
    try:
      models = load_example(args.flax_wmt)
    except FileNotFoundError as e:
      sys.exit(str(e))
    out["flax_wmt"] = summary(compile_example(models, args.variant,
                                              topology, devices, args.rows, args.length,
                                              args.top, args.hlo_out))
    out["roofline_ratio"] = out["flax_wmt"]["roofline_ms"] / out["mt_flax"]["roofline_ms"]
    out["hbm_ratio"] = out["flax_wmt"]["hbm_gib"] / out["mt_flax"]["hbm_gib"]
  print(json.dumps(out, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())

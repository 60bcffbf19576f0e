"""End to end on spa_eng train: bucketing vs packing vs pad-to-max.

    python -m bench.pipeline [--quick] [--steps N] [--workdir runs/bench/spa_eng]

The Grain pipeline (:func:`mt_flax.data.train_iterator`) feeds the jitted train
step of ``experiments/spa_en.py`` (spa_eng English -> Spanish; its
``data.max_len`` 64 keeps every pair, so pad-to-max pads to the longest pair),
with the same token budget per batch in every mode. The modes
take turns, one step each, for the same number of steps, so they share the
machine's load. Each step blocks until done, so its time is its own.

Per mode: non-pad target tokens per second of wall time (data + step) with
compile time included and, ``steady``, over the steps that did not compile;
the seconds spent waiting for batches (``data_s``); padding efficiency per
side; the number of compilations of the step, the backend's compile seconds
and the wall time of the steps that compiled; the distinct batch shapes.
Bucketing and packing should each reach at least 2.5x the steady target
tokens/s of pad-to-max (the targets ``bench.all`` checks).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from bench import CompileCounter, environment
from bench.memory import snapshot
from mt_flax import data, steps
from mt_flax.config import load_config
from mt_flax.data.downloads import MANUAL_DIR_ENV
from mt_flax.model import Transformer, TransformerConfig

MODES = ("bucket", "pack", "pad")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "spa_en.py")
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")


def spa_eng_config(mode: str, workdir: str, *, manual_dir: str = "",
                   overrides: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """``experiments/spa_en.py`` with ``data.batching=mode``, data kept under ``workdir``."""
  return load_config(CONFIG, [
      f"--config.data.manual_dir={manual_dir}",
      f"--config.data.tfds_data_dir={os.path.join(workdir, 'tfds')}",
      f"--config.data.batching={mode}", *overrides])


class _Mode:
  """One batching mode: its iterator, train state, step function and tallies."""

  def __init__(self, mode: str, config: ml_collections.ConfigDict, tokenizer: data.Tokenizer):
    self.mode = mode
    model = Transformer(TransformerConfig.from_config(config.model, tokenizer.src_vocab_size,
                                                      tokenizer.tgt_vocab_size))
    optimizer = steps.make_optimizer(config)
    self.state = steps.create_train_state(model, optimizer, jax.random.key(int(config.seed)))
    self.step = steps.make_train_step(model, optimizer,
                                      label_smoothing=float(config.label_smoothing))
    self.batches = data.train_iterator(config, tokenizer)
    self.times: list[tuple[float, float, bool]] = []   # (data s, step s, compiled?)
    self.tokens: list[int] = []                  # non-pad targets per step
    self.real = {"src": 0, "tgt_out": 0}
    self.slots = {"src": 0, "tgt_out": 0}
    self.shapes: set[tuple[int, ...]] = set()
    self.compiles, self.compile_s = 0, 0.0

  def advance(self, counter: CompileCounter) -> None:
    """One batch through one train step, timed to completion."""
    start = time.perf_counter()
    batch = {k: np.asarray(v, np.int32) for k, v in next(self.batches).items()}
    loaded = time.perf_counter()
    before, before_s = counter.count, counter.seconds
    self.state, metrics = self.step(self.state, batch)
    jax.block_until_ready((self.state, metrics))
    self.times.append((loaded - start, time.perf_counter() - loaded, counter.count > before))
    self.compiles += counter.count - before
    self.compile_s += counter.seconds - before_s
    for key in self.real:
      self.real[key] += int(np.count_nonzero(batch[key]))
      self.slots[key] += batch[key].size
    self.tokens.append(int(np.count_nonzero(batch["tgt_out"])))
    self.shapes.add(batch["src"].shape + batch["tgt_out"].shape[1:])

  def summary(self) -> dict[str, Any]:
    wall = sum(d + s for d, s, _ in self.times)
    steady = [(d + s, n) for (d, s, c), n in zip(self.times, self.tokens) if not c]
    steady_s = sum(t for t, _ in steady)
    return {
        "steps": len(self.times), "target_tokens": sum(self.tokens), "wall_s": round(wall, 2),
        "data_s": round(sum(d for d, _, _ in self.times), 2),
        "target_tokens_per_s": round(sum(self.tokens) / wall, 1),
        "steady_steps": len(steady),
        "steady_target_tokens_per_s": (round(sum(n for _, n in steady) / steady_s, 1)
                                       if steady_s else None),
        "compilations": self.compiles, "backend_compile_s": round(self.compile_s, 2),
        "compiling_steps_s": round(wall - steady_s, 2),
        "src_padding_efficiency": round(self.real["src"] / self.slots["src"], 4),
        "tgt_padding_efficiency": round(self.real["tgt_out"] / self.slots["tgt_out"], 4),
        "shapes": ["x".join(map(str, s)) for s in sorted(self.shapes)],   # rows x S x T
    }


def compare(num_steps: int, workdir: str, *, manual_dir: str = "", modes=MODES,
            overrides: tuple[str, ...] = ()) -> dict[str, Any]:
  """Runs ``num_steps`` steps of every mode, in turns; returns per-mode figures and ratios.

  ``overrides`` (``--config.key=value``) apply to every mode's config.
  """
  configs = {m: spa_eng_config(m, workdir, manual_dir=manual_dir, overrides=overrides)
             for m in modes}
  tokenizer = data.load_or_train_tokenizer(configs[modes[0]], workdir)
  runs = [_Mode(m, configs[m], tokenizer) for m in modes]
  with CompileCounter() as counter:
    for _ in range(num_steps):
      for run in runs:
        run.advance(counter)
  out = {run.mode: run.summary() for run in runs}
  if "pad" in out:
    pad = out["pad"]
    for mode in out:
      if mode != "pad":
        out[mode]["speedup_vs_pad"] = round(
            out[mode]["target_tokens_per_s"] / pad["target_tokens_per_s"], 2)
        if out[mode]["steady_target_tokens_per_s"] and pad["steady_target_tokens_per_s"]:
          out[mode]["steady_speedup_vs_pad"] = round(
              out[mode]["steady_target_tokens_per_s"] / pad["steady_target_tokens_per_s"], 2)
  return out


def default_manual_dir() -> str:
  """``$MT_FLAX_MANUAL_DIR``, else the shared data folder beside the checkout, else ''."""
  if os.environ.get(MANUAL_DIR_ENV):
    return os.environ[MANUAL_DIR_ENV]
  return SHARED_DATA if os.path.isdir(SHARED_DATA) else ""


def run(quick: bool = True, num_steps: Optional[int] = None,
        workdir: str = os.path.join(ROOT, "runs", "bench", "spa_eng")) -> dict[str, Any]:
  num_steps = num_steps or (30 if quick else 200)
  config = spa_eng_config(MODES[0], workdir)
  results = compare(num_steps, workdir, manual_dir=default_manual_dir())
  return {"environment": environment(), "config": os.path.relpath(CONFIG, ROOT),
          "dataset": "spa_eng train (en->es)", "model": config.model.to_dict(),
          "batch_tokens": int(config.batch_tokens), "max_len": int(config.data.max_len),
          "num_buckets": int(config.data.num_buckets), "steps_per_mode": num_steps,
          "modes": results, "memory": snapshot()}


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="30 steps per mode instead of 200")
  parser.add_argument("--steps", type=int, default=None, help="steps per mode")
  parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "bench", "spa_eng"),
                      help="tokenizer and prepared dataset (reused between runs)")
  args = parser.parse_args(argv)
  print(json.dumps(run(args.quick, args.steps, args.workdir), indent=2))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

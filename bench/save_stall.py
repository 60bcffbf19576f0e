"""How long a checkpoint save holds up the training thread, this tree against a revision.

    python -m bench.save_stall --compare REV [--repeats 6] [--size base]

``mt_flax.checkpoint.save`` with an asynchronous manager returns once the
arrays are captured; Orbax writes them in the background. Whatever the call
does before returning (Orbax's copy to the host, and the digests of every
array) is time the training loop waits. Each side runs in its own process
(``PYTHONPATH`` = that checkout) on the same model state (Adam moments
included) of the chosen size, saving to a fresh folder each time; sides
alternate and the first save of each is left out. Prints JSON with the median
seconds the call took on each side and their ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

from bench import REPO, checkout, environment, median

SIZES = {"small": dict(d_model=256, num_heads=4, num_encoder_layers=3, num_decoder_layers=3,
                       mlp_dim=1024),
         "base": dict(d_model=512, num_heads=8, num_encoder_layers=6, num_decoder_layers=6,
                      mlp_dim=2048)}

# Runs in a fresh process with PYTHONPATH set to one checkout; argv: size json, folder, repeats.
SIDE = r"""
import json, sys, time
import jax, ml_collections
from mt_flax import checkpoint, steps
from mt_flax.model import Transformer, TransformerConfig
size, folder, repeats = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
model = Transformer(TransformerConfig(src_vocab_size=8192, tgt_vocab_size=8192,
                                      share_embeddings=True, tie_output=True, **size))
config = ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_steps=10, schedule="rsqrt",
                                        num_train_steps=100, weight_decay=0.0, grad_clip_norm=1.0))
optimizer = steps.make_optimizer(config)
state = jax.block_until_ready(steps.create_train_state(model, optimizer, jax.random.key(0)))
times = []
for i in range(repeats + 1):
  manager = checkpoint.make_manager(f"{folder}/{i}", async_save=True)
  start = time.perf_counter()
  checkpoint.save(manager, 1, state, {"position": i}, config)
  times.append(time.perf_counter() - start)
  manager.wait_until_finished()
  manager.close()
print(json.dumps({"save_call_s": times[1:]}))
"""


def side(root: str, size: dict, repeats: int) -> list[float]:
  folder = tempfile.mkdtemp(prefix="mt_flax_save_stall_")
  try:
    out = subprocess.run([sys.executable, "-c", SIDE, json.dumps(size), folder, str(repeats)],
                         env={**os.environ, "PYTHONPATH": root}, cwd=folder, check=True,
                         capture_output=True, text=True).stdout
  finally:
    shutil.rmtree(folder, ignore_errors=True)
  return json.loads(out.strip().splitlines()[-1])["save_call_s"]


def compare(rev: str, size_name: str, repeats: int, rounds: int = 2) -> dict:
  times = {"rev": [], "work": []}
  load = [os.getloadavg()[0]]
  with checkout(rev) as (rev_root, sha):
    for r in range(rounds):
      for name in (("rev", "work") if r % 2 == 0 else ("work", "rev")):
        times[name] += side(rev_root if name == "rev" else REPO, SIZES[size_name], repeats)
  load.append(os.getloadavg()[0])
  return {"rev": rev, "rev_commit": sha[:12], "size": size_name,
          "save_call_s_median": {k: round(median(v), 4) for k, v in times.items()},
          "save_call_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
          "rev_over_work": round(median(times["rev"]) / median(times["work"]), 2),
          "load_average_1min": [round(x, 2) for x in load], "environment": environment()}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--compare", metavar="REV", required=True)
  parser.add_argument("--size", choices=sorted(SIZES), default="base")
  parser.add_argument("--repeats", type=int, default=6, help="timed saves per side and round")
  args = parser.parse_args(argv)
  try:
    print(json.dumps(compare(args.compare, args.size, args.repeats), indent=2))
  except ValueError as e:
    parser.error(str(e))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

r"""Learning rate x model width on the tiny Bible config: a 2 x 2 grid, 4 trials.

    ./launch.sh sweep experiments/bible_en_es_tiny.py experiments/sweeps/bible_tiny_lr.py

Trials land in runs/sweeps/bible_en_es_tiny-bible_tiny_lr/trial_*; the ranked table
in results.md/results.csv there. Shorter trials for a quick look:
``... --config.num_train_steps=300 --config.eval_every_steps=100``.
"""
from mt_flax.sweep import grid


def get_sweep() -> list[dict]:
  return grid({"learning_rate": [1e-3, 3e-3], "model.d_model": [64, 128]})

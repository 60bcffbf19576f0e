r"""English->Spanish Transformers on Tatoeba pairs (spa_eng, the Keras example's data).

Variants: ``small`` (the default) and ``base``. Data first (prepares spa_eng,
trains the tokenizer, compares batching modes):

    MT_FLAX_MANUAL_DIR=../shared/data python -m mt_flax data-stats \
        --config experiments/spa_en.py:small --workdir runs/spa_en_small
    python -m mt_flax train --config experiments/spa_en.py:small --workdir runs/spa_en_small
    python -m mt_flax eval --workdir runs/spa_en_small --split test
    python -m mt_flax train --config experiments/spa_en.py:base --workdir runs/spa_en_base

small: 3+3 layers, d_model 256 (about 7.6M parameters with the 8000-piece shared
vocabulary), 8000 updates of about 8k tokens per side, roughly 60 epochs of the
~107k training pairs; well under an hour on one GPU, hours on CPU.
base: Transformer base sizes (6+6 layers, d_model 512, 8 heads, 2048 MLP; about
48M parameters), dropout 0.3 because the data is small for this model, 10000
updates, rsqrt schedule with the paper's warmup, bfloat16 compute: one GPU or a TPU VM.
Expected (not yet measured in this repository, record it here when run):
validation loss well under 2 nats/token for small, lower for base.

data-stats (one epoch of train batches, padding efficiency src / tgt): bucketing
with 8 shapes about 0.86 / 0.85 (no set of 8 shapes can exceed 0.93 / 0.93 on this
length distribution), packing about 0.96 / 0.97, pad-to-max about 0.15 / 0.15.
"""
from mt_flax.default_config import get_config as default_config


def get_config(variant: str = "small"):
  c = default_config()
  c.batch_tokens = 8192
  c.data.update(name="spa_eng", max_len=64,    # the longest pair has 62 tokens
                pack_len=128, eval_src_len_edges=(5, 10, 15, 20))  # Tatoeba sentences are short
  if variant == "small":
    c.update(num_train_steps=8000, warmup_steps=500, schedule="cosine",
             min_learning_rate_ratio=0.05, eval_every_steps=1000, eval_bleu_examples=500)
    c.model.update(d_model=256, num_heads=4, num_encoder_layers=3, num_decoder_layers=3,
                   mlp_dim=1024)
  elif variant == "base":
    c.update(num_train_steps=10000, warmup_steps=4000, grad_clip_norm=0.0,
             checkpoint_every_steps=1000, eval_every_steps=1000, eval_bleu_examples=1000,
             log_every_steps=100)
    c.learning_rate = 512**-0.5 * 4000**-0.5    # Vaswani et al. (2017), about 6.99e-4
    c.model.update(dropout_rate=0.3, dtype="bfloat16")
  else:
    raise ValueError(f"unknown variant {variant!r}; expected small or base")
  return c

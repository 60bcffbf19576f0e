r"""Tiny English->Spanish Transformer on the Bible (WEB <-> Reina-Valera 1909).

The default main job: trains and validates end to end on 2 CPU cores. Variants:
``default`` (this job) and ``test`` (a tiny model and 24 steps, what the tests train).

    python -m mt_flax train --config experiments/bible_en_es_tiny.py --workdir runs/bible_tiny
    python -m mt_flax eval --workdir runs/bible_tiny

2+2 pre-LN layers, d_model 128 (1.44M parameters with the 4000-piece shared
vocabulary), 4000 updates of about 860 target tokens (3.4M target tokens, about
3.4 epochs of the ~29k verse pairs), cosine schedule from 3e-3 after 500 warmup
steps, no dropout.

Why small batches and no dropout: on 2 cores the step costs the same per token at
1k or 4k tokens per batch, so 4000 updates of 1k tokens take the time of 1000 of
4k and learn more from the same tokens; in 3.4 epochs this model underfits, and
dropout only slows it down (docs/performance.md has the batch-size and dropout runs).

Reaches (seed 0; deterministic): validation loss 2.91 / 2.45 nats/token on the first
500 validation pairs at steps 2000 / 4000 (a unigram model of the targets scores 6.01
there, a uniform one ln(4000) = 8.29); greedy BLEU / chrF on the first 100
validation pairs 13.7 / 37.0 and 22.5 / 44.6; test split, beam 4: BLEU 24.64 / chrF
45.01 (multi-reference 24.58 / 44.98). Cost on 2 CPU cores with an empty compilation
cache: about 6 minutes for tokenizer training, compiling 8 bucket shapes, 4000 steps
and 2 validations, then about 1 minute for the beam-4 test evaluation.
"""
from mt_flax.default_config import get_config as default_config


def get_config(variant: str = "default"):
  c = default_config()
  c.update(num_train_steps=4000, warmup_steps=500, learning_rate=3e-3, schedule="cosine",
           min_learning_rate_ratio=0.05, batch_tokens=1024, checkpoint_every_steps=1000,
           eval_every_steps=2000, log_every_steps=100)
  # Exact bucket lengths: a CPU gains nothing from lengths rounded to a multiple, and the
  # figures above were measured with exact ones.
  c.data.update(vocab_size=4000, max_len=96, length_multiple=1)
  c.model.update(d_model=128, num_heads=4, num_encoder_layers=2, num_decoder_layers=2,
                 mlp_dim=512, dropout_rate=0.0)
  if variant == "test":
    # What the tests train: the same data and schedule, a model of 1+1 layers and d_model 32
    # with a 256-piece vocabulary, 24 steps, every step logged, a validation and a checkpoint
    # every 12 steps; dropout on, so that resumed runs must restore the dropout RNG too.
    # Outputs of at most 8 tokens keep decoding a barely trained model (it never ends a
    # sentence) quick; one validation shape and one decode width make one program of each.
    c.update(num_train_steps=24, warmup_steps=8, checkpoint_every_steps=12, eval_every_steps=12,
             log_every_steps=1, eval_bleu_examples=4, best_metric="eval_loss", best_mode="min",
             progress_bar=False)
    c.data.update(vocab_size=256, num_buckets=1, eval_max_examples=24, eval_shapes=1)
    c.model.update(d_model=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                   mlp_dim=64, dropout_rate=0.1)
    c.decode.update(max_len_a=0.0, max_len_b=8, min_width=96)
  elif variant != "default":
    raise ValueError(f"unknown variant {variant!r}; expected default or test")
  return c

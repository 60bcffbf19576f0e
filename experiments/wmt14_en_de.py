r"""Transformer base and big on WMT14 English->German, the settings of Vaswani et al. (2017).

Variants: ``base`` (the default) and ``big``.

    ./launch.sh tpu run --name mt-wmt --zone ZONE --accelerator v4-8 \
        --data-dir gs://BUCKET/tensorflow_datasets -- \
        train --config experiments/wmt14_en_de.py:base --workdir gs://BUCKET/runs/wmt14_base
    ./launch.sh tpu run ... -- eval --workdir gs://BUCKET/runs/wmt14_base --split test
    # big: --accelerator v4-32 and --config experiments/wmt14_en_de.py:big

As in the paper: 6+6 post-LN layers, one source/target embedding tied to the
output projection, sinusoidal positions, dropout 0.1 (base) / 0.3 (big), label
smoothing 0.1, Adam(0.9, 0.98, 1e-9) with lr = d_model**-0.5 * min(step**-0.5,
step * 4000**-1.5) (our "rsqrt" schedule, warmup 4000), about 25000 source and
25000 target tokens per update, a ~37k shared BPE vocabulary. base: d_model 512,
8 heads, 2048 MLP (about 63M parameters here), 100k updates. big: d_model 1024,
16 heads, 4096 MLP (about 214M), 300k updates; --config.mesh.fsdp=4 shards
parameters and optimizer state when memory is short. Data: TFDS
wmt14_translate/de-en (validation newstest2013, test newstest2014), bfloat16
compute, float32 parameters. batch_tokens is the whole update over all devices;
where a batch does not fit in memory, raise grad_accum_steps.

Expected: the paper reports newstest2014 BLEU 27.3 (base) and 28.4 (big), with the
last 5 / 20 checkpoints averaged, beam 4, alpha 0.6. Not run in this repository.
"""
from mt_flax.default_config import get_config as default_config


def get_config(variant: str = "base"):
  c = default_config()
  c.warmup_steps = 4000
  c.grad_clip_norm = 0.0
  c.batch_tokens = 25000
  c.checkpoint_every_steps = 2000
  c.eval_every_steps = 2000
  c.keep_checkpoints = 5
  c.eval_bleu_examples = 1000
  c.log_every_steps = 100
  c.data.name = "wmt14_translate/de-en"
  c.data.tgt_lang = "de"
  c.data.vocab_size = 37000
  c.data.tokenizer_type = "bpe"
  c.data.max_len = 256
  c.data.num_buckets = 16
  c.data.eval_max_examples = 0                 # all of newstest2013
  c.model.pre_ln = False
  c.model.dtype = "bfloat16"
  c.decode.max_len_a = 1.0                     # input length + 50, as in the paper
  c.decode.max_len_b = 50
  if variant == "base":
    c.num_train_steps = 100000
  elif variant == "big":
    c.num_train_steps = 300000
    c.model.d_model = 1024
    c.model.num_heads = 16
    c.model.mlp_dim = 4096
    c.model.dropout_rate = 0.3
  else:
    raise ValueError(f"unknown variant {variant!r}; expected base or big")
  c.learning_rate = c.model.d_model**-0.5 * c.warmup_steps**-0.5
  return c

r"""Transformer base and big on WMT14 English->German, the settings of Vaswani et al. (2017).

Variants: ``base`` (the default), ``big``, and ``fp32``: base computing in float32, for
a CPU, where bfloat16 saves nothing (XLA's CPU compiler computes bfloat16 matmuls in
float32, with conversions around them).

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
wmt14_translate/de-en (validation newstest2013, test newstest2014). bfloat16
compute (matmuls; layer norm, softmax, the loss and the logits that beam search
ranks stay float32), float32 parameters and AdamW moments. batch_tokens is the
whole update over all devices; where a batch does not fit in memory, raise
grad_accum_steps.

Expected: the paper reports newstest2014 BLEU 27.3 (base) and 28.4 (big), with the
last 5 / 20 checkpoints averaged, beam 4, alpha 0.6. Not run in this repository.
"""
from mt_flax.default_config import get_config as default_config


def get_config(variant: str = "base"):
  c = default_config()
  # no clipping, so the gradient norm is a metric only: 5% of a base step's bytes on a TPU
  c.update(warmup_steps=4000, grad_clip_norm=0.0, log_grad_norm=False, batch_tokens=25000,
           checkpoint_every_steps=2000,
           eval_every_steps=2000, keep_checkpoints=5, eval_bleu_examples=1000, log_every_steps=100)
  c.data.update(name="wmt14_translate/de-en", tgt_lang="de", vocab_size=37000,
                tokenizer_type="bpe", max_len=256, num_buckets=16,
                eval_max_examples=0)                   # all of newstest2013
  c.model.update(pre_ln=False, dtype="bfloat16")
  c.decode.update(max_len_a=1.0, max_len_b=50)         # input length + 50, as in the paper
  if variant in ("base", "fp32"):
    c.num_train_steps = 100000
    if variant == "fp32":
      c.model.dtype = "float32"
  elif variant == "big":
    c.num_train_steps = 300000
    c.model.update(d_model=1024, num_heads=16, mlp_dim=4096, dropout_rate=0.3)
  else:
    raise ValueError(f"unknown variant {variant!r}; expected base, big or fp32")
  c.learning_rate = c.model.d_model**-0.5 * c.warmup_steps**-0.5
  return c

r"""Transformer big on WMT14 English->German, the settings of Vaswani et al. (2017).

    ./launch.sh tpu run --name mt-wmt --zone ZONE --accelerator v4-32 \
        --data-dir gs://BUCKET/tensorflow_datasets -- \
        train --config experiments/wmt14_en_de_big.py --workdir gs://BUCKET/runs/wmt14_big
    ./launch.sh tpu run ... -- eval --workdir gs://BUCKET/runs/wmt14_big --split test

As in the paper: 6+6 post-LN layers, d_model 1024, 16 heads, 4096 MLP (about 214M
parameters here), dropout 0.3, label smoothing 0.1, one source/target embedding
tied to the output projection, sinusoidal positions, Adam(0.9, 0.98, 1e-9) with
lr = d_model**-0.5 * min(step**-0.5, step * 4000**-1.5) (our "rsqrt" schedule with
warmup 4000 and peak 1024**-0.5 * 4000**-0.5 = 4.94e-4), 300k updates of about 25000 source and
25000 target tokens, a ~37k shared BPE vocabulary. Data: TFDS wmt14_translate/de-en
(validation newstest2013, test newstest2014). bfloat16 compute, float32 parameters.
batch_tokens is the whole update over all devices; where a batch does not fit in
memory, raise grad_accum_steps (it splits the batch into microbatches).

The model fits data parallel on TPU v4; --config.mesh.fsdp=4 shards parameters and
optimizer state over 4 devices when memory is short.

Expected: newstest2014 BLEU about 28.4. The paper averages the last 20 checkpoints
before decoding with beam 4 and alpha 0.6; this repository does not average
checkpoints, so expect a little less. Not run in this repository.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_train_steps = 300000
  c.warmup_steps = 4000
  c.learning_rate = 4.94e-4        # = 1024**-0.5 * 4000**-0.5
  c.schedule = "rsqrt"           # "rsqrt" or "cosine"
  c.min_learning_rate_ratio = 0.0  # cosine only: final / peak rate
  c.adam_b1 = 0.9
  c.adam_b2 = 0.98
  c.adam_eps = 1e-9
  c.weight_decay = 0.0            # AdamW, matrices only
  c.grad_clip_norm = 0.0          # 0 = no clipping
  c.grad_accum_steps = 1          # microbatches per update
  c.label_smoothing = 0.1
  c.batch_tokens = 25000          # token budget of one global batch (per side)
  c.checkpoint_every_steps = 2000
  c.eval_every_steps = 2000
  c.keep_checkpoints = 5          # the last K checkpoints, plus the best one
  c.async_checkpointing = True
  c.eval_bleu_examples = 1000      # validation pairs decoded (greedy) for BLEU/chrF at each evaluation
  c.best_metric = "bleu"          # validation metric that picks the best checkpoint
  c.best_mode = "max"             # "min" or "max"
  c.log_every_steps = 100
  c.progress_bar = True
  c.parallelism = "jit"           # "jit" (NamedSharding over a mesh) or "pmap"
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: fill the devices

  c.data = ml_collections.ConfigDict()
  c.data.name = "wmt14_translate/de-en"  # TFDS builder name
  c.data.src_lang = "en"
  c.data.tgt_lang = "de"
  c.data.manual_dir = ""          # folder holding downloaded archives; env MT_FLAX_MANUAL_DIR too
  c.data.tfds_data_dir = ""       # where prepared array_record files live ("" = TFDS default)
  c.data.vocab_size = 37000       # shared BPE, as in the paper
  c.data.shared_vocab = True
  c.data.tokenizer_type = "bpe"
  c.data.max_len = 256            # tokens per side, EOS included
  c.data.overlong = "drop"        # "drop" or "truncate"
  c.data.batching = "bucket"      # "bucket", "pack" or "pad"
  c.data.num_buckets = 16
  c.data.pack_len = 0             # packed row length of the shorter side (0 = max_len)
  c.data.eval_max_examples = 0    # all of newstest2013
  c.data.eval_src_len_edges = (10, 20, 40, 80)
  c.data.eval_long_examples = 50

  c.model = ml_collections.ConfigDict()
  c.model.d_model = 1024
  c.model.num_heads = 16
  c.model.num_encoder_layers = 6
  c.model.num_decoder_layers = 6
  c.model.mlp_dim = 4096
  c.model.dropout_rate = 0.3
  c.model.attention_dropout_rate = 0.0
  c.model.share_embeddings = True
  c.model.tie_output = True
  c.model.pre_ln = False
  c.model.positions = "sinusoidal"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"

  c.decode = ml_collections.ConfigDict()
  c.decode.beam_size = 4
  c.decode.alpha = 0.6
  c.decode.max_len_a = 1.0        # max target length = input length + 50, as in the paper
  c.decode.max_len_b = 50
  return c

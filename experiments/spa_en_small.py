r"""Small English->Spanish Transformer on Tatoeba pairs (spa_eng, the Keras example's data).

Data first (prepares spa_eng, trains the tokenizer, compares batching modes):

    MT_FLAX_MANUAL_DIR=../shared/data python -m mt_flax data-stats \
        --config experiments/spa_en_small.py --workdir runs/spa_en_small

    python -m mt_flax train --config experiments/spa_en_small.py --workdir runs/spa_en_small
    python -m mt_flax eval --workdir runs/spa_en_small --split test

A 3+3-layer, d_model 256 model (about 7.6M parameters with the 8000-piece shared
vocabulary), 8000 updates of about 8k tokens per side: roughly 60 epochs of the
~107k training pairs. On one GPU it takes well under an hour; on CPU it is slow
(hours). Expected (not yet measured in this repository, record it here when run):
validation loss well under 2 nats/token and translations that are mostly right
for short sentences; the best checkpoint is kept by validation loss.

data-stats on this config (one epoch of train batches, padding efficiency src / tgt):
bucketing with 8 shapes about 0.86 / 0.85 (no set of 8 shapes can exceed 0.93 / 0.93
on this length distribution), packing about 0.96 / 0.97, pad-to-max about 0.15 / 0.15.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_train_steps = 8000
  c.warmup_steps = 500
  c.learning_rate = 1e-3          # peak learning rate
  c.schedule = "cosine"           # "rsqrt" or "cosine"
  c.min_learning_rate_ratio = 0.05  # cosine only: final / peak rate
  c.adam_b1 = 0.9
  c.adam_b2 = 0.98
  c.adam_eps = 1e-9
  c.weight_decay = 0.0            # AdamW, matrices only
  c.grad_clip_norm = 1.0          # 0 = no clipping
  c.grad_accum_steps = 1          # microbatches per update
  c.label_smoothing = 0.1
  c.batch_tokens = 8192           # token budget of one global batch (per side)
  c.checkpoint_every_steps = 500
  c.eval_every_steps = 1000
  c.keep_checkpoints = 2          # the last K checkpoints, plus the best one
  c.async_checkpointing = True
  c.eval_bleu_examples = 500       # validation pairs decoded (greedy) for BLEU/chrF at each evaluation
  c.best_metric = "bleu"          # validation metric that picks the best checkpoint
  c.best_mode = "max"             # "min" or "max"
  c.log_every_steps = 50
  c.progress_bar = True
  c.parallelism = "jit"           # "jit" (NamedSharding over a mesh) or "pmap"
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: fill the devices

  c.data = ml_collections.ConfigDict()
  c.data.name = "spa_eng"         # TFDS builder name, e.g. "spa_eng", "wmt14_translate/de-en"
  c.data.src_lang = "en"
  c.data.tgt_lang = "es"
  c.data.manual_dir = ""          # folder holding downloaded archives; env MT_FLAX_MANUAL_DIR too
  c.data.tfds_data_dir = ""       # where prepared array_record files live ("" = TFDS default)
  c.data.vocab_size = 8000
  c.data.shared_vocab = True
  c.data.tokenizer_type = "unigram"
  c.data.max_len = 64             # tokens per side, EOS included (the longest pair has 62)
  c.data.overlong = "drop"        # "drop" or "truncate"
  c.data.batching = "bucket"      # "bucket", "pack" or "pad"
  c.data.num_buckets = 8
  c.data.pack_len = 128           # packed row length of the shorter side (0 = max_len)
  c.data.eval_max_examples = 500
  c.data.eval_src_len_edges = (5, 10, 15, 20)  # source-length slices 1-5, 6-10, …, 21+
  c.data.eval_long_examples = 50  # "long" stress examples (joined pairs beyond max_len)

  c.model = ml_collections.ConfigDict()
  c.model.d_model = 256
  c.model.num_heads = 4
  c.model.num_encoder_layers = 3
  c.model.num_decoder_layers = 3
  c.model.mlp_dim = 1024
  c.model.dropout_rate = 0.1
  c.model.attention_dropout_rate = 0.0
  c.model.share_embeddings = True
  c.model.tie_output = True
  c.model.pre_ln = True
  c.model.positions = "sinusoidal"
  c.model.dtype = "float32"       # "bfloat16" on TPU / recent GPUs
  c.model.param_dtype = "float32"

  c.decode = ml_collections.ConfigDict()
  c.decode.beam_size = 4
  c.decode.alpha = 0.6
  c.decode.max_len_a = 1.5        # max target length = a * source length + b
  c.decode.max_len_b = 10
  return c

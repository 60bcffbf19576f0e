r"""Small English->Spanish Transformer on Tatoeba pairs (spa_eng, the Keras example's data).

Data first (prepares spa_eng, trains the tokenizer, compares batching modes):

    MT_FLAX_MANUAL_DIR=../shared/data python -m mt_flax data-stats \
        --config experiments/spa_en_small.py --workdir runs/spa_en_small

    python -m mt_flax train --config experiments/spa_en_small.py --workdir runs/spa_en_small

data-stats on this config (one epoch of train batches, padding efficiency src / tgt):
bucketing with 8 shapes about 0.86 / 0.85 (no set of 8 shapes can exceed 0.93 / 0.93
on this length distribution), packing about 0.96 / 0.97, pad-to-max about 0.15 / 0.15.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_train_steps = 1500
  c.warmup_steps = 300
  c.learning_rate = 2e-3          # peak learning rate
  c.schedule = "rsqrt"            # "rsqrt" or "cosine"
  c.weight_decay = 0.0
  c.grad_clip_norm = 1.0
  c.grad_accum_steps = 1
  c.label_smoothing = 0.1
  c.batch_tokens = 4096           # token budget of one global batch (per side)
  c.checkpoint_every_steps = 250
  c.eval_every_steps = 500
  c.keep_checkpoints = 2
  c.log_every_steps = 25
  c.parallelism = "jit"           # "jit" (NamedSharding over a mesh) or "pmap"
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

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
  c.model.d_model = 128
  c.model.num_heads = 4
  c.model.num_encoder_layers = 2
  c.model.num_decoder_layers = 2
  c.model.mlp_dim = 512
  c.model.dropout_rate = 0.1
  c.model.attention_dropout_rate = 0.0
  c.model.share_embeddings = True
  c.model.tie_output = True
  c.model.pre_ln = True
  c.model.positions = "sinusoidal"
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"

  c.decode = ml_collections.ConfigDict()
  c.decode.beam_size = 4
  c.decode.alpha = 0.6
  c.decode.max_len_a = 1.5        # max target length = a * source length + b
  c.decode.max_len_b = 10
  return c

r"""Transformer base (Vaswani et al. 2017 sizes) English->Spanish on Tatoeba pairs (spa_eng).

    python -m mt_flax train --config experiments/spa_en_base.py --workdir runs/spa_en_base
    python -m mt_flax eval --workdir runs/spa_en_base --split test

The base model (6+6 layers, d_model 512, 8 heads, 2048 MLP; about 48M parameters
with the 8000-piece shared vocabulary) on ~107k short training pairs (about 1.1M
target tokens): dropout 0.3 because the data is small for this model, 10000
updates of about 8k tokens per side (roughly 60 epochs), rsqrt schedule with the
paper's warmup. Pre-LN, bfloat16 compute: one GPU or a TPU VM. Expected (not yet
measured in this repository, record it here when run): a lower validation loss
than spa_en_small; the best checkpoint is kept by validation loss.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_train_steps = 10000
  c.warmup_steps = 4000
  c.learning_rate = 7e-4           # = 512**-0.5 * 4000**-0.5, Vaswani et al.
  c.schedule = "rsqrt"           # "rsqrt" or "cosine"
  c.min_learning_rate_ratio = 0.0  # cosine only: final / peak rate
  c.adam_b1 = 0.9
  c.adam_b2 = 0.98
  c.adam_eps = 1e-9
  c.weight_decay = 0.0            # AdamW, matrices only
  c.grad_clip_norm = 0.0          # 0 = no clipping
  c.grad_accum_steps = 1          # microbatches per update
  c.label_smoothing = 0.1
  c.batch_tokens = 8192          # token budget of one global batch (per side)
  c.checkpoint_every_steps = 1000
  c.eval_every_steps = 1000
  c.keep_checkpoints = 2          # the last K checkpoints, plus the best one
  c.async_checkpointing = True
  c.eval_bleu_examples = 1000      # validation pairs decoded (greedy) for BLEU/chrF at each evaluation
  c.best_metric = "bleu"          # validation metric that picks the best checkpoint
  c.best_mode = "max"             # "min" or "max"
  c.log_every_steps = 100
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
  c.model.d_model = 512
  c.model.num_heads = 8
  c.model.num_encoder_layers = 6
  c.model.num_decoder_layers = 6
  c.model.mlp_dim = 2048
  c.model.dropout_rate = 0.3
  c.model.attention_dropout_rate = 0.0
  c.model.share_embeddings = True
  c.model.tie_output = True
  c.model.pre_ln = True
  c.model.positions = "sinusoidal"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"

  c.decode = ml_collections.ConfigDict()
  c.decode.beam_size = 4
  c.decode.alpha = 0.6
  c.decode.max_len_a = 1.5        # max target length = a * source length + b
  c.decode.max_len_b = 10
  return c

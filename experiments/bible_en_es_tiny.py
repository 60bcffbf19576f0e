r"""Tiny English->Spanish Transformer on the Bible (WEB <-> Reina-Valera 1909).

The default main job: trains and validates end to end on 2 CPU cores.

    python -m mt_flax train --config experiments/bible_en_es_tiny.py --workdir runs/bible_tiny
    python -m mt_flax eval --workdir runs/bible_tiny

2+2 pre-LN layers, d_model 128 (1.44M parameters with the 4000-piece shared
vocabulary), 1000 updates of about 3.5k target tokens (about 3.4 epochs of the
~29k verse pairs), cosine schedule from 3e-3 after 150 warmup steps.

Reaches (measured, seed 0, the same in three runs): validation loss 3.02
nats/token (perplexity 20.5, token accuracy 41%) on the first 500 validation
pairs, from 4.24 / 3.46 / 3.12 at steps 250 / 500 / 750; a unigram model of the
targets scores 6.01 there and a uniform one ln(4000) = 8.29. Greedy BLEU / chrF
on the first 100 validation pairs: 3.5 / 15.3, 7.7 / 27.6, 13.9 / 32.8 and
14.9 / 35.6 at steps 250 / 500 / 750 / 1000 (the best checkpoint is kept by BLEU).
Cost: about 20 CPU-minutes (tokenizer training, compiling 8 bucket shapes, 1000
steps, 4 validations); 19 minutes of wall time on 2 cores shared with other jobs
(load average about 4, empty compilation cache), about 6.6k tokens/s (source +
target, compile time excluded).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_train_steps = 1000
  c.warmup_steps = 150
  c.learning_rate = 3e-3          # peak learning rate
  c.schedule = "cosine"           # "rsqrt" or "cosine"
  c.min_learning_rate_ratio = 0.05  # cosine only: final / peak rate
  c.adam_b1 = 0.9
  c.adam_b2 = 0.98
  c.adam_eps = 1e-9
  c.weight_decay = 0.0            # AdamW, matrices only
  c.grad_clip_norm = 1.0          # 0 = no clipping
  c.grad_accum_steps = 1          # microbatches per update
  c.label_smoothing = 0.1
  c.batch_tokens = 4096           # token budget of one global batch (per side)
  c.checkpoint_every_steps = 250
  c.eval_every_steps = 250
  c.keep_checkpoints = 2          # the last K checkpoints, plus the best one
  c.async_checkpointing = True
  c.eval_bleu_examples = 100       # validation pairs decoded (greedy) for BLEU/chrF at each evaluation
  c.best_metric = "bleu"          # validation metric that picks the best checkpoint
  c.best_mode = "max"             # "min" or "max"
  c.log_every_steps = 25
  c.progress_bar = True
  c.parallelism = "jit"           # "jit" (NamedSharding over a mesh) or "pmap"
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: fill the devices

  c.data = ml_collections.ConfigDict()
  c.data.name = "bible_en_es"     # TFDS builder name, e.g. "spa_eng", "wmt14_translate/de-en"
  c.data.src_lang = "en"
  c.data.tgt_lang = "es"
  c.data.manual_dir = ""          # folder holding downloaded archives; env MT_FLAX_MANUAL_DIR too
  c.data.tfds_data_dir = ""       # where prepared array_record files live ("" = TFDS default)
  c.data.vocab_size = 4000
  c.data.shared_vocab = True
  c.data.tokenizer_type = "unigram"
  c.data.max_len = 96             # tokens per side, EOS included
  c.data.overlong = "drop"        # "drop" or "truncate"
  c.data.batching = "bucket"      # "bucket", "pack" or "pad"
  c.data.num_buckets = 8
  c.data.eval_max_examples = 500

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

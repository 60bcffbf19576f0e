"""The one default config: every key that exists, once, with what it means.

Experiment files in ``experiments/`` start from :func:`get_config` and override
only what differs. :func:`mt_flax.config.load_config` refuses any key that is not
here (in a file, on the command line or in a sweep), so a typo cannot be
silently ignored. Nothing else in the package holds a default for these keys.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                        # parameters, dropout and data order
  c.num_train_steps = 1000          # optimizer updates
  c.warmup_steps = 100              # linear warmup to learning_rate
  c.learning_rate = 1e-3            # peak learning rate
  c.schedule = "rsqrt"              # "rsqrt" (inverse square root) or "cosine"
  c.min_learning_rate_ratio = 0.0   # cosine only: final / peak rate
  c.adam_b1 = 0.9
  c.adam_b2 = 0.98
  c.adam_eps = 1e-9
  c.weight_decay = 0.0              # AdamW, on matrices only
  c.grad_clip_norm = 1.0            # global-norm clipping; 0 = none
  c.log_grad_norm = True            # the gradients' global norm in every train line (on a
                                    # TPU it joins the AdamW update: docs/performance.md)
  c.allow_low_precision_params = False  # train a model.param_dtype narrower than float32
                                    # (AdamW's moments then as narrow); refused otherwise
  c.grad_accum_steps = 1            # microbatches per update (same update, less memory)
  c.label_smoothing = 0.1
  c.batch_tokens = 4096             # tokens of one global batch per side, over all devices
  c.checkpoint_every_steps = 500
  c.eval_every_steps = 500
  c.keep_checkpoints = 2            # the last K checkpoints, plus the best one
  c.async_checkpointing = True      # save in the background while training goes on
  c.eval_bleu_examples = 100        # validation pairs decoded (greedy) for BLEU/chrF; 0 = off
  c.best_metric = "bleu"            # validation metric that picks the best checkpoint
  c.best_mode = "max"               # "min" or "max"
  c.log_every_steps = 50
  c.sync_every_steps = 10           # on several processes, signals, the workdir lock and the
                                    # save in flight are agreed every N steps (one gather)
  c.progress_bar = True
  c.compilation_cache_dir = ""      # JAX compilation cache (gs:// ok: a restarted pod loads
                                    # its programs); "" = $JAX_COMPILATION_CACHE_DIR or ~/.cache
  c.parallelism = "jit"             # "jit" (NamedSharding over a mesh) or "pmap"
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                  # data-parallel ways; -1 = the devices left over
  c.mesh.fsdp = 1                   # parameter and optimizer-state sharding ways
  c.mesh.tensor = 1                 # tensor-parallel ways (heads, MLP)

  c.data = ml_collections.ConfigDict()
  c.data.name = "bible_en_es"       # TFDS builder, e.g. "spa_eng", "wmt14_translate/de-en"
  c.data.src_lang = "en"
  c.data.tgt_lang = "es"
  c.data.manual_dir = ""            # folder of downloaded archives; env MT_FLAX_MANUAL_DIR too
  c.data.tfds_data_dir = ""         # prepared array_record files ("" = TFDS default, gs:// ok)
  c.data.vocab_size = 8000          # SentencePiece pieces (per language unless shared)
  c.data.shared_vocab = True        # one tokenizer for both languages
  c.data.tokenizer_type = "unigram"  # "unigram" or "bpe"
  c.data.max_len = 128              # tokens per side, EOS included
  c.data.overlong = "drop"          # longer training pairs: "drop" or "truncate"
  c.data.batching = "bucket"        # "bucket" (by length), "pack" (segments) or "pad"
  c.data.num_buckets = 8            # distinct batch shapes when bucketing
  c.data.length_multiple = 8        # bucket lengths rounded up to a multiple of this (TPU: 128
                                    # for long sequences); 1 = exact lengths
  c.data.pack_len = 0               # row length when packing; 0 = max_len
  c.data.prefetch = 2               # training batches built and put on the devices by a
                                    # background thread ahead of the step; 0 = off (built
                                    # when the step needs it)
  c.data.eval_max_examples = 0      # validation pairs for the loss (first N); 0 = all
  c.data.eval_shapes = 8            # most (S, T) shapes of validation batches (compiles)
  c.data.eval_src_len_edges = (10, 20, 40, 80)  # source-length slices of the eval report
  c.data.eval_long_examples = 50    # longest test pairs kept as the "long" stress slice

  c.model = ml_collections.ConfigDict()
  c.model.d_model = 512
  c.model.num_heads = 8
  c.model.num_encoder_layers = 6
  c.model.num_decoder_layers = 6
  c.model.mlp_dim = 2048
  c.model.dropout_rate = 0.1
  c.model.attention_dropout_rate = 0.0
  c.model.share_embeddings = True   # one source/target embedding (needs shared_vocab)
  c.model.tie_output = True         # output projection = target embedding transposed
  c.model.pre_ln = True             # layer norm before (True) or after each sublayer
  c.model.positions = "sinusoidal"  # "sinusoidal" or "learned"
  c.model.max_len = 1024            # longest position for learned positions
  c.model.dtype = "float32"         # compute dtype, e.g. "bfloat16"
  c.model.param_dtype = "float32"
  c.model.attention = "xla"         # "xla" (dense masks), "cudnn" (GPU, bf16/fp16; packed rows
                                    # fall back to "xla") or "splash" (TPU); decoding and
                                    # attention dropout always take "xla"

  c.decode = ml_collections.ConfigDict()
  c.decode.beam_size = 4            # 1 = greedy
  c.decode.alpha = 0.6              # length penalty ((5 + len) / 6) ** alpha
  c.decode.beam_rule = "t5x"        # "t5x": any EOS of the 2K candidates may finish, stop when
                                    # no alive beam can win; "fairseq": EOS in the first K, stop at K
  c.decode.max_len_a = 1.5          # longest output = a * source length + b tokens
  c.decode.max_len_b = 10
  c.decode.min_width = 16           # narrowest padded source width of a decode batch (widths
                                    # grow x1.5/x4/3); data.max_len: one shape to compile
  return c

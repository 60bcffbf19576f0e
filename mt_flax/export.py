"""Export a trained run to CTranslate2: the same Transformer, the same outputs.

:func:`transformer_spec` maps the parameters of :class:`mt_flax.model.Transformer`
onto ``ctranslate2.specs.TransformerSpec`` one to one:

- pre-LN (``model.pre_ln=True``, with final encoder/decoder layer norms) or
  post-LN; layer norms with epsilon 1e-6 (Flax's; CTranslate2 defaults to 1e-5);
- attention projections without biases, written as CTranslate2's fused
  ``[3D, D]`` query/key/value (self) and ``[D, D]`` + ``[2D, D]`` (cross)
  matrices, heads laid out as Flax's ``[D, N, H]`` kernels;
- token embeddings scaled by sqrt(d_model), shared source/target embeddings
  and the tied output projection kept shared;
- positions as an explicit table: mt_flax's sinusoids start at position 0,
  CTranslate2's built-in ones at position 1, so the table is always written
  (``POSITIONS`` rows for sinusoids, ``model.max_len`` for learned positions);
- ReLU feed-forward layers with biases.

The source vocabulary ends every source with ``</s>`` (``add_source_eos``), as
mt_flax's encoder reads it, and the decoder starts from ``<s>``.

How CTranslate2's search relates to mt_flax's (:mod:`mt_flax.decode`) is
written into the exported README: greedy search is the same; CTranslate2's
beam search is mt_flax's ``beam_rule="fairseq"`` with the length penalty
``length ** alpha`` instead of ``((5 + length) / 6) ** alpha`` (and, at a
penalty of exactly 0, a stop at its first best ending; see :data:`NO_PENALTY`).
At the length limit mt_flax forces the end token and counts its
log-probability; CTranslate2 stops without it, so a beam search that reaches
the limit may end differently.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Optional

import numpy as np

from mt_flax import paths
from mt_flax.errors import UserError
from mt_flax.model import TransformerConfig, sinusoidal_positions
from mt_flax.special_ids import BOS_ID, EOS_ID, PAD_ID, UNK_ID

FORMATS = ("ctranslate2",)
QUANTIZATIONS = ("float32", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16",
                 "float16", "bfloat16")
POSITIONS = 1024            # rows of the sinusoid table (longest source or target)
LAYER_NORM_EPSILON = 1e-6   # flax.linen.LayerNorm's default
SPECIAL_PIECES = {PAD_ID: "<pad>", UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>"}
# Every TransformerConfig field and the values the exporter can express (None: any value).
EXPRESSIBLE = {
    "src_vocab_size": None, "tgt_vocab_size": None, "d_model": None, "num_heads": None,
    "num_encoder_layers": None, "num_decoder_layers": None, "mlp_dim": None,
    "dropout_rate": None, "attention_dropout_rate": None, "share_embeddings": None,
    "tie_output": None, "pre_ln": None, "positions": ("sinusoidal", "learned"), "max_len": None,
    "dtype": None, "param_dtype": None, "attention": None,
}
MODEL_SOURCE, MODEL_TARGET = "source.spm.model", "target.spm.model"
INFO_FILE = "mt_flax_export.json"


class ExportError(UserError):
  """A run that cannot be exported as asked (format, setting, output folder)."""


def check_expressible(cfg: TransformerConfig) -> None:
  """Refuses, in one line naming the setting, a model the CTranslate2 spec cannot express."""
  for field in dataclasses.fields(cfg):
    if field.name not in EXPRESSIBLE:
      raise ExportError(f"model.{field.name}={getattr(cfg, field.name)!r} has no counterpart in "
                        "CTranslate2's TransformerSpec known to this exporter")
    allowed = EXPRESSIBLE[field.name]
    if allowed is not None and getattr(cfg, field.name) not in allowed:
      raise ExportError(f"model.{field.name}={getattr(cfg, field.name)!r} cannot be expressed "
                        f"in CTranslate2's TransformerSpec (expected one of {', '.join(allowed)})")
  if cfg.positions == "sinusoidal" and cfg.d_model < 4:
    raise ExportError(f"model.d_model={cfg.d_model}: sinusoidal positions need d_model >= 4")


def pieces(sp) -> list[str]:
  """The vocabulary of a SentencePiece model, one token per id; special ids keep mt_flax's names."""
  tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
  for i, name in SPECIAL_PIECES.items():
    if i < len(tokens):
      tokens[i] = name
  return tokens


def _f32(x) -> np.ndarray:
  """A writable float32 copy (CTranslate2 quantizes in place; JAX arrays read as read-only)."""
  return np.array(x, dtype=np.float32, order="C", copy=True)


def _heads_in(kernel) -> np.ndarray:
  """Flax ``[D, N, H]`` projection -> CTranslate2 ``[N*H, D]`` (output rows)."""
  k = _f32(kernel)
  return _f32(k.reshape(k.shape[0], -1).T)


def _heads_out(kernel) -> np.ndarray:
  """Flax ``[N, H, D]`` output projection -> CTranslate2 ``[D, N*H]``."""
  k = _f32(kernel)
  return _f32(k.reshape(-1, k.shape[-1]).T)


def _set_norm(spec, p) -> None:
  spec.gamma, spec.beta = _f32(p["scale"]), _f32(p["bias"])


def _set_dense(spec, p) -> None:
  spec.weight, spec.bias = _f32(np.asarray(p["kernel"]).T), _f32(p["bias"])


def _set_attention(spec, p, norm, cross: bool) -> None:
  q, k, v = (_heads_in(p[name]["kernel"]) for name in ("query", "key", "value"))
  if cross:
    spec.linear[0].weight = q
    spec.linear[1].weight = _f32(np.concatenate([k, v], axis=0))
  else:
    spec.linear[0].weight = _f32(np.concatenate([q, k, v], axis=0))
  spec.linear[-1].weight = _heads_out(p["out"]["kernel"])
  _set_norm(spec.layer_norm, norm)


def _set_ffn(spec, p, norm) -> None:
  _set_dense(spec.linear_0, p["Dense_0"])
  _set_dense(spec.linear_1, p["Dense_1"])
  _set_norm(spec.layer_norm, norm)


def _position_table(cfg: TransformerConfig, embed_params) -> np.ndarray:
  if cfg.positions == "learned":
    return _f32(embed_params["pos_embedding"]["embedding"])
  return _f32(sinusoidal_positions(np.arange(POSITIONS)[None], cfg.d_model)[0])


def transformer_spec(cfg: TransformerConfig, params: Any, src_vocab: list[str],
                     tgt_vocab: list[str]):
  """A ``ctranslate2.specs.TransformerSpec`` holding ``params`` (an unboxed Flax tree)."""
  from ctranslate2.specs import TransformerSpec, common_spec

  check_expressible(cfg)
  spec = TransformerSpec.from_config((cfg.num_encoder_layers, cfg.num_decoder_layers),
                                     cfg.num_heads, pre_norm=cfg.pre_ln,
                                     activation=common_spec.Activation.RELU)
  enc, dec = spec.encoder, spec.decoder
  src_embed = params["src_embed"]
  tgt_embed = src_embed if cfg.share_embeddings else params["tgt_embed"]
  src_table = _f32(src_embed["embedding"]["embedding"])
  tgt_table = src_table if cfg.share_embeddings else _f32(tgt_embed["embedding"]["embedding"])
  enc.embeddings[0].weight, dec.embeddings.weight = src_table, tgt_table
  enc.scale_embeddings = dec.scale_embeddings = True          # x sqrt(d_model)
  enc.position_encodings.encodings = _position_table(cfg, src_embed)
  dec.position_encodings.encodings = (enc.position_encodings.encodings if cfg.share_embeddings
                                      else _position_table(cfg, tgt_embed))
  for i, layer in enumerate(enc.layer):
    p = params[f"encoder_{i}"]
    _set_attention(layer.self_attention, p["self_attn"], p["self_attn_norm"], cross=False)
    _set_ffn(layer.ffn, p["mlp"], p["mlp_norm"])
  for i, layer in enumerate(dec.layer):
    p = params[f"decoder_{i}"]
    _set_attention(layer.self_attention, p["self_attn"], p["self_attn_norm"], cross=False)
    _set_attention(layer.attention, p["cross_attn"], p["cross_attn_norm"], cross=True)
    _set_ffn(layer.ffn, p["mlp"], p["mlp_norm"])
  if cfg.pre_ln:
    _set_norm(enc.layer_norm, params["encoder_norm"])
    _set_norm(dec.layer_norm, params["decoder_norm"])
  if cfg.tie_output:
    dec.projection.weight = tgt_table
  else:
    _set_dense(dec.projection, params["logits_dense"])

  spec.config.unk_token, spec.config.bos_token = SPECIAL_PIECES[UNK_ID], SPECIAL_PIECES[BOS_ID]
  spec.config.eos_token = SPECIAL_PIECES[EOS_ID]
  spec.config.decoder_start_token = SPECIAL_PIECES[BOS_ID]
  spec.config.add_source_eos = True
  spec.config.layer_norm_epsilon = LAYER_NORM_EPSILON
  spec.register_source_vocabulary(src_vocab)
  spec.register_target_vocabulary(tgt_vocab)
  return spec


def spec_converter(spec):
  """A ``ctranslate2.converters.Converter`` whose ``convert(out, quantization=...)`` writes
  ``spec`` (validation, quantization and saving are CTranslate2's)."""
  from ctranslate2.converters import Converter

  class _SpecConverter(Converter):
    """Hands CTranslate2's conversion (validation, quantization, saving) a ready spec."""

    def _load(self):
      return spec

  return _SpecConverter()


def readme(info: dict) -> str:
  """The README written next to the model: how to translate with it, and how its search
  relates to mt_flax's."""
  d = info["decode"]
  return f"""# {info['dataset']} {info['direction']}, exported from mt_flax

CTranslate2 model of `{info['workdir']}` ({info['params']}), weights {info['quantization']}.
Translate with it:

```python
import ctranslate2, sentencepiece as spm; src, tgt, model = spm.SentencePieceProcessor(model_file="{MODEL_SOURCE}"), spm.SentencePieceProcessor(model_file="{MODEL_TARGET}"), ctranslate2.Translator(".")
print(tgt.decode(model.translate_batch([src.encode("Your sentence.", out_type=str)], beam_size={d['beam_size']}, length_penalty={d['alpha']}, suppress_sequences=[["<pad>"], ["<s>"]])[0].hypotheses[0]))
```

(run it in this folder, or put the folder's path in place of `.` and the file names).

Decoding as in mt_flax: greedy search (`beam_size=1`) gives mt_flax's greedy output with
`max_decoding_length` one less than mt_flax's limit `floor({d['max_len_a']} * n + {d['max_len_b']})`
(n source tokens with `</s>`; mt_flax counts the end token, CTranslate2 does not),
`min_decoding_length=0` and `<pad>` and `<s>` suppressed as above (mt_flax never
generates them). CTranslate2's beam search is mt_flax's `decode.beam_rule="fairseq"`
(only an end token among the best `beam_size` candidates finishes; stop after
`beam_size` finished) with two differences: it divides scores by
`length ** length_penalty` where mt_flax divides by `((5 + length) / 6) ** alpha`, and
with `length_penalty=0` exactly it stops as soon as its best candidate ends. mt_flax's
`alpha=0` with `length_penalty=1e-6` and `return_end_token=True` gives the same outputs.
"""


def export_ctranslate2(trained, out: str, *, quantization: Optional[str] = None,
                       force: bool = False) -> dict:
  """Writes ``trained`` (an :class:`mt_flax.inference.Trained`) as a CTranslate2 model in ``out``.

  ``out`` gets CTranslate2's ``model.bin``, ``config.json`` and vocabularies, the
  SentencePiece models (``source.spm.model``, ``target.spm.model``), ``README.md``
  and ``mt_flax_export.json``. Returns that JSON's content.

  Raises:
    ExportError: ctranslate2 missing, an unknown quantization, an existing ``out``
      without ``force``, or a model setting the spec cannot express.
  """
  try:
    import ctranslate2  # noqa: F401
  except ImportError:
    raise ExportError("exporting to CTranslate2 needs the ctranslate2 package "
                      "(pip install -e '.[ctranslate2]')") from None
  if quantization is not None and quantization not in QUANTIZATIONS:
    raise ExportError(f"--quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
  if str(out).startswith("gs://"):
    raise ExportError(f"--out {out}: CTranslate2 writes a local folder; expected a local path")
  if os.path.exists(out) and os.listdir(out) and not force:
    raise ExportError(f"--out {out} exists and is not empty; pass --force to replace it")
  import sentencepiece as spm
  models = spm_models(trained.tokenizer.directory)
  src_sp, tgt_sp = (spm.SentencePieceProcessor(model_proto=models[n])
                    for n in (MODEL_SOURCE, MODEL_TARGET))
  spec = transformer_spec(trained.model.config, trained.params, pieces(src_sp), pieces(tgt_sp))
  if os.path.exists(out):
    shutil.rmtree(out)
  spec_converter(spec).convert(out, quantization=quantization, force=True)
  for name, data in models.items():
    with open(os.path.join(out, name), "wb") as f:
      f.write(data)
  from mt_flax.inference import decode_settings
  config = trained.config
  info = {"format": "ctranslate2", "workdir": str(trained.workdir), "step": int(trained.step),
          "checkpoint": trained.which, "params": trained.params_source,
          "quantization": quantization or "float32",
          "dataset": str(config.data.name),
          "direction": f"{config.data.src_lang}-{config.data.tgt_lang}",
          "decode": decode_settings(config), "model": dataclasses.asdict(trained.model.config),
          "bytes": folder_bytes(out)}
  with open(os.path.join(out, "README.md"), "w") as f:
    f.write(readme(info))
  with open(os.path.join(out, INFO_FILE), "w") as f:
    json.dump(info, f, indent=2)
  return info


def spm_models(directory: str) -> dict[str, bytes]:
  """``{source.spm.model: bytes, target.spm.model: bytes}`` of a ``workdir/tokenizer/`` folder
  (the shared ``spm.model`` serves both sides)."""
  folder = paths.as_path(directory)
  if (folder / "spm.model").exists():
    data = (folder / "spm.model").read_bytes()
    return {MODEL_SOURCE: data, MODEL_TARGET: data}
  return {MODEL_SOURCE: (folder / "src.model").read_bytes(),
          MODEL_TARGET: (folder / "tgt.model").read_bytes()}


def folder_bytes(folder: str) -> int:
  """Total size of the files in ``folder`` (not recursive)."""
  return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)
             if os.path.isfile(os.path.join(folder, n)))


# CTranslate2's beam search stops when its best candidate ends if length_penalty is exactly 0,
# and after beam_size finished hypotheses otherwise (mt_flax's beam_rule="fairseq"); this
# penalty keeps the second rule while changing no score by more than ~1e-5 of itself.
NO_PENALTY = 1e-6


def ctranslate2_search(translator, sources: list[list[str]], *, beam_size: int,
                       length_penalty: float, max_len_a: float, max_len_b: float,
                       max_batch: int = 64) -> list[list[str]]:
  """Translates with a CTranslate2 ``translator`` under mt_flax's decoding limits.

  ``sources``: SentencePiece pieces of each source, without ``</s>`` (the model
  adds it). mt_flax allows ``max_target_len(n)`` target tokens with the end
  token included (``n`` source tokens with ``</s>``), so each source gets
  ``max_decoding_length`` one less; sources are grouped by that length
  (CTranslate2 takes one per call). As in mt_flax, ``<pad>`` and ``<s>`` are
  never generated, the end token may come first, and the hypothesis length
  the penalty reads counts the end token. Returns the target pieces of each
  source (without ``</s>``), in order.
  """
  from mt_flax.decode import max_target_len

  eos = SPECIAL_PIECES[EOS_ID]
  groups: dict[int, list[int]] = {}
  for i, src in enumerate(sources):
    groups.setdefault(max_target_len(len(src) + 1, max_len_a, max_len_b) - 1, []).append(i)
  out: list[list[str]] = [[] for _ in sources]
  for limit, members in sorted(groups.items()):
    if limit < 1:
      continue                                  # mt_flax's only choice there is the end token
    for start in range(0, len(members), max_batch):
      chunk = members[start:start + max_batch]
      results = translator.translate_batch(
          [sources[i] for i in chunk], beam_size=beam_size, length_penalty=length_penalty,
          max_decoding_length=limit, min_decoding_length=0, max_input_length=0,
          return_end_token=True, max_batch_size=max_batch,
          suppress_sequences=[[SPECIAL_PIECES[PAD_ID]], [SPECIAL_PIECES[BOS_ID]]])
      for i, result in zip(chunk, results):
        out[i] = [t for t in result.hypotheses[0] if t != eos]
  return out

"""bfloat16 end to end: what the train step computes in (read from its HLO), the logits that
decoding ranks, bf16 against fp32 training losses and beam outputs, and the refusal of
bf16 parameters under AdamW."""
import dataclasses
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mt_flax import data, decode, steps, train
from mt_flax.config import load_config
from mt_flax.data.tokenizer import Tokenizer
from mt_flax.errors import ConfigError
from mt_flax.model import Transformer, TransformerConfig
from mt_flax.special_ids import BOS_ID, EOS_ID, FIRST_WORD_ID, PAD_ID

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "experiments", "bible_en_es_tiny.py") + ":test"
TINY = dict(src_vocab_size=48, tgt_vocab_size=48, d_model=32, num_heads=2,
            num_encoder_layers=1, num_decoder_layers=1, mlp_dim=64, share_embeddings=True,
            tie_output=True, dropout_rate=0.1)


# ---------------------------------------------------------------- reading precision from HLO
# The program JAX hands to the compiler (lowered_hlo) keeps every op's JAX name stack: layer
# norms are the modules named *_norm, softmax lives in the *attn modules, the loss in
# output_loss (mt_flax.steps). The compiled program is no witness on a CPU, whose compiler
# computes bfloat16 matmuls in float32.

# `name = f32[4,8]{1,0} dot(a, b), ..., metadata={op_name="..."}` (names may start with %)
_DEF = re.compile(r"^\s*(?:ROOT )?%?([\w.-]+) = (\w+)\[[^\]]*\]\S* ([\w-]+)\(([^)]*)\)"
                  r"(?:.*op_name=\"([^\"]*)\")?", re.M)
_FLOATS = ("bf16", "f16", "f32", "f64")
_HLO_NAMES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32", "float64": "f64"}
# The reductions that must be float32, by the module their op names pass through.
REDUCTIONS = {"layer norm": "_norm/", "softmax": "attn/", "loss": "output_loss"}
# Reductions that are exact in any dtype (a max of bfloat16 values is one of them).
EXACT = ("reduce_max", "reduce_min")


@dataclasses.dataclass(frozen=True)
class Op:
  """A dot or reduce of an HLO module: result dtype, operand dtypes, JAX name stack."""
  kind: str
  dtype: str
  operands: tuple[str, ...]
  name: str


def lowered_hlo(lowered: jax.stages.Lowered) -> str:
  """The HLO text of ``jax.jit(f).lower(...)`` with each op's JAX name stack."""
  return lowered.as_text(dialect="hlo", debug_info=True)


def hlo_ops(hlo: str) -> list[Op]:
  """Every floating-point dot and reduce of an HLO text (before or after compiling), in order."""
  defs = list(_DEF.finditer(hlo))
  types = {m.group(1): m.group(2) for m in defs}
  ops = []
  for m in defs:
    if m.group(3) not in ("dot", "reduce"):
      continue
    operands = tuple(types.get(o.split()[-1].lstrip("%"), "?") for o in m.group(4).split(", "))
    if all(t in _FLOATS for t in operands):
      ops.append(Op(m.group(3), m.group(2), operands, m.group(5) or ""))
  return ops


def _forward_name(name: str) -> str:
  """The op name of the forward op a gradient op transposes (``transpose(jvp(f))/...``)."""
  return re.sub(r"^(.*/)?transpose\((.*?)\)/", r"\1\2/", name)


def audit(hlo: str, compute_dtype: Any, state: Any = None) -> list[str]:
  """One line per way a step's HLO differs from computing in ``compute_dtype``; [] if none.

  Matmuls must read ``compute_dtype`` operands; a gradient matmul may take a float32
  cotangent where its forward matmul was asked for a float32 result (attention
  logits). The reductions of :data:`REDUCTIONS` must exist and be float32 bar the exact
  ones (:data:`EXACT`; others, such as the sums over the batch that make bias gradients,
  may not), and so must every float leaf of ``state.params`` and ``state.opt_state``
  (arrays or ``jax.ShapeDtypeStruct``) when ``state`` is given.
  """
  want = _HLO_NAMES.get(jnp.dtype(compute_dtype).name)
  if want is None:
    raise ValueError(f"compute_dtype={compute_dtype!r}: expected a float dtype, e.g. 'bfloat16'")
  ops = hlo_ops(hlo)
  dots = [op for op in ops if op.kind == "dot"]
  f32_out = {op.name for op in dots if op.dtype == "f32"}
  bad = [op for op in dots if set(op.operands) != {want} and not (
      set(op.operands) == {want, "f32"} and _forward_name(op.name) in f32_out
      and _forward_name(op.name) != op.name)]
  problems = [] if dots else ["no matmul found in the HLO"]
  if bad:
    problems.append(f"{len(bad)} of {len(dots)} matmuls read operands other than {want}, "
                    f"e.g. {bad[0].operands} in {bad[0].name}")
  for what, marker in REDUCTIONS.items():
    found = [op for op in ops if op.kind == "reduce" and marker in op.name]
    wrong = [op for op in found if (op.dtype != "f32" or set(op.operands) != {"f32"})
             and op.name.rsplit("/", 1)[-1] not in EXACT]
    if not found:
      problems.append(f"no {what} reduction (an op named '*{marker}*') found in the HLO")
    elif wrong:
      problems.append(f"{len(wrong)} of {len(found)} {what} reductions are not float32, "
                      f"e.g. {wrong[0].operands} in {wrong[0].name}")
  if state is not None:
    for part in ("params", "opt_state"):
      leaves = jax.tree_util.tree_leaves_with_path(getattr(state, part))
      narrow = [(jax.tree_util.keystr(path), leaf.dtype) for path, leaf in leaves
                if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.dtype != jnp.float32]
      if narrow:
        problems.append(f"{len(narrow)} leaves of state.{part} are not float32, e.g. "
                        f"{narrow[0][0]} is {narrow[0][1]}")
  return problems


def lowered_train_step(**overrides):
  """(HLO text, abstract state) of the real train step of a tiny model, lowered for CPU."""
  model = Transformer(TransformerConfig(**{**TINY, **overrides}))
  config = ml_collections.ConfigDict({"learning_rate": 1e-3})
  optimizer = steps.make_optimizer(config)
  state = jax.eval_shape(lambda: steps.create_train_state(model, optimizer, jax.random.key(0)))
  step = steps.make_train_step(model, optimizer, label_smoothing=0.1,
                               learning_rate_fn=steps.make_schedule(config), jit=False)
  batch = {k: jax.ShapeDtypeStruct((4, 8), jnp.int32) for k in ("src", "tgt_in", "tgt_out")}
  return lowered_hlo(jax.jit(step).lower(state, batch)), state


def test_bf16_train_step_has_bf16_matmuls_and_fp32_norms_softmax_loss_and_state():
  hlo, state = lowered_train_step(dtype="bfloat16")
  assert audit(hlo, "bfloat16", state) == []
  kinds = {(op.kind, op.operands) for op in hlo_ops(hlo)}
  assert ("dot", ("bf16", "bf16")) in kinds and ("reduce", ("f32", "f32")) in kinds

  # The audit can fail: the fp32 step passes as fp32 and fails as bf16 on its matmuls only,
  # and bf16 parameters make bf16 AdamW moments.
  hlo32, state32 = lowered_train_step()
  assert audit(hlo32, "float32", state32) == []
  [problem] = audit(hlo32, "bfloat16", state32)
  assert "matmuls read operands other than bf16" in problem
  _, state16 = lowered_train_step(dtype="bfloat16", param_dtype="bfloat16")
  problems = audit(hlo, "bfloat16", state16)
  assert len(problems) == 2
  assert "leaves of state.params are not float32" in problems[0]
  assert "leaves of state.opt_state are not float32" in problems[1]


@pytest.mark.parametrize("tie", [True, False])
def test_bf16_logits_are_summed_in_fp32_not_rounded_to_bf16(tiny_model, ragged_batch, tie):
  """The logits that evaluation and beam search read: bf16 products summed in fp32."""
  model, params = tiny_model(dtype="bfloat16", tie_output=tie, share_embeddings=tie)
  src, tgt = ragged_batch(21, rows=3, s_len=7, t_len=5)
  logits, (states, (kernel, bias)) = jax.jit(lambda p: (
      model.apply({"params": p}, src, tgt),
      model.apply({"params": p}, src, tgt, method=Transformer.states_and_output_layer)))(params)
  assert states.dtype == kernel.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
  want = jnp.dot(states, kernel, preferred_element_type=jnp.float32)
  want = want if bias is None else want + bias.astype(jnp.float32)
  np.testing.assert_array_equal(logits, want)
  rounded = want.astype(jnp.bfloat16).astype(jnp.float32)
  assert float(jnp.abs(logits - rounded).max()) > 1e-3


def test_bf16_training_keeps_bf16_logits_and_reduces_them_in_fp32(tiny_model, ragged_batch):
  """Differentiated, the loss reads the logits as the bf16 matmul emits them (rounded once)
  and sums in fp32; evaluated, it reads fp32 logits."""
  model, params = tiny_model(dtype="bfloat16")
  src, tgt = ragged_batch(5, rows=3, s_len=7, t_len=6)
  labels = np.concatenate([tgt[:, 1:], np.zeros_like(tgt[:, :1])], axis=1)
  weights = (labels != PAD_ID).astype(np.float32)
  states, (kernel, bias) = model.apply({"params": params}, src, tgt,
                                       method=Transformer.states_and_output_layer)
  exact = jnp.dot(states, kernel, preferred_element_type=jnp.float32)
  rounded = exact.astype(jnp.bfloat16).astype(jnp.float32)
  assert float(jnp.abs(exact - rounded).max()) > 1e-3
  want = {name: float(jnp.sum(steps.token_losses(z, labels, 0.1)[0] * weights))
          for name, z in (("exact", exact), ("rounded", rounded))}
  sums = lambda s, k: steps.output_loss_sums(s, k, bias, labels, weights, 0.1)[0]
  trained, _ = jax.value_and_grad(sums, argnums=(0, 1))(states, kernel)
  evaluated = sums(states, kernel)
  assert float(trained) == pytest.approx(want["rounded"], rel=1e-5)
  assert float(evaluated) == pytest.approx(want["exact"], rel=1e-5)
  assert abs(want["rounded"] - want["exact"]) > 1e-5 * abs(want["exact"])


def test_bf16_params_with_adamw_are_refused_before_the_workdir_is_written(tmp_path, call_main):
  from mt_flax.commands import train as train_command
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match="allow_low_precision_params=True") as e:
    train.resolve_config(load_config(CONFIG, ["--config.model.param_dtype=bfloat16"]))
  assert "\n" not in str(e.value) and "model.param_dtype='bfloat16'" in str(e.value)
  assert call_main(train_command.main, ["--config", CONFIG, "--workdir", str(workdir),
                                        "--config.model.param_dtype=bfloat16"]) == 2
  assert not workdir.exists()
  allowed = train.resolve_config(load_config(CONFIG, [
      "--config.model.param_dtype=bfloat16", "--config.allow_low_precision_params=true"]))
  assert allowed.model.param_dtype == "bfloat16"


def test_bf16_training_losses_track_fp32_step_by_step(tiny_training):
  """Eight steps of the ``:test`` variant on its real batches, same seed and dropout masks."""
  config = load_config(CONFIG)
  tokenizer = Tokenizer.load(str(tiny_training.tokenizer_dir))
  batches = data.train_iterator(config, tokenizer)
  batches = [{k: np.asarray(b[k]) for k in ("src", "tgt_in", "tgt_out")}
             for b in (next(batches) for _ in range(8))]
  optimizer = steps.make_optimizer(config)
  losses = {}
  for dtype in ("float32", "bfloat16"):
    model = Transformer(TransformerConfig.from_config(
        config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size, dtype=dtype))
    state = steps.create_train_state(model, optimizer, jax.random.key(int(config.seed)))
    step = steps.make_train_step(model, optimizer, label_smoothing=float(config.label_smoothing))
    losses[dtype] = []
    for batch in batches:
      state, metrics = step(state, batch)
      losses[dtype].append(float(metrics["loss"]))
  delta = np.abs(np.subtract(losses["bfloat16"], losses["float32"]))
  # bf16 keeps 8 significant bits: every matmul operand is rounded by up to 2**-9 of its
  # value, so one token's loss (about 5.3 nats here) moves by up to about 0.01 nats; the
  # step's loss is a mean over hundreds of tokens, whose independent roundings mostly
  # cancel, and later steps add the difference of updates made from bf16 gradients.
  # 0.01 nats, one token's worst rounding, is 1/50 of what these 8 steps learn (0.5 nats).
  assert delta.max() < 0.01, (delta, losses)
  assert losses["float32"][-1] < losses["float32"][0] - 0.1   # the steps do learn


def lexicon_task(seed: int, rows: int, vocab: int = 64, width: int = 16):
  """A toy translation: each word maps to one other word (a fixed permutation), EOS-ended.

  Returns src ``[rows, width]``, tgt_in and tgt_out ``[rows, width]`` (0 = pad)."""
  lexicon = np.random.default_rng(1).permutation(np.arange(FIRST_WORD_ID, vocab))
  rng = np.random.default_rng(seed)
  src, tgt_out = np.zeros((rows, width), np.int32), np.zeros((rows, width), np.int32)
  for r in range(rows):
    n = rng.integers(3, width - 1)
    src[r, :n] = rng.integers(FIRST_WORD_ID, vocab, n)
    src[r, n] = tgt_out[r, n] = EOS_ID
    tgt_out[r, :n] = lexicon[src[r, :n] - FIRST_WORD_ID]
  tgt_in = np.concatenate([np.full((rows, 1), BOS_ID, np.int32), tgt_out[:, :-1]], axis=1)
  return src, np.where(tgt_out == PAD_ID, PAD_ID, tgt_in), tgt_out


def test_beam4_outputs_of_a_trained_model_agree_in_bf16_and_fp32():
  """A model trained in fp32 (400 steps on the toy lexicon task) decodes 200 unseen
  sentences with beam 4 in both dtypes from the same fp32 parameters. (The session's
  24-step Bible run cannot serve: it still ends every output at once.)"""
  model = Transformer(TransformerConfig(64, 64, d_model=64, num_heads=4, num_encoder_layers=1,
                                        num_decoder_layers=1, mlp_dim=128, dropout_rate=0.0,
                                        share_embeddings=True, tie_output=True))
  config = ml_collections.ConfigDict(dict(learning_rate=3e-3, warmup_steps=50,
                                          schedule="cosine", num_train_steps=400))
  optimizer = steps.make_optimizer(config)
  state = steps.create_train_state(model, optimizer, jax.random.key(0))
  step = steps.make_train_step(model, optimizer, label_smoothing=0.1)
  for i in range(400):
    src, tgt_in, tgt_out = lexicon_task(i, rows=32)
    state, _ = step(state, {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out})
  src, _, tgt_out = lexicon_task(10_000, rows=200)
  outputs = {}
  for dtype in ("float32", "bfloat16"):
    decoder = Transformer(dataclasses.replace(model.config, dtype=dtype))
    decoded = decode.search(decoder, state.params, src, beam_size=4, max_len_a=1.0, max_len_b=4)
    outputs[dtype] = [decode.strip_eos(row) for row in np.asarray(decoded.tokens)]
  correct = np.mean([out == decode.strip_eos(ref) for out, ref in zip(outputs["float32"], tgt_out)])
  same = np.mean([a == b for a, b in zip(outputs["float32"], outputs["bfloat16"])])
  assert correct > 0.5            # trained: most unseen sentences translated exactly
  assert same >= 0.95, same

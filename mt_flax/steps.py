"""Pure training and evaluation steps: loss, optimizer, schedule, train/eval step.

Nothing here knows about devices: :mod:`mt_flax.sharding` compiles these
functions with ``jax.jit`` over a mesh or with ``jax.pmap``. A batch is a dict
of int32 arrays ``src [B, S]``, ``tgt_in [B, T]``, ``tgt_out [B, T]`` (0 = pad)
and, for packed rows, ``src_segments``, ``tgt_segments``, ``src_positions``,
``tgt_positions``.

For a benchmark on fixed shapes::

    model = Transformer(TransformerConfig(...))
    optimizer = make_optimizer(config)          # or any optax transformation
    state = create_train_state(model, optimizer, jax.random.key(0))
    train_step = make_train_step(model, optimizer, label_smoothing=0.1)
    state, metrics = train_step(state, batch)   # jitted, donates ``state``
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from mt_flax.config import with_defaults
from mt_flax.model import Transformer, init_params
from mt_flax.sharding import axes_size
from mt_flax.special_ids import PAD_ID

Array = jax.Array
Batch = dict[str, Array]
MODEL_INPUTS = ("src_segments", "tgt_segments", "src_positions", "tgt_positions")


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. ``rng`` is raw key data; dropout uses fold_in(rng, step)."""
  step: Array        # int32 scalar: number of updates applied so far
  params: Any
  opt_state: Any
  rng: Array         # uint32 key data of the base dropout key


# ----------------------------------------------------------------------------- schedule


def make_schedule(config) -> optax.Schedule:
  """Linear warmup to ``learning_rate``, then ``rsqrt`` or ``cosine`` decay.

  The schedule is evaluated at the 0-based update count; update ``n`` uses the
  rate at step ``n + 1`` so the first update is not wasted at rate 0.
  ``rsqrt``: ``lr * min(s / warmup, sqrt(warmup / s))`` (Vaswani et al. 2017 with
  ``lr = d_model**-0.5 * warmup**-0.5``). ``cosine``: from ``lr`` after warmup to
  ``lr * min_learning_rate_ratio`` at ``num_train_steps``.
  """
  config = with_defaults(config)
  peak = float(config.learning_rate)
  warmup = max(int(config.warmup_steps), 1)
  kind = config.schedule
  total = max(int(config.num_train_steps), warmup + 1)
  floor = float(config.min_learning_rate_ratio)

  def schedule(count):
    s = jnp.asarray(count, jnp.float32) + 1.0
    ramp = s / warmup
    if kind == "rsqrt":
      decay = jnp.sqrt(warmup / s)
    else:
      frac = jnp.clip((s - warmup) / (total - warmup), 0.0, 1.0)
      decay = floor + (1.0 - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return peak * jnp.minimum(ramp, decay)

  if kind not in ("rsqrt", "cosine"):
    raise ValueError(f"schedule={kind!r}: expected 'rsqrt' or 'cosine'")
  return schedule


def make_optimizer(config) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW on ``make_schedule(config)``.

  Weight decay (decoupled, scaled by the learning rate) applies to matrices
  only (``ndim >= 2``), not to biases and layer-norm scales.
  """
  config = with_defaults(config)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  adam = optax.adamw(make_schedule(config), b1=float(config.adam_b1),
                     b2=float(config.adam_b2), eps=float(config.adam_eps),
                     weight_decay=float(config.weight_decay), mask=decay_mask)
  clip = float(config.grad_clip_norm)
  return optax.chain(optax.clip_by_global_norm(clip), adam) if clip > 0 else adam


# ----------------------------------------------------------------------------- state


def init_boxed_state(model: Transformer, optimizer: optax.GradientTransformation,
                     rng: Array) -> TrainState:
  """State whose params/optimizer leaves keep their logical-axis boxes (for shardings)."""
  params_rng, dropout_rng = jax.random.split(rng)
  params = init_params(model, params_rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), rng=jax.random.key_data(dropout_rng))


def create_train_state(model: Transformer, optimizer: optax.GradientTransformation,
                       rng: Array) -> TrainState:
  """Fresh state with plain (unboxed) arrays on the default device. ``rng``: a JAX key."""
  return jax.jit(lambda r: nn.meta.unbox(init_boxed_state(model, optimizer, r)))(rng)


# ----------------------------------------------------------------------------- loss


def smoothing_constant(label_smoothing: float, vocab_size: int) -> float:
  """Entropy of the smoothed target: the least label-smoothed cross-entropy reachable.

  The target puts ``1 - eps + eps / V`` on the label and ``eps / V`` on each
  other token; a model predicting exactly that scores this loss (0 for eps=0).
  """
  eps, v = float(label_smoothing), int(vocab_size)
  if eps <= 0.0:
    return 0.0
  on, off = 1.0 - eps + eps / v, eps / v
  return -(on * math.log(on) + (v - 1) * off * math.log(off))


def _per_token(logits: Array, labels: Array, eps: float):
  """(smoothed loss, nll, correct, log-sum-exp) per token, computed in float32 from logits
  of any float dtype (the max, the label's logit and ties are exact in that dtype)."""
  f32 = jnp.float32
  top = jnp.max(logits, axis=-1)
  picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  ties = jnp.sum((logits == top[..., None]).astype(f32), axis=-1)
  correct = jnp.where(picked >= top, 1.0 / ties, 0.0)
  top, picked = top.astype(f32), picked.astype(f32)
  lse = top + jnp.log(jnp.sum(jnp.exp(logits.astype(f32) - top[..., None]), axis=-1))
  nll = lse - picked
  loss = (1.0 - eps) * nll + eps * (lse - jnp.mean(logits, axis=-1, dtype=f32)) if eps else nll
  return loss, nll, correct, lse


def token_losses(logits: Array, labels: Array,
                 label_smoothing: float = 0.0) -> tuple[Array, Array, Array]:
  """Per-token label-smoothed loss, plain nll and top-1 correctness, each ``[B, T]``.

  From integer labels, no one-hot over the vocabulary: the smoothed target puts
  ``1 - eps`` on the label and ``eps / V`` on every token, so
  ``loss = (1 - eps) * nll + eps * mean_v(-log p_v)`` where
  ``mean_v(-log p_v) = logsumexp(z) - mean(z)``. ``correct`` is 1.0 where the
  label's logit is the largest (no argmax), shared equally among tied maxima.
  Training and evaluation use the same definitions through
  :func:`output_loss_sums`, which never holds all the logits at once.

  Args:
    logits: float ``[B, T, V]``.
    labels: int ``[B, T]``.
  """
  loss, nll, correct, _ = _per_token(logits.astype(jnp.float32), labels.astype(jnp.int32),
                                     float(label_smoothing))
  return loss, nll, correct


LOSS_CHUNK_BYTES = 8 << 20   # float32 logits of one chunk of :func:`output_loss_sums` (CPU)
DEVICE_LOSS_CHUNK_BYTES = 128 << 20   # logits of one chunk per device, other platforms
MAX_LOSS_CHUNKS = 8          # chunks per call at most (each is its own code in the program)


def _time_chunk(batch: int, length: int, vocab: int, item_bytes: int = 4,
                budget: Optional[int] = None) -> int:
  """Positions per chunk: as many as fit ``budget`` bytes of logits (default
  :data:`LOSS_CHUNK_BYTES`), in at most :data:`MAX_LOSS_CHUNKS` chunks of about equal size."""
  fit = max(1, (budget or LOSS_CHUNK_BYTES) // (batch * vocab * item_bytes))
  chunks = min(MAX_LOSS_CHUNKS, -(-length // fit))
  return -(-length // chunks)


def _rows_per_device(rows: int) -> int:
  """The rows of a ``[rows, ...]`` batch that one device holds when traced under a mesh (the
  logical axis ``batch`` splits them), else ``rows``."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return rows
  return max(1, rows // axes_size(mesh.shape, nn.logical_to_mesh_axes(("batch",))[0]))


def _output_loss_chunks(states, kernel, bias, labels, weights, label_smoothing: float,
                        with_grads: bool):
  """:func:`output_loss_sums`, with ``with_grads`` also the gradients of the loss sum with
  respect to (states, kernel, bias), computed in the same pass, a few positions at a time
  (the batch axis whole, so its sharding stays). On the CPU chunks hold
  :data:`LOSS_CHUNK_BYTES` of logits; elsewhere :data:`DEVICE_LOSS_CHUNK_BYTES` per device,
  fewer and larger, as each chunk reads the output kernel again."""
  args = states, kernel, bias, labels, weights
  pass_ = lambda chunk: lambda *a: _output_loss_pass(*a, label_smoothing, with_grads, chunk)
  batch, length, vocab = states.shape[0], states.shape[1], kernel.shape[-1]
  cpu_chunk = _time_chunk(batch, length, vocab)
  item = jnp.dtype(_logits_dtype(states, with_grads)).itemsize
  chunk = _time_chunk(_rows_per_device(batch), length, vocab, item, DEVICE_LOSS_CHUNK_BYTES)
  return jax.lax.platform_dependent(*args, cpu=pass_(cpu_chunk), default=pass_(chunk))


def _logits_dtype(states: Array, with_grads: bool):
  """Differentiated (training), the logits are kept in the states' dtype, as a bfloat16
  matmul emits them: float32 logits there are the step's largest array, read three times.
  Every sum over them is float32, and evaluation keeps float32 logits."""
  return states.dtype if with_grads else jnp.float32


@jax.named_scope("output_loss")   # names its ops in the HLO (see mt_flax.precision)
def _output_loss_pass(states, kernel, bias, labels, weights, label_smoothing: float,
                      with_grads: bool, chunk: int):
  eps = float(label_smoothing)
  vocab = kernel.shape[-1]
  logits_dtype = _logits_dtype(states, with_grads)
  sums = jnp.zeros((3,), jnp.float32)
  d_kernel = jnp.zeros(kernel.shape, jnp.float32)
  d_bias = jnp.zeros((vocab,), jnp.float32)
  d_states = []
  for start in range(0, states.shape[1], chunk):
    h, y, wt = (x[:, start:start + chunk] for x in (states, labels, weights))
    z = jnp.einsum("btd,dv->btv", h, kernel, preferred_element_type=logits_dtype)
    if bias is not None:
      z = z + bias.astype(logits_dtype)
    loss, nll, correct, lse = _per_token(z, y, eps)
    sums = sums + jnp.stack([jnp.sum(loss * wt), jnp.sum(nll * wt), jnp.sum(correct * wt)])
    if not with_grads:
      continue
    # d(loss)/dz = softmax(z) - (1 - eps) * onehot(y) - eps / V, per token times its weight
    on_label = jax.lax.broadcasted_iota(y.dtype, z.shape, 2) == y[..., None]
    g = wt[..., None] * (jnp.exp(z.astype(jnp.float32) - lse[..., None])
                         - jnp.where(on_label, 1.0 - eps, 0.0) - eps / vocab)
    g_low = g.astype(kernel.dtype)
    d_states.append(jnp.einsum("btv,dv->btd", g_low, kernel,
                               preferred_element_type=jnp.float32).astype(states.dtype))
    d_kernel = d_kernel + jnp.einsum("btd,btv->dv", h, g_low, preferred_element_type=jnp.float32)
    d_bias = d_bias + jnp.sum(g, axis=(0, 1))
  if not with_grads:
    return sums
  return sums, (jnp.concatenate(d_states, axis=1), d_kernel.astype(kernel.dtype),
                None if bias is None else d_bias.astype(bias.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _output_loss_sums(states, kernel, bias, labels, weights, label_smoothing):
  return _output_loss_chunks(states, kernel, bias, labels, weights, label_smoothing, False)


def _output_loss_sums_fwd(states, kernel, bias, labels, weights, label_smoothing):
  return _output_loss_chunks(states, kernel, bias, labels, weights, label_smoothing, True)


def _output_loss_sums_bwd(label_smoothing, grads, cotangent):
  g = cotangent[0]   # only the loss sum is differentiable; the metric sums stop gradients
  d_states, d_kernel, d_bias = grads
  scale = lambda x: None if x is None else (g * x).astype(x.dtype)
  return scale(d_states), scale(d_kernel), scale(d_bias), None, None


_output_loss_sums.defvjp(_output_loss_sums_fwd, _output_loss_sums_bwd)


def output_loss_sums(states: Array, kernel: Array, bias: Optional[Array], labels: Array,
                     weights: Array, label_smoothing: float = 0.0) -> tuple[Array, Array, Array]:
  """Weighted sums of the output layer's per-token (smoothed loss, nll, correct), as
  :func:`token_losses` defines them for ``logits = states @ kernel + bias``.

  The logits are never whole: they are made a few positions at a time (about
  :data:`LOSS_CHUNK_BYTES` of float32 logits per chunk, which stays below
  glibc's mmap threshold and so is not page-faulted in on every step), and
  when differentiated the same pass computes the gradients of the loss sum, so
  the vocabulary-sized work happens once and in small pieces. Only the loss
  sum carries gradients.

  Args:
    states: ``[B, T, D]``; kernel ``[D, V]``; bias ``[V]`` or None.
    labels: int ``[B, T]``; weights: float ``[B, T]`` (0 for padding).
  """
  sums = _output_loss_sums(states, kernel, bias, labels.astype(jnp.int32),
                           weights.astype(jnp.float32), float(label_smoothing))
  return sums[0], jax.lax.stop_gradient(sums[1]), jax.lax.stop_gradient(sums[2])


def _apply(model: Transformer, params, batch: Batch, *, train: bool,
           rng: Optional[Array] = None, method: Optional[Callable] = None):
  kwargs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
  rngs = {"dropout": rng} if train else None
  return model.apply({"params": params}, batch["src"], batch["tgt_in"], train=train,
                     rngs=rngs, method=method, **kwargs)


def loss_sums(params, batch: Batch, rng: Array, *, model: Transformer, label_smoothing: float,
              scale: Array | float = 1.0) -> tuple[Array, dict[str, Array]]:
  """The summed smoothed loss over non-pad targets times ``scale`` (to differentiate) and
  the metric sums."""
  states, (kernel, bias) = _apply(model, params, batch, train=True, rng=rng,
                                  method=Transformer.states_and_output_layer)
  labels = batch["tgt_out"]
  weights = (labels != PAD_ID).astype(jnp.float32)
  loss, nll, correct = output_loss_sums(states, kernel, bias, labels, weights, label_smoothing)
  sums = {"loss": loss, "nll": nll, "correct": correct, "tokens": jnp.sum(weights)}
  return loss * scale, sums


# ----------------------------------------------------------------------------- steps


def _microbatches(batch: Batch, k: int) -> Batch:
  """``[B, ...]`` -> ``[k, B/k, ...]`` taking rows ``j, j+k, ...`` for microbatch ``j``.

  Interleaved rows keep a batch sharded in contiguous blocks evenly spread over
  devices in every microbatch.
  """
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into "
                       f"grad_accum_steps={k} microbatches")
    return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def _grads_and_sums(params, batch: Batch, rng: Array, *, model, label_smoothing: float,
                    grad_accum_steps: int, scale: Array | float = 1.0):
  """Gradients of the summed loss times ``scale`` and the metric sums, accumulated over
  microbatches."""
  grad_fn = jax.grad(functools.partial(loss_sums, model=model, label_smoothing=label_smoothing,
                                       scale=scale), has_aux=True)
  if grad_accum_steps == 1:
    return grad_fn(params, batch, rng)

  def body(carry, xs):
    index, micro = xs
    grads, sums = grad_fn(params, micro, jax.random.fold_in(rng, index))
    return jax.tree.map(jnp.add, carry, (grads, sums)), None

  zeros = (jax.tree.map(jnp.zeros_like, params),
           {k: jnp.zeros((), jnp.float32) for k in ("loss", "nll", "correct", "tokens")})
  micro = _microbatches(batch, grad_accum_steps)
  (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum_steps), micro))
  return grads, sums


def train_step(state: TrainState, batch: Batch, *, model: Transformer,
               optimizer: optax.GradientTransformation, label_smoothing: float = 0.0,
               grad_accum_steps: int = 1, learning_rate_fn: Optional[optax.Schedule] = None,
               axis_name: Optional[str] = None,
               grad_norm: bool = True) -> tuple[TrainState, dict[str, Array]]:
  """One optimizer update on the mean loss over all non-pad target tokens of ``batch``.

  Dropout uses ``fold_in(rng, step)`` (and the device index under ``pmap``), so
  a resumed run draws the same masks. With ``axis_name`` (``pmap``) gradients
  and sums are summed over devices before normalising.

  Returns the new state and scalar metrics: ``loss`` (the label-smoothed
  cross-entropy minus :func:`smoothing_constant`, so a perfect smoothed
  prediction scores 0; the gradients are those of the smoothed objective),
  ``nll``, ``accuracy``, ``grad_norm`` (before clipping; only with ``grad_norm``),
  ``learning_rate``, ``tokens`` (non-pad targets) and ``finite`` (1.0 if the loss, and with
  ``grad_norm`` the gradients, are finite; non-finite gradients make the next loss so).
  On a TPU the norm's reduction joins the AdamW update, which then reads its operands
  through extra copies: ``grad_norm=False`` spares them.
  """
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  # the mean is taken inside the differentiated loss (the token count is known from the
  # batch), so the gradients come out as means without another pass over them
  tokens = jnp.sum((batch["tgt_out"] != PAD_ID).astype(jnp.float32))
  if axis_name is not None:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    tokens = jax.lax.psum(tokens, axis_name)
  denom = jnp.maximum(tokens, 1.0)
  grads, sums = _grads_and_sums(state.params, batch, rng, model=model,
                                label_smoothing=label_smoothing,
                                grad_accum_steps=grad_accum_steps, scale=1.0 / denom)
  if axis_name is not None:
    grads, sums = jax.lax.psum((grads, sums), axis_name)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  floor = smoothing_constant(label_smoothing, model.config.tgt_vocab_size)
  metrics = {"loss": sums["loss"] / denom - floor, "nll": sums["nll"] / denom,
             "accuracy": sums["correct"] / denom, "tokens": sums["tokens"]}
  checked = sums["loss"]
  if grad_norm:
    metrics["grad_norm"] = optax.tree.norm(grads)
    checked = checked + metrics["grad_norm"]
  metrics["finite"] = jnp.isfinite(checked).astype(jnp.float32)
  if learning_rate_fn is not None:
    metrics["learning_rate"] = learning_rate_fn(state.step)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


def eval_step(params, batch: Batch, *, model: Transformer,
              axis_name: Optional[str] = None) -> dict[str, Array]:
  """Sums over non-pad targets: ``nll``, ``correct``, ``tokens`` (no dropout).

  :func:`eval_metrics` turns accumulated sums into loss, accuracy, perplexity.
  """
  states, (kernel, bias) = _apply(model, params, batch, train=False,
                                  method=Transformer.states_and_output_layer)
  labels = batch["tgt_out"]
  weights = (labels != PAD_ID).astype(jnp.float32)
  _, nll, correct = output_loss_sums(states, kernel, bias, labels, weights)
  sums = {"nll": nll, "correct": correct, "tokens": jnp.sum(weights)}
  return jax.lax.psum(sums, axis_name) if axis_name is not None else sums


def eval_metrics(sums: dict[str, float]) -> dict[str, float]:
  """Accumulated eval sums -> ``eval_loss`` (nats/token), ``eval_accuracy``, ``eval_perplexity``."""
  tokens = max(float(sums["tokens"]), 1.0)
  loss = float(sums["nll"]) / tokens
  return {"eval_loss": loss, "eval_accuracy": float(sums["correct"]) / tokens,
          "eval_perplexity": math.exp(min(loss, 700.0)), "eval_tokens": int(sums["tokens"])}


def make_train_step(model: Transformer, optimizer: optax.GradientTransformation, *,
                    label_smoothing: float = 0.0, grad_accum_steps: int = 1,
                    learning_rate_fn: Optional[optax.Schedule] = None, grad_norm: bool = True,
                    jit: bool = True) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """``(state, batch) -> (state, metrics)`` for fixed shapes, jitted on the default device.

  With ``jit=False`` returns the pure function (for :mod:`mt_flax.sharding`).
  The jitted version donates ``state``.
  """
  fn = functools.partial(train_step, model=model, optimizer=optimizer,
                         label_smoothing=label_smoothing, grad_accum_steps=grad_accum_steps,
                         learning_rate_fn=learning_rate_fn, grad_norm=grad_norm)
  return jax.jit(fn, donate_argnums=0) if jit else fn


def make_eval_step(model: Transformer, *, jit: bool = True) -> Callable[[Any, Batch], dict]:
  """``(params, batch) -> sums`` (see :func:`eval_step`); jitted unless ``jit=False``."""
  fn = functools.partial(eval_step, model=model)
  return jax.jit(fn) if jit else fn

"""The precision a train step computes in, read from its HLO.

With ``model.dtype="bfloat16"`` the matmuls read bfloat16 operands while layer
norm, softmax and the loss reduce in float32, and parameters and optimizer
state stay float32. :func:`audit` checks that on the program JAX hands to the
compiler (:func:`lowered_hlo`), where every op carries its JAX name stack:
layer norms are the modules named ``*_norm``, softmax lives in the ``*attn``
modules, the loss in ``output_loss`` (:mod:`mt_flax.steps`). The compiled
program is no witness on a CPU, whose compiler computes bfloat16 matmuls in
float32.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp

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

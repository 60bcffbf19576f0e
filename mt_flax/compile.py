"""Ahead-of-time compile for a TPU topology, on any host with libtpu: memory, cost, collectives.

libtpu describes a TPU slice without owning one (``jax.experimental.topologies``);
the train and eval steps are lowered with abstract arguments (``jax.ShapeDtypeStruct``
with the config's mesh shardings, the state from ``jax.eval_shape``) and compiled
for it. Per batch shape, the report holds, per chip:

- ``hbm``: bytes of arguments, temporaries and outputs (``memory_analysis()``;
  donated arguments are counted once) against the chip's HBM, and whether it fits;
- ``flops`` and ``bytes_accessed`` (``cost_analysis()``);
- ``roofline``: the larger of flops / peak bf16 FLOP/s and bytes / HBM bandwidth, and
  the target tokens per second that bound allows: a bound, not a measurement;
- ``collectives``: count and result bytes of each collective in the compiled HLO;
- ``compile_s``: seconds spent lowering and compiling.

A step the compiler refuses for want of HBM gets ``hbm.fits = False`` and its ``error``.

Batch shapes are the config's buckets: from the training data (``shapes="data"``, what
``train`` compiles) or, without data, ``data.num_buckets`` evenly spaced lengths up to
``data.max_len`` (``shapes="max_len"``), longest first.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
import math
import os
import re
import time
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from mt_flax import sharding, steps
from mt_flax.data import bucketing
from mt_flax.errors import UserError
from mt_flax.model import Transformer, TransformerConfig

GiB = 1024**3
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


class CompileError(UserError, ValueError):
  """A topology, mesh or shape request that cannot be compiled; the message is one line."""


class LibtpuMissing(CompileError):
  """libtpu is not installed."""


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip figures of one TPU generation."""
  name: str
  hbm_gib: float
  bf16_tflops: float
  hbm_gbps: float


# Per chip, from the Cloud TPU system architecture pages
# (https://cloud.google.com/tpu/docs/v4, .../v5e, .../v5p, .../v6e):
# HBM capacity (GiB), peak bf16 compute (TFLOP/s), HBM bandwidth (GB/s).
CHIPS = {
    "v4": Chip("v4", 32, 275, 1200),
    "v5e": Chip("v5e", 16, 197, 819),
    "v5p": Chip("v5p", 95, 459, 2765),
    "v6e": Chip("v6e", 32, 918, 1640),
}
# chips -> physical shape of the slice
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A Cloud TPU slice as libtpu names it."""
  name: str                   # the accelerator type, e.g. "v4-16"
  chip: Chip
  chips: int
  hosts: int
  topology_name: str          # e.g. "v4:2x2x2"
  chips_per_host_bounds: tuple[int, int, int]
  chip_config_name: str       # "megacore" on v4: one device per chip, as on a real v4 VM

  @property
  def cloud_name(self) -> str:
    """The Cloud TPU accelerator type (v5e is v5litepod there)."""
    return self.name.replace("v5e-", "v5litepod-")


def parse_topology(name: str) -> Topology:
  """``"v5e-8"``, ``"v4-16"``, ``"v5p-32"``, ``"v6e-8"``, ... (``v5litepod-N`` too).

  As in Cloud TPU accelerator types, v4 and v5p count TensorCores (two per chip),
  v5e and v6e count chips. v4/v5p hosts hold 2x2x1 chips; v5e/v6e hosts up to 8 chips
  alone, 2x2 in larger slices.
  """
  m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
  family = m and ("v5e" if m.group(1) == "v5litepod" else m.group(1))
  if family in ("v4", "v5p"):
    chips = int(m.group(2)) // 2
    shape = _SHAPES_3D.get(chips) if int(m.group(2)) % 2 == 0 else None
    bounds = (2, 2, 1)
  elif family:
    chips = int(m.group(2))
    shape = _SHAPES_2D.get(chips)
    bounds = {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 4, 1)}.get(chips, (2, 2, 1))
  if not m or not shape:
    raise CompileError(f"--topology {name!r}: expected a TPU slice such as v5e-8, v6e-8, "
                       "v4-8, v4-16, v5p-32 (v4/v5p: 8 to 1024 TensorCores; v5e/v6e: 1, 4, "
                       "8 to 256 chips, powers of two)")
  hosts = max(1, chips // math.prod(bounds))
  return Topology(name, CHIPS[family], chips, hosts, f"{family}:{shape}", bounds,
                  "megacore" if family == "v4" else "default")


def on_tpu_host() -> bool:
  """Whether this host has TPU chips attached (TPU VMs expose /dev/accel* or /dev/vfio)."""
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def tpu_devices(topology: Topology) -> list:
  """Abstract devices of ``topology`` (one per chip), from libtpu."""
  if importlib.util.find_spec("libtpu") is None:
    raise LibtpuMissing("libtpu is not installed; install the tpu extra: "
                        "pip install -c constraints.txt -e '.[tpu]'")
  if not on_tpu_host():   # libtpu otherwise queries a metadata server and logs its failures,
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # and holds a lock for the chips
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology.cloud_name)
  from jax.experimental import topologies
  desc = topologies.get_topology_desc(
      platform="tpu", topology_name=topology.topology_name,
      chip_config_name=topology.chip_config_name,
      chips_per_host_bounds=topology.chips_per_host_bounds, num_slices=1)
  return list(desc.devices)


# ----------------------------------------------------------------------------- shapes


def even_boundaries(config: ml_collections.ConfigDict) -> list[tuple[int, int]]:
  """``data.num_buckets`` square shapes evenly spaced up to ``data.max_len`` (no data needed),
  rounded up to ``data.length_multiple``."""
  max_len, num = int(config.data.max_len), max(1, int(config.data.num_buckets))
  if config.data.batching != "bucket":
    num = 1
  lengths = {bucketing.round_up(math.ceil(max_len * (k + 1) / num),
                                int(config.data.length_multiple)) for k in range(num)}
  return [(n, n) for n in sorted(lengths)]


def data_buckets(config: ml_collections.ConfigDict, workdir: str | None,
                 row_multiple: int) -> tuple[list[bucketing.Bucket], int, int]:
  """The training buckets ``train`` would compile, and the vocabulary sizes (reads the data
  and the tokenizer of ``workdir``, training one in a temporary folder without it)."""
  import tempfile
  from mt_flax.data import pipeline
  from mt_flax.data.tokenizer import load_or_train_tokenizer
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = load_or_train_tokenizer(config, workdir or tmp)
    buckets = pipeline.train_shapes(config, tokenizer, batch_multiple=row_multiple)
  return buckets, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size


def batch_shapes(config: ml_collections.ConfigDict, row_multiple: int, *, shapes: str = "max_len",
                 workdir: str | None = None) -> tuple[list[bucketing.Bucket], int, int]:
  """(the buckets, longest first; source vocabulary; target vocabulary)."""
  if shapes == "data":
    buckets, src_vocab, tgt_vocab = data_buckets(config, workdir, row_multiple)
  elif shapes == "max_len":
    try:
      buckets = bucketing.make_buckets(even_boundaries(config), int(config.batch_tokens),
                                       row_multiple)
    except ValueError as e:
      raise CompileError(f"{e} (rows must be a multiple of {row_multiple}, the mesh's batch "
                         "ways times grad_accum_steps)") from None
    src_vocab = tgt_vocab = int(config.data.vocab_size)
  else:
    raise CompileError(f"--shapes {shapes!r}: expected data or max_len")
  longest_first = sorted(buckets, key=lambda b: (-max(b.src_len, b.tgt_len), -b.rows))
  return longest_first, src_vocab, tgt_vocab


# ----------------------------------------------------------------------------- HLO


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
                "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?\S+\s*=\s*(.+?)\s+([a-z][a-z0-9-]*)\(")


def shape_bytes(text: str) -> int:
  """Bytes of every array type in an HLO result type, e.g. ``(bf16[8,512], f32[])``."""
  total = 0
  for dtype, dims in _ARRAY.findall(text):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _instructions(hlo_text: str) -> Iterable[tuple[str, str]]:
  """(result type, opcode) of every instruction of an HLO module's text."""
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      yield m.group(1), m.group(2)


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """``{op: {"count": n, "bytes": result bytes}}`` of the collectives in compiled HLO text.

  An asynchronous pair counts once, at its ``-start``, with the bytes of its last
  result (the operand and scratch come first in the start's tuple).
  """
  out = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
  for result, opcode in _instructions(hlo_text):
    op = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
    if op not in out:
      continue
    if opcode.endswith("-start") and result.startswith("("):
      arrays = _ARRAY.findall(result)
      arrays = [a for a in arrays if a[0] in _DTYPE_BYTES and a[1]] or arrays
      result = "{}[{}]".format(*arrays[-1]) if op != "all-reduce" else result
    out[op]["count"] += 1
    out[op]["bytes"] += shape_bytes(result)
  return out


def largest_instructions(hlo_text: str, n: int) -> list[dict[str, Any]]:
  """The ``n`` instructions outside fusions with the largest results (bytes they write),
  largest first."""
  rows, fused = [], False
  for line in hlo_text.splitlines():
    if line.endswith("{") and not line.startswith(" "):        # a computation starts
      fused = "fused" in line.split("(")[0] or "fusion" in line.split("(")[0]
      continue
    for result, opcode in ([] if fused else _instructions(line)):
      if opcode not in ("parameter", "get-tuple-element", "tuple", "bitcast", "constant"):
        rows.append((shape_bytes(result), opcode, line.strip()[:160]))
  rows.sort(key=lambda r: -r[0])
  return [{"bytes": b, "op": op, "hlo": text} for b, op, text in rows[:n]]


# ----------------------------------------------------------------------------- compile


def _cost(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return {"flops": float(cost.get("flops", 0.0)),
          "bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def _memory(compiled, chip: Chip) -> dict[str, Any]:
  mem = compiled.memory_analysis()
  args, temps = int(mem.argument_size_in_bytes), int(mem.temp_size_in_bytes)
  outputs, aliased = int(mem.output_size_in_bytes), int(mem.alias_size_in_bytes)
  total = args + temps + outputs - aliased + int(mem.generated_code_size_in_bytes)
  return {"arguments_gib": args / GiB, "temporaries_gib": temps / GiB,
          "outputs_gib": outputs / GiB, "aliased_gib": aliased / GiB, "total_gib": total / GiB,
          "capacity_gib": chip.hbm_gib, "fits": total <= chip.hbm_gib * GiB}


def analyse(compiled, chip: Chip, tokens: int, num_chips: int, top: int = 0) -> dict[str, Any]:
  """Memory, cost, roofline bound and collectives of one compiled step processing ``tokens``
  target tokens over ``num_chips`` chips."""
  cost = _cost(compiled)
  compute_s = cost["flops"] / (chip.bf16_tflops * 1e12)
  memory_s = cost["bytes_accessed"] / (chip.hbm_gbps * 1e9)
  bound_s = max(compute_s, memory_s)
  text = compiled.as_text()
  report = {"hbm": _memory(compiled, chip), **cost,
            "roofline": {"compute_s": compute_s, "memory_s": memory_s, "bound_s": bound_s,
                         "bound_by": "compute" if compute_s >= memory_s else "memory",
                         "tokens_per_s_bound": tokens / bound_s if bound_s > 0 else None,
                         "tokens_per_s_bound_per_chip":
                             tokens / bound_s / num_chips if bound_s > 0 else None},
            "collectives": collectives(text)}
  if top:
    report["largest_instructions"] = largest_instructions(text, top)
  return report


def _abstract_batch(bucket: bucketing.Bucket, batch_sharding) -> dict[str, jax.ShapeDtypeStruct]:
  shapes = {"src": bucket.src_len, "tgt_in": bucket.tgt_len, "tgt_out": bucket.tgt_len}
  return {k: jax.ShapeDtypeStruct((bucket.rows, n), jnp.int32, sharding=batch_sharding)
          for k, n in shapes.items()}


def _timed_compile(jitted, *args) -> tuple[Any, float]:
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def compile_steps(config: ml_collections.ConfigDict, topology: Topology, buckets: Sequence[
                  bucketing.Bucket], src_vocab: int, tgt_vocab: int, *, devices: list,
                  top: int = 0, log=print, hlo: dict | None = None) -> list[dict[str, Any]]:
  """Compiles the train and eval steps of ``config`` for each bucket on ``devices``
  (``hlo``: a dict that receives the last compiled HLO text of each step)."""
  try:
    mesh = sharding.make_mesh(config.mesh, devices)
    model_cfg = TransformerConfig.from_config(config.model, src_vocab, tgt_vocab)
  except ValueError as e:
    raise CompileError(f"{e} (topology {topology.name}: {len(devices)} chips)") from None
  partitioner = sharding.JitPartitioner(mesh)
  model, optimizer = Transformer(model_cfg), steps.make_optimizer(config)
  partitioner.setup(functools.partial(steps.init_boxed_state, model, optimizer),
                    jax.random.key(0))
  state = partitioner.abstract_state()
  train_fn = partitioner.compile_train_step(steps.make_train_step(
      model, optimizer, label_smoothing=float(config.label_smoothing),
      grad_accum_steps=int(config.grad_accum_steps),
      learning_rate_fn=steps.make_schedule(config), grad_norm=bool(config.log_grad_norm),
      jit=False))
  eval_fn = partitioner.compile_eval_step(steps.make_eval_step(model, jit=False))
  batch_sharding = NamedSharding(mesh, P(sharding.BATCH_AXES))
  reports = []
  for bucket in buckets:
    batch = _abstract_batch(bucket, batch_sharding)
    shape = {"rows": bucket.rows, "src_len": bucket.src_len, "tgt_len": bucket.tgt_len}
    row = {"topology": topology.name, "chips": topology.chips, "hosts": topology.hosts,
           "mesh": dict(mesh.shape), "dtype": str(model_cfg.dtype), "shape": shape,
           "target_tokens": bucket.rows * bucket.tgt_len}
    for step, fn, args in (("train", train_fn, (state, batch)),
                           ("eval", eval_fn, (state.params, batch))):
      try:
        compiled, seconds = _timed_compile(fn, *args)
      except jax.errors.JaxRuntimeError as e:    # the compiler refuses what cannot fit
        if "RESOURCE_EXHAUSTED" not in str(e):
          raise
        row[step] = {"hbm": {"fits": False}, "error": str(e).strip().splitlines()[0]}
        continue
      if hlo is not None:
        hlo[step] = compiled.as_text()
      row[step] = {**analyse(compiled, topology.chip, row["target_tokens"], topology.chips,
                             top=top), "compile_s": seconds}
    log(format_row(row))
    reports.append(row)
  return reports


def run(config: ml_collections.ConfigDict, topology_name: str, *, shapes: str = "max_len",
        max_shapes: int = 0, workdir: str | None = None, top: int = 0, log=print
        ) -> list[dict[str, Any]]:
  """Compiles ``config``'s steps for the TPU slice ``topology_name``; one report per shape."""
  topology = parse_topology(topology_name)
  devices = tpu_devices(topology)
  try:
    ways = sharding.batch_shards(config.mesh, len(devices))
  except ValueError as e:
    raise CompileError(f"{e} (topology {topology.name} has {len(devices)} chips)") from None
  row_multiple = max(ways, topology.hosts) * int(config.grad_accum_steps)
  buckets, src_vocab, tgt_vocab = batch_shapes(config, row_multiple, shapes=shapes,
                                               workdir=workdir)
  log(f"{topology.name}: {topology.chips} chips ({topology.topology_name}), {topology.hosts} "
      f"host(s); {len(buckets)} batch shape(s)"
      + (f", compiling the {max_shapes} longest" if 0 < max_shapes < len(buckets) else ""))
  if max_shapes > 0:
    buckets = buckets[:max_shapes]
  return compile_steps(config, topology, buckets, src_vocab, tgt_vocab, devices=devices,
                       top=top, log=log)


def format_row(row: dict[str, Any]) -> str:
  """A few lines per shape for the terminal."""
  s = row["shape"]
  lines = [f"{row['topology']} {s['rows']} x ({s['src_len']}, {s['tgt_len']}) tokens, mesh "
           f"{row['mesh']}, {row['dtype']}:"]
  for step in ("train", "eval"):
    r = row[step]
    if "error" in r:
      lines.append(f"  {step:<5} DOES NOT FIT: {r['error']}")
      continue
    h, roof = r["hbm"], r["roofline"]
    coll = ", ".join(f"{op} {c['count']} ({c['bytes'] / 2**20:.1f} MiB)"
                     for op, c in r["collectives"].items() if c["count"]) or "none"
    lines.append(
        f"  {step:<5} HBM/chip {h['total_gib']:.2f} of {h['capacity_gib']:g} GiB "
        f"({'fits' if h['fits'] else 'DOES NOT FIT'}; args {h['arguments_gib']:.2f}, temps "
        f"{h['temporaries_gib']:.2f}, outputs {h['outputs_gib']:.2f}); {r['flops'] / 1e12:.3f} "
        f"TFLOP, {r['bytes_accessed'] / GiB:.2f} GiB accessed per chip; roofline bound "
        f"{roof['bound_s'] * 1e3:.2f} ms ({roof['bound_by']}), at most "
        f"{roof['tokens_per_s_bound']:,.0f} target tokens/s; compiled in {r['compile_s']:.1f} s")
    lines.append(f"        collectives: {coll}")
    lines += [f"        {i['bytes'] / 2**20:9.1f} MiB  {i['hlo'][:120]}"
              for i in r.get("largest_instructions", [])]
  return "\n".join(lines)

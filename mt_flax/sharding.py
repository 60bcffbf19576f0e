"""Devices: mesh and logical axis rules for ``jax.jit``, ``jax.pmap`` plumbing, multi-host.

Two ways to run the pure steps of :mod:`mt_flax.steps`, both behind the same
small interface (:class:`JitPartitioner`, :class:`PmapPartitioner`):

- ``jit``: one global program over a ``Mesh`` with axes ``(data, fsdp, tensor)``.
  Parameters are placed by their logical axis names (``LOGICAL_AXIS_RULES``):
  ``data`` only = pure data parallel, ``fsdp`` shards parameters and optimizer
  state along ``embed`` (and the batch), ``tensor`` shards heads/MLP/vocab.
- ``pmap``: data parallel, state replicated on every device, gradients summed
  with ``psum`` over all devices of all processes.

Steps are traced under the mesh (as an abstract mesh) and the logical axis
rules, so the model's ``nn.with_logical_constraint`` calls pin activations to
``(batch, length, embed)`` shardings; XLA's propagation fills in the rest.

On several hosts each process loads only the rows its devices hold (its
:class:`RowShare` of every global batch, derived from the batch sharding);
processes whose devices hold the same rows load the same ones.
``shard_batch`` assembles the global array from them.

Host-level collectives (:func:`any_of_processes`, :func:`same_on_all_processes`,
:func:`common_batch_shape`) are device programs on several processes: each waits
for every program queued before it, so the training loop calls them only before
its first step, at its sync points and its saves, never in a step between them.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
from typing import Any, Callable, Hashable, Iterable, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np
from flax import jax_utils
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mt_flax.errors import IdleGpus, UserError


MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axes, in order of precedence (see flax.linen.logical_to_mesh_axes)
LOGICAL_AXIS_RULES = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("kv", None),
    ("length", None),
)


# ----------------------------------------------------------------------------- multi-host


def maybe_initialize_distributed() -> None:
  """Calls ``jax.distributed.initialize`` when this is one of several processes.

  Explicit: ``MT_FLAX_COORDINATOR`` (``host:port``), ``MT_FLAX_NUM_PROCESSES``,
  ``MT_FLAX_PROCESS_ID`` (e.g. several processes on one machine, CPU
  collectives over gloo). Detected: a multi-host Cloud TPU slice
  (``TPU_WORKER_HOSTNAMES`` lists several hosts), a SLURM job with several
  tasks, or ``MT_FLAX_DISTRIBUTED=1``; JAX then finds its peers itself.
  Must run before anything touches a JAX backend.

  In a SLURM step JAX also passes ``local_device_ids=[SLURM_LOCALID]``: a task uses the one
  GPU of that number (``jax_cuda_visible_devices``), so a job needs one task per GPU,
  which :func:`check_slurm_gpus` then verifies. That setting is read by the CUDA and ROCm
  clients only: on the CPU backend every task keeps all its host devices (the loopback test
  of ``mt_flax slurm`` runs 2 tasks of 4 CPU devices that way).
  """
  if jax.distributed.is_initialized():
    return
  env = os.environ
  if env.get("MT_FLAX_COORDINATOR"):
    try:
      num, pid = int(env["MT_FLAX_NUM_PROCESSES"]), int(env["MT_FLAX_PROCESS_ID"])
    except (KeyError, ValueError):
      raise ValueError("MT_FLAX_COORDINATOR needs integer MT_FLAX_NUM_PROCESSES and "
                       "MT_FLAX_PROCESS_ID") from None
    jax.distributed.initialize(coordinator_address=env["MT_FLAX_COORDINATOR"],
                               num_processes=num, process_id=pid)
    _native_stdout_to_stderr()
    return
  tpu_hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  if (env.get("MT_FLAX_DISTRIBUTED") == "1" or len(tpu_hosts) > 1
      or int(env.get("SLURM_NTASKS", "1") or 1) > 1):
    jax.distributed.initialize()
    _native_stdout_to_stderr()
  check_slurm_gpus(env)


def _native_stdout_to_stderr() -> None:
  """Sends what native code writes to stdout to stderr; Python's ``sys.stdout`` stays on stdout.

  Gloo (the CPU collectives between processes) prints a ``[Gloo] Rank ...`` line from C++
  whenever it connects, from several threads at once, which would otherwise land amid the
  report or the translations that process 0 writes to stdout."""
  sys.stdout.flush()
  stdout = os.dup(1)
  os.dup2(2, 1)
  sys.stdout = os.fdopen(stdout, "w", buffering=1 if sys.stdout.line_buffering else -1,
                         encoding=sys.stdout.encoding, errors=sys.stdout.errors)


def check_gpu_layout(gpus_per_node: int, tasks_per_node: int, gpus_per_task: int) -> None:
  """Raises :class:`IdleGpus` (one line) when ``tasks_per_node`` tasks using ``gpus_per_task``
  GPUs each leave some of a node's ``gpus_per_node`` GPUs unused."""
  idle = gpus_per_node - tasks_per_node * gpus_per_task
  if idle <= 0:
    return
  if gpus_per_task == 0:
    raise IdleGpus(f"JAX found no GPU but SLURM gave this node {gpus_per_node}: install the "
                   "CUDA build of JAX (MT_FLAX_EXTRAS=gpu ./launch.sh setup), or set "
                   "JAX_PLATFORMS=cpu to run on the CPU")
  raise IdleGpus(f"{idle} of the {gpus_per_node} GPUs of each node would sit idle: "
                 f"{tasks_per_node} task(s) per node using {gpus_per_task} GPU(s) each (JAX "
                 "gives a SLURM task the one GPU numbered SLURM_LOCALID); start one task per "
                 f"GPU, srun --ntasks-per-node={gpus_per_node} (as mt_flax slurm does)")


def check_slurm_gpus(env: Mapping[str, str]) -> None:
  """In a SLURM step with GPUs (``SLURM_GPUS_ON_NODE``), :func:`check_gpu_layout` of this
  process's devices against the tasks per node (``SLURM_NTASKS`` over the step's nodes).
  Skipped where ``JAX_PLATFORMS`` asks for the CPU: there are no GPUs to leave idle."""
  gpus = int(env.get("SLURM_GPUS_ON_NODE") or 0)
  if not gpus or "SLURM_PROCID" not in env or (
      env.get("JAX_PLATFORMS", "").split(",")[0].strip() == "cpu"):
    return
  nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
  tasks = max(1, int(env.get("SLURM_NTASKS") or 1) // nodes)
  check_gpu_layout(gpus, tasks, jax.local_device_count() if jax.default_backend() == "gpu" else 0)


def barrier(name: str, timeout_s: int = 3 * 3600) -> None:
  """Waits until every process reaches ``barrier(name)`` (a no-op on one process).

  Uses the coordination service of ``jax.distributed``, not a device
  collective: on CPU a collective waits 30 s for its peers, too short for one
  process that trains a tokenizer while the others wait.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed
  distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)


def is_primary() -> bool:
  return jax.process_index() == 0


def to_host(x: jax.Array) -> np.ndarray:
  """The whole of ``x`` on this host, also where other processes hold some of it (a gather)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _broadcast_text(text: str) -> str:
  """Process 0's ``text`` on every process (two broadcasts: its length, then its bytes)."""
  data = np.frombuffer(text.encode(), np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.int64(data.size)))
  data = data if is_primary() else np.zeros(size, np.uint8)
  return np.asarray(multihost_utils.broadcast_one_to_all(data)).tobytes().decode()


def from_primary(items: Iterable[Any]) -> Iterator[Any]:
  """Process 0's ``items`` (JSON values), one broadcast each, on every process; the others
  never iterate their own (e.g. only process 0 reads stdin).

  A :class:`UserError` raised by process 0's items is raised on every process (the same
  line and exit status); closing the generator on process 0 ends it on every process.
  """
  if jax.process_count() == 1:
    yield from items
    return
  source, failure = iter(items), None
  while True:
    message = None
    if is_primary():
      try:
        message = {"item": next(source)}
      except StopIteration:
        message = {}
      except UserError as e:
        message, failure = {"error": str(e), "exit_code": e.exit_code}, e
    message = json.loads(_broadcast_text(json.dumps(message)))
    if "error" in message:
      if failure is None:
        failure = UserError(message["error"])
        failure.exit_code = message["exit_code"]
      raise failure
    if "item" not in message:
      return
    try:
      yield message["item"]
    except GeneratorExit:
      if is_primary():
        _broadcast_text("{}")
      raise


# ----------------------------------------------------------------------------- mesh


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, int, int]:
  """Resolves ``{data, fsdp, tensor}`` (one of them may be -1) against ``num_devices``."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if len(fill) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh={dict(zip(MESH_AXES, sizes))}: expected positive sizes with at "
                     "most one -1 (fills the remaining devices)")
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"mesh={dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not "
                       f"divisible by {known}")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh={dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices; "
                     f"expected {num_devices} (set one axis to -1 to fill)")
  return tuple(sizes)


def axes_size(shape: Mapping[str, int], axes: Any = BATCH_AXES) -> int:
  """Devices along ``axes`` (a mesh axis name, several or None) of a mesh ``shape`` (name ->
  size); by default the batch shards."""
  names = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return math.prod(shape[n] for n in names)


def batch_shards(mesh_cfg: Any, num_devices: int) -> int:
  """The slices a batch is cut into (the data x fsdp ways) of ``mesh_cfg`` on ``num_devices``."""
  return axes_size(dict(zip(MESH_AXES, mesh_shape(mesh_cfg, num_devices))))


def make_mesh(mesh_cfg: Any, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _divisible_spec(shape: Sequence[int], spec: P, mesh: Mesh) -> P:
  """Drops mesh axes from dimensions they do not divide (those stay replicated)."""
  return P(*(axes if axes and dim % axes_size(mesh.shape, axes) == 0 else None
             for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))))


def logical_shardings(abstract_boxed: Any, mesh: Mesh,
                      rules=LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings for a tree whose leaves may be boxed with logical axis names.

  The result has the structure of the unboxed tree.
  """
  logical = nn.get_partition_spec(abstract_boxed)
  shapes = nn.meta.unbox(abstract_boxed)
  mesh_specs = nn.logical_to_mesh(logical, rules)
  return jax.tree.map(
      lambda x, spec: NamedSharding(mesh, _divisible_spec(x.shape, spec, mesh)),
      shapes, mesh_specs)


# ----------------------------------------------------------------------------- batches


def common_batch_shape(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Pads this process's batch to the largest row count and lengths over all processes.

  Padding rows and columns are 0 (pad), so they carry zero loss weight. One gather
  per call: for batches whose shapes may differ between processes. The training
  loop's do not (every process plans the same global batches); it agrees on their
  shapes once with :func:`same_on_all_processes`.
  """
  if jax.process_count() == 1:
    return batch
  keys = sorted(batch)
  local = np.array([d for k in keys for d in batch[k].shape], np.int64)
  target = np.max(multihost_utils.process_allgather(local), axis=0)
  out, i = {}, 0
  for k in keys:
    x = batch[k]
    want = target[i:i + x.ndim]
    i += x.ndim
    out[k] = np.pad(x, [(0, int(w) - s) for s, w in zip(x.shape, want)])
  return out


def any_of_processes(flags: Sequence[bool]) -> list[bool]:
  """Each of ``flags`` OR-ed over all processes (one gather, a barrier, on several hosts)."""
  if jax.process_count() == 1:
    return [bool(f) for f in flags]
  gathered = multihost_utils.process_allgather(np.array(flags, bool))
  return [bool(f) for f in np.any(gathered.reshape(-1, len(flags)), axis=0)]


def same_on_all_processes(text: str, what: str) -> None:
  """Checks that ``text`` is the same on every process: one gather of its SHA-256 (nothing on
  one process).

  Raises:
    ValueError: (one line) naming ``what`` and a process whose ``text`` differs from
      process 0's.
  """
  if jax.process_count() == 1:
    return
  digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(digest)).reshape(-1, digest.size)
  differ = [i for i, d in enumerate(gathered) if not np.array_equal(d, gathered[0])]
  if differ:
    raise ValueError(f"{what} differ between process 0 and process {differ[0]} (this is "
                     f"process {jax.process_index()}: {text[:200]}); expected every process "
                     "to run the same config on the same data")


def any_process(flag: bool) -> bool:
  """True on every process if ``flag`` is True on any of them (a barrier on several hosts)."""
  return any_of_processes([flag])[0]


@dataclasses.dataclass(frozen=True)
class RowShare:
  """The rows of every global batch one process loads.

  The batch dimension is cut into ``num_shards`` equal blocks (block ``i`` is rows
  ``[i * B / num_shards, (i + 1) * B / num_shards)`` of a batch of ``B`` rows);
  this process's devices hold blocks ``shards`` (ascending), and its local batch
  is those blocks' rows in that order. Processes holding the same blocks form
  one of ``groups`` groups (``group`` is this one's index) and load the same rows.
  """
  shards: tuple[int, ...] = (0,)
  num_shards: int = 1
  group: int = 0

  def __post_init__(self):
    shards = tuple(int(s) for s in self.shards)
    object.__setattr__(self, "shards", shards)
    if (not shards or list(shards) != sorted(set(shards)) or shards[0] < 0
        or shards[-1] >= self.num_shards or self.num_shards % len(shards)
        or not 0 <= self.group < self.num_shards // len(shards)):
      raise ValueError(f"RowShare(shards={shards}, num_shards={self.num_shards}, "
                       f"group={self.group}): expected distinct ascending blocks in "
                       "[0, num_shards), a divisor of num_shards of them, group < groups")

  @classmethod
  def of_process(cls, index: int, count: int) -> "RowShare":
    """Block ``index`` of ``count``: one process in ``count``, each with its own rows."""
    return cls((index,), count, index)

  @property
  def groups(self) -> int:
    """Number of distinct row sets over all processes."""
    return self.num_shards // len(self.shards)

  @property
  def whole(self) -> bool:
    return len(self.shards) == self.num_shards

  def local_rows(self, global_rows: int) -> int:
    """Rows of this process's share of a global batch of ``global_rows`` rows."""
    if global_rows % self.num_shards:
      raise ValueError(f"a batch of {global_rows} rows does not split into "
                       f"{self.num_shards} batch shards")
    return global_rows // self.num_shards * len(self.shards)

  def global_rows(self, local_rows: int) -> int:
    """Rows of the global batch of which ``local_rows`` are this process's share."""
    if local_rows % len(self.shards):
      raise ValueError(f"a local batch of {local_rows} rows does not split into this "
                       f"process's {len(self.shards)} batch shards")
    return local_rows // len(self.shards) * self.num_shards

  def indices(self, global_rows: int) -> np.ndarray:
    """``[local_rows]`` global row indices of this process's rows, in local order."""
    per = self.local_rows(global_rows) // len(self.shards)
    return np.concatenate([np.arange(s * per, (s + 1) * per) for s in self.shards])

  def take(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's rows of a batch that every process holds whole."""
    if self.whole:
      return batch
    rows = self.indices(next(iter(batch.values())).shape[0])
    return {k: v[rows] for k, v in batch.items()}


def row_shares(device_shards: Sequence[tuple[Hashable, int]], num_shards: int
               ) -> dict[Hashable, RowShare]:
  """Each process's :class:`RowShare`, from ``(process, block)`` of every device.

  ``device_shards`` names, for each device of the mesh, its process and the
  block of the batch dimension it holds (replicas of a block hold the same one).

  Raises:
    ValueError: (one line) a layout whose rows cannot be fed: processes holding
      different numbers of blocks, or blocks shared by processes that do not hold
      the same ones.
  """
  held: dict[Hashable, set[int]] = {}
  for process, shard in device_shards:
    held.setdefault(process, set()).add(int(shard))
  sets = {p: tuple(sorted(s)) for p, s in held.items()}
  sizes = {len(s) for s in sets.values()}
  if len(sizes) > 1:
    counts = ", ".join(f"process {p}: {len(s)}" for p, s in sorted(sets.items()))
    raise ValueError(f"the mesh gives processes different numbers of batch shards ({counts}); "
                     "expected every process to hold as many (order the mesh's devices by "
                     "process)")
  distinct = sorted(set(sets.values()))
  owner = {}
  for rows in distinct:
    for shard in rows:
      if shard in owner:
        raise ValueError(f"batch shard {shard} is held by processes holding shards "
                         f"{owner[shard]} and {rows}; expected processes to hold the same "
                         "shards or none in common (order the mesh's devices by process)")
      owner[shard] = rows
  if set(owner) != set(range(num_shards)):
    raise ValueError(f"the mesh's devices hold batch shards {sorted(owner)}; expected "
                     f"0 to {num_shards - 1}")
  return {p: RowShare(s, num_shards, distinct.index(s)) for p, s in sets.items()}


def mesh_row_shares(sharding: NamedSharding,
                    process_of: Callable[[jax.Device], Hashable] = lambda d: d.process_index
                    ) -> dict[Hashable, RowShare]:
  """Each process's :class:`RowShare` under the batch ``sharding`` (every device of its mesh).

  ``process_of`` maps a device to its process (tests may pretend one process is several).
  """
  spec = tuple(sharding.spec)
  num = axes_size(sharding.mesh.shape, spec[0] if spec else None)   # blocks of the rows
  index = sharding.devices_indices_map((num,))
  return row_shares([(process_of(d), idx[0].start or 0) for d, idx in index.items()], num)


# ----------------------------------------------------------------------------- partitioners


class JitPartitioner:
  """Runs steps with ``jax.jit`` over a ``(data, fsdp, tensor)`` mesh."""

  mode = "jit"

  def __init__(self, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    self.mesh = mesh
    self.rules = rules
    self.batch_sharding = NamedSharding(mesh, P(BATCH_AXES))
    self.replicated = NamedSharding(mesh, P())
    self.state_shardings = None

  @functools.cached_property
  def rows(self) -> RowShare:
    """The rows of every global batch this process loads: those its devices hold.

    Raises:
      ValueError: (one line) a mesh whose batch rows cannot be fed process by process.
    """
    shares = mesh_row_shares(self.batch_sharding)
    if jax.process_index() not in shares:
      raise ValueError(f"process {jax.process_index()} has no device in the mesh; expected "
                       "a mesh over every process's devices")
    return shares[jax.process_index()]

  @property
  def global_batch_multiple(self) -> int:
    """Rows of a global batch must be a multiple of this (the batch shards)."""
    return axes_size(self.mesh.shape)

  def setup(self, boxed_init: Callable[[jax.Array], Any], rng: jax.Array) -> None:
    """Derives the state shardings from the logical axis names of ``boxed_init(rng)``."""
    self._boxed_init = boxed_init
    self._abstract = jax.eval_shape(lambda r: nn.meta.unbox(boxed_init(r)), rng)
    self.state_shardings = logical_shardings(jax.eval_shape(boxed_init, rng), self.mesh,
                                             self.rules)

  def init_state(self, rng: jax.Array) -> Any:
    """Builds a fresh state directly in its shardings (the output shardings place it)."""
    init = jax.jit(lambda r: nn.meta.unbox(self._boxed_init(r)),
                   out_shardings=self.state_shardings)
    return init(rng)

  def abstract_state(self) -> Any:
    """Shape, dtype and sharding of every state leaf (the restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        self._abstract, self.state_shardings)

  def to_checkpoint(self, state: Any) -> Any:
    return state

  def from_checkpoint(self, state: Any) -> Any:
    return state

  def shard_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows ``[B_local, ...]`` (its :attr:`rows` of the global batch, in
    order) -> global arrays ``[B, ...]`` sharded along the batch axes."""
    if jax.process_count() == 1:
      return jax.device_put(local_batch, self.batch_sharding)
    return {k: jax.make_array_from_process_local_data(
                self.batch_sharding, v, (self.rows.global_rows(v.shape[0]),) + v.shape[1:])
            for k, v in local_batch.items()}

  def in_context(self, fn: Callable) -> Callable:
    """``fn`` traced with this mesh and the logical axis rules active.

    Inside, ``nn.with_logical_constraint`` becomes a sharding constraint.
    """
    @functools.wraps(fn)
    def traced(*args, **kwargs):
      with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh), \
          nn.logical_axis_rules(self.rules):
        return fn(*args, **kwargs)
    return traced

  def compile_train_step(self, step_fn: Callable) -> Callable:
    """``step_fn(state, batch) -> (state, metrics)`` jitted with the state shardings."""
    return jax.jit(self.in_context(step_fn),
                   in_shardings=(self.state_shardings, self.batch_sharding),
                   out_shardings=(self.state_shardings, self.replicated), donate_argnums=0)

  def compile_eval_step(self, eval_fn: Callable) -> Callable:
    """``eval_fn(params, batch) -> sums`` jitted with the parameter shardings."""
    return jax.jit(self.in_context(eval_fn),
                   in_shardings=(self.state_shardings.params, self.batch_sharding),
                   out_shardings=self.replicated)

  def params_of(self, state: Any) -> Any:
    return state.params

  def metrics_to_host(self, metrics: Any) -> Any:
    return jax.device_get(metrics)


class PmapPartitioner:
  """Runs steps with ``jax.pmap``: data parallel, ``psum`` over ``batch``.

  Each process maps over its local devices; the collectives span every
  process's devices (``jax.pmap`` with its default ``devices=None``), so
  gradients, losses and eval sums are global. Naming the devices restricts the
  collectives to them and is for one process only.
  """

  mode = "pmap"
  axis_name = "batch"

  def __init__(self, devices: Optional[Sequence[jax.Device]] = None):
    if devices is not None and jax.process_count() > 1:
      raise ValueError("PmapPartitioner(devices=...) on several processes would reduce over "
                       "those devices only; leave devices unset")
    self._pmap_devices = None if devices is None else list(devices)
    self.devices = list(jax.local_devices() if devices is None else devices)
    self.n = len(self.devices)

  @property
  def rows(self) -> RowShare:
    """Every device is a batch shard; this process's are consecutive."""
    p = jax.process_index()
    return RowShare(tuple(range(p * self.n, (p + 1) * self.n)), self.n * jax.process_count(), p)

  @property
  def global_batch_multiple(self) -> int:
    return self.n * jax.process_count()

  def replicate(self, tree: Any) -> Any:
    """One copy per device, stacked along a leading device axis."""
    return jax_utils.replicate(tree, self.devices)

  def setup(self, boxed_init: Callable[[jax.Array], Any], rng: jax.Array) -> None:
    self._init = lambda r: nn.meta.unbox(boxed_init(r))
    self._abstract = jax.eval_shape(self._init, rng)

  def init_state(self, rng: jax.Array) -> Any:
    return self.replicate(jax.device_get(jax.jit(self._init)(rng)))

  def abstract_state(self) -> Any:
    """Restore target: whole arrays on the first device (replicated afterwards)."""
    one = jax.sharding.SingleDeviceSharding(self.devices[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
                        self._abstract)

  @staticmethod
  def first_copy(tree: Any) -> Any:
    """This process's first device's copy of every leaf, on the host (numpy).

    Reads the local shard, with no computation: indexing a pmap output that
    spans several processes would start a program every process must join.
    """
    def first(x):
      if isinstance(x, jax.Array):
        return np.asarray(x.addressable_data(0)).reshape(x.shape[1:])
      return np.asarray(x)[0]
    return jax.tree.map(first, tree)

  def to_checkpoint(self, state: Any) -> Any:
    """The first local device's copy, on the host (identical on every device)."""
    return self.first_copy(state)

  def from_checkpoint(self, state: Any) -> Any:
    return self.replicate(jax.device_get(state))

  def shard_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """``[B_local, ...]`` -> ``[n_devices, B_local / n, ...]``."""
    def split(x):
      if x.shape[0] % self.n:
        raise ValueError(f"batch of {x.shape[0]} rows does not split over {self.n} devices")
      return x.reshape((self.n, x.shape[0] // self.n) + x.shape[1:])
    return {k: split(v) for k, v in local_batch.items()}

  def compile_train_step(self, step_fn: Callable) -> Callable:
    """``step_fn(state, batch, axis_name=...)`` mapped over devices."""
    return jax.pmap(functools.partial(step_fn, axis_name=self.axis_name),
                    axis_name=self.axis_name, devices=self._pmap_devices, donate_argnums=0)

  def compile_eval_step(self, eval_fn: Callable) -> Callable:
    return jax.pmap(functools.partial(eval_fn, axis_name=self.axis_name),
                    axis_name=self.axis_name, devices=self._pmap_devices)

  def params_of(self, state: Any) -> Any:
    return state.params

  def metrics_to_host(self, metrics: Any) -> Any:
    """Metrics are psum'd, so every device holds the global values."""
    return self.first_copy(metrics)


def inference_partitioner() -> JitPartitioner:
  """Where ``eval``, ``translate``, ``audit`` and ``average`` place the params and decode: on
  one process its first device (as ever); on several, every device of every process (each
  program needs all of them anyway), a data-parallel mesh with the params replicated on each
  device and the rows of each batch split between them."""
  devices = jax.devices() if jax.process_count() > 1 else jax.devices()[:1]
  return JitPartitioner(make_mesh(dict(zip(MESH_AXES, (-1, 1, 1))), devices))


def make_partitioner(config) -> JitPartitioner | PmapPartitioner:
  """From ``config.parallelism`` (``jit`` or ``pmap``) and ``config.mesh``."""
  mode = config.parallelism
  if mode == "jit":
    partitioner = JitPartitioner(make_mesh(config.mesh))
    partitioner.rows      # refuses, in one line, a layout whose rows cannot be fed
    return partitioner
  if mode == "pmap":
    return PmapPartitioner()
  raise ValueError(f"parallelism={mode!r}: expected 'jit' or 'pmap'")

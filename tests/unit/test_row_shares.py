"""Which rows of a global batch each process loads (``sharding.RowShare``), derived from
the batch sharding of a mesh over the 8 simulated devices, with processes assigned to
devices by the test (``process_of``), as on a pod."""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from mt_flax import sharding
from mt_flax.sharding import RowShare


def shares(mesh: dict, devices_per_process: int, order=None) -> dict[int, RowShare]:
  """Every process's share on a ``(data, fsdp, tensor)`` mesh; process = device id //
  ``devices_per_process``; ``order`` permutes the devices before the mesh is shaped."""
  devices = [jax.devices()[i] for i in (order or range(8))]
  shape = tuple(mesh.get(a, 1) for a in sharding.MESH_AXES)
  part = sharding.JitPartitioner(Mesh(np.array(devices).reshape(shape), sharding.MESH_AXES))
  return sharding.mesh_row_shares(part.batch_sharding, lambda d: d.id // devices_per_process)


def rows(share: RowShare, global_rows: int = 16) -> list[int]:
  return share.indices(global_rows).tolist()


def test_data_only_mesh_over_two_processes_gives_each_a_distinct_half():
  got = shares(dict(data=8), devices_per_process=4)
  assert got == {0: RowShare((0, 1, 2, 3), 8, 0), 1: RowShare((4, 5, 6, 7), 8, 1)}
  assert rows(got[0]) == list(range(8)) and rows(got[1]) == list(range(8, 16))


def test_tensor_axis_spanning_processes_gives_both_the_same_rows():
  # 2 processes x 4 devices, tensor=8: one batch shard, held by every device
  got = shares(dict(tensor=8), devices_per_process=4)
  assert got[0] == got[1] == RowShare((0,), 1, 0) and got[0].whole
  assert rows(got[0]) == rows(got[1]) == list(range(16))
  # data=2 x tensor=4 on 4 processes of 2 devices: processes 0, 1 hold block 0; 2, 3 block 1
  got = shares(dict(data=2, tensor=4), devices_per_process=2)
  assert [got[p] for p in range(4)] == [RowShare((0,), 2, 0)] * 2 + [RowShare((1,), 2, 1)] * 2


def test_one_device_per_process_with_data_and_tensor_pairs_processes_up():
  # 4 processes x 1 device, data=2 x tensor=2 (the first 4 devices)
  devices = jax.devices()[:4]
  part = sharding.JitPartitioner(sharding.make_mesh(dict(data=2, fsdp=1, tensor=2), devices))
  got = sharding.mesh_row_shares(part.batch_sharding, lambda d: d.id)
  assert [got[p] for p in range(4)] == [RowShare((0,), 2, 0)] * 2 + [RowShare((1,), 2, 1)] * 2
  assert rows(got[0]) == rows(got[1]) == list(range(8))
  assert rows(got[2]) == rows(got[3]) == list(range(8, 16))


def test_interleaved_devices_load_their_blocks_in_order():
  """A process whose devices hold blocks 0, 2, 4, 6 loads those rows: not contiguous."""
  got = shares(dict(data=8), devices_per_process=4, order=[0, 4, 1, 5, 2, 6, 3, 7])
  assert got[0] == RowShare((0, 2, 4, 6), 8, 0) and got[1] == RowShare((1, 3, 5, 7), 8, 1)
  assert rows(got[0]) == [0, 1, 4, 5, 8, 9, 12, 13]
  assert got[0].global_rows(8) == 16 and got[0].local_rows(16) == 8


def test_fsdp_counts_as_a_batch_axis():
  got = shares(dict(data=2, fsdp=2, tensor=2), devices_per_process=4)
  assert got == {0: RowShare((0, 1), 4, 0), 1: RowShare((2, 3), 4, 1)}


def test_layouts_that_cannot_be_fed_are_refused_in_one_line():
  # processes 0 and 1 hold different numbers of batch shards (3 devices and 5)
  with pytest.raises(ValueError, match=r"different numbers of batch shards \(process 0: 1, "
                                       r"process 1: 2\)") as e:
    sharding.mesh_row_shares(
        sharding.JitPartitioner(sharding.make_mesh(dict(data=2, fsdp=1, tensor=4))).batch_sharding,
        lambda d: int(d.id >= 3))
  assert "\n" not in str(e.value)
  # blocks shared by processes holding different sets: {0, 1}, {1, 2}, {2, 3}, {3, 0}
  with pytest.raises(ValueError, match=r"batch shard 0 is held by processes holding shards "
                                       r"\(0, 1\) and \(0, 3\)"):
    sharding.row_shares([(0, 0), (0, 1), (1, 1), (1, 2), (2, 3), (2, 0), (3, 2), (3, 3)], 4)
  with pytest.raises(ValueError, match="does not split into 2 batch shards"):
    RowShare((1,), 2, 1).indices(7)


def test_pmap_gives_each_process_its_devices_rows():
  part = sharding.PmapPartitioner()
  assert part.rows == RowShare(tuple(range(8)), 8, 0) and part.global_batch_multiple == 8

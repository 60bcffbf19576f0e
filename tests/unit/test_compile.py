"""TPU topologies and the compiled-HLO readers of ``python -m mt_flax compile`` (libtpu)."""
import pytest

from mt_flax import compile as aot
from mt_flax.commands import compile as compile_cmd

from conftest import ROOT

DEFAULT_EXPERIMENT = str(ROOT / "experiments" / "bible_en_es_tiny.py")


def _compile(call_main, tmp_path, capsys, *argv):
  status = call_main(compile_cmd.main, ["--out", str(tmp_path), *argv])
  return status, capsys.readouterr()


@pytest.mark.parametrize("name, chips, hosts, libtpu_name", [
    ("v5e-8", 8, 1, "v5e:2x4"), ("v6e-8", 8, 1, "v6e:2x4"), ("v4-8", 4, 1, "v4:2x2x1"),
    ("v4-16", 8, 2, "v4:2x2x2"), ("v5p-32", 16, 4, "v5p:2x2x4"), ("v5litepod-16", 16, 4, "v5e:4x4")])
def test_topology_names_give_one_device_per_chip_on_each_host(name, chips, hosts, libtpu_name):
  topology = aot.parse_topology(name)
  assert (topology.chips, topology.hosts, topology.topology_name) == (chips, hosts, libtpu_name)
  devices = aot.tpu_devices(topology)
  assert len(devices) == chips
  assert len({d.process_index for d in devices}) == hosts


@pytest.mark.parametrize("argv, expected", [
    (["--topology", "v5e-7"], "--topology 'v5e-7': expected a TPU slice such as v5e-8"),
    (["--topology", "v5e-8", "--config.mesh.tensor=3"],
     "8 devices are not divisible by 3 (topology v5e-8 has 8 chips)"),
    (["--topology", "v5e-8", "--config.mesh.data=2"],
     "uses 2 devices; expected 8 (set one axis to -1 to fill) (topology v5e-8 has 8 chips)"),
])
def test_bad_topology_or_mesh_is_one_line(call_main, tmp_path, capsys, argv, expected):
  status, out = _compile(call_main, tmp_path, capsys, "--config", DEFAULT_EXPERIMENT, *argv)
  assert status == 2
  assert out.err.count("\n") == 1 and expected in out.err, out.err


def test_collectives_are_counted_once_per_async_pair_with_result_bytes():
  hlo = "\n".join([
      "  %ag = bf16[16,128]{1,0} all-gather(bf16[4,128]{1,0} %p), dimensions={0}",
      "  %ags = (bf16[4,8]{1,0}, bf16[16,8]{1,0}) all-gather-start(bf16[4,8]{1,0} %q)",
      "  %agd = bf16[16,8]{1,0} all-gather-done((bf16[4,8]{1,0}, bf16[16,8]{1,0}) %ags)",
      "  ROOT %ar = (f32[512]{0:T(512)}, f32[]{:T(128)}) all-reduce(f32[512] %g, f32[] %l)",
      "  %rs = f32[2,3]{1,0} reduce-scatter(f32[8,3]{1,0} %x), dimensions={0}",
  ])
  found = aot.collectives(hlo)
  assert found["all-gather"] == {"count": 2, "bytes": 16 * 128 * 2 + 16 * 8 * 2}
  assert found["all-reduce"] == {"count": 1, "bytes": 512 * 4 + 4}
  assert found["reduce-scatter"] == {"count": 1, "bytes": 2 * 3 * 4}
  assert found["collective-permute"]["count"] == found["all-to-all"]["count"] == 0


def test_largest_instructions_skip_fused_computations():
  hlo = "\n".join([
      "%fused_computation.1 (param_0: f32[64,64]) -> f32[64,64] {",
      "  %m = f32[64,64]{1,0} multiply(f32[64,64]{1,0} %param_0, f32[64,64]{1,0} %param_0)",
      "}",
      "ENTRY %main.2 (p: f32[64,64]) -> f32[8,8] {",
      "  %p = f32[64,64]{1,0} parameter(0)",
      "  %f = f32[64,64]{1,0} fusion(f32[64,64]{1,0} %p), kind=kLoop, calls=%fused_computation.1",
      "  ROOT %s = f32[8,8]{1,0} slice(f32[64,64]{1,0} %f), slice={[0:8], [0:8]}",
      "}"])
  assert [(i["op"], i["bytes"]) for i in aot.largest_instructions(hlo, 5)] == [
      ("fusion", 64 * 64 * 4), ("slice", 8 * 8 * 4)]

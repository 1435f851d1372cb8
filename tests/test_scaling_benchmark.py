"""benchmarks/scaling.py's count of the collectives in a compiled program: ops in a loop body
count trip-count times, groups of one device are left out, bytes are the whole array's."""

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "benchmarks", "scaling.py")


@pytest.fixture
def scaling(monkeypatch):
    """The benchmark module; the XLA_FLAGS and sys.path it sets on import are put back."""
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location("scaling_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HLO = """HloModule m, num_partitions=4

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %s = f32[] add(f32[] %a, f32[] %b)
}

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %x = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %all-reduce.1 = f32[8,16]{1,0} all-reduce(%x), channel_id=1, replica_groups=[2,2]<=[4], to_apply=%add, metadata={op_name="jit(f)/while/body/dot_general"}
  ROOT %t = (s32[], f32[8,16]) tuple(%i, %all-reduce.1)
}

%cond (p: (s32[], f32[8,16])) -> pred[] {
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[8,16]) -> f32[32,16] {
  %w = (s32[], f32[8,16]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %all_gather.2 = f32[32,16]{1,0} all-gather(%a), channel_id=2, replica_groups={{0,1,2,3}}, dimensions={0}, metadata={op_name="jit(f)/shard_map/all_gather"}
  %reduce_scatter.3 = bf16[2,16]{1,0} reduce-scatter(%a), channel_id=3, replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add, metadata={op_name="jit(f)/(shard_map/psum_scatter:dot_general)"}
  %all-reduce.4 = f32[8,16]{1,0} all-reduce(%a), channel_id=4, replica_groups={{0},{1},{2},{3}}, to_apply=%add
  ROOT %r = f32[32,16]{1,0} copy(%all_gather.2)
}
"""


def test_counts_from_hlo_text(scaling):
    counts = scaling.count_collectives(HLO)
    # 5 trips of an all-reduce of 8x16 float32 in groups of 2.
    assert counts["all-reduce"] == [5, 5 * 8 * 16 * 4, 0, 0]
    # Gathered result; wholly inside shard_map.
    assert counts["all-gather"] == [1, 32 * 16 * 4, 1, 32 * 16 * 4]
    # The array before scattering (result x group of 4); its op_name mixes in a non-loss op.
    assert counts["reduce-scatter"] == [1, 2 * 16 * 2 * 4, 0, 0]
    assert counts["all-to-all"] == counts["collective-permute"] == [0, 0, 0, 0]
    assert (counts["unknown_trips"], counts["loops"]) == (0, 1)


def test_counts_a_compiled_program(scaling):
    mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:4])

    def body(x, _):
        x = x + jax.lax.psum(jnp.sin(x), "data")
        return x, None

    def f(x):
        x = jax.lax.scan(body, x, None, length=3)[0]
        return jax.lax.all_gather(x, "data", tiled=True)

    program = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("data"), out_specs=P(),
                                   check_vma=False))
    x = jax.ShapeDtypeStruct((16, 32), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    counts = scaling.count_collectives(program.lower(x).compile().as_text())
    # Whether XLA keeps the loop or unrolls it, the psum runs 3 times on a [4, 32] shard.
    assert counts["all-reduce"][:2] == [3, 3 * 4 * 32 * 4]
    assert counts["all-gather"][:2] == [1, 16 * 32 * 4]
    np.testing.assert_equal(scaling.mesh_of("tp", 1), None)
    assert scaling.mesh_of("mixed", 8) == {"data": 2, "fsdp": 2, "model": 2}

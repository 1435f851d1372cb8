"""The device mesh, logical-axis rules, and shardings of batches and train state.

The mesh always has the axes ('data', 'fsdp', 'model'), all of type Auto (the compiler
propagates shardings; Linen's logical constraints need Auto axes). Batches are split over
('data', 'fsdp'); parameters follow the logical names their modules declare, mapped to mesh
axes by the config's rules table.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axis. 'embed' is sharded by FSDP, wide matmul dims by tensor parallelism.
DEFAULT_RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("vocab", "model"),
    ("kv", None),
    ("length", None),
)


def make_mesh(shape: dict, devices=None) -> jax.sharding.Mesh:
    """Builds the ('data', 'fsdp', 'model') mesh; one axis may be -1 (all remaining devices)."""
    devices = jax.devices() if devices is None else devices
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axes {sorted(unknown)}; the axes are {MESH_AXES}")
    sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(shape)}")
    if -1 in sizes:
        rest = math.prod(s for s in sizes if s != -1)
        if len(devices) % rest:
            raise ValueError(f"mesh {dict(shape)}: {len(devices)} devices do not split into it")
        sizes[sizes.index(-1)] = len(devices) // rest
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"but {len(devices)} are available")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def rules_from_config(rules) -> tuple:
    """Config rules (a list of [logical, mesh axis or list of axes or None]) as a tuple."""
    return tuple((name, tuple(axis) if isinstance(axis, (list, tuple)) else axis)
                 for name, axis in rules)


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_size_per_process(global_batch: int, mesh) -> int:
    """The slice of the global batch that this process feeds."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % shards:
        raise ValueError(f"batch_size {global_batch} does not divide over the {shards} batch "
                         f"shards of the mesh (mesh.data x mesh.fsdp = {shards})")
    if global_batch % jax.process_count():
        raise ValueError(f"batch_size {global_batch} does not divide over "
                         f"{jax.process_count()} processes")
    return global_batch // jax.process_count()


def logical_shardings(boxed_tree, mesh, rules):
    """NamedShardings for a tree whose leaves may be nn.Partitioned (else replicated)."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def to_global_batch(local_batch: dict, mesh) -> dict:
    """Host numpy batch (this process's slice) -> global jax.Arrays split over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}

"""The device mesh, logical-axis rules, and shardings of batches and train state.

The mesh always has the axes ('data', 'fsdp', 'model'), all of type Auto (the compiler
propagates shardings; Linen's logical constraints need Auto axes). Batches are split over
('data', 'fsdp'); parameters follow the logical names their modules declare, mapped to mesh
axes by the config's rules table.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
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


def under_rules(fn, rules):
    """``fn`` traced with the logical-axis ``rules`` in force. Linen's with_logical_constraint
    does nothing without rules, and rules are context read at trace time (not part of jit's
    cache key), so every jitted function that runs a model enters them itself: without them
    FSDP's activations are left to the compiler, which all-reduces them instead of gathering
    the parameters."""
    @functools.wraps(fn)
    def traced_with_rules(*args, **kwargs):
        with nn.logical_axis_rules(rules):
            return fn(*args, **kwargs)
    return traced_with_rules


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


class IndivisibleError(ValueError):
    """A sharded dimension that its mesh axes do not divide."""


def check_divisible(shapes, shardings) -> None:
    """Raises IndivisibleError naming the first array with a dimension its mesh axes do not divide
    (jax would fail later, deep inside the first jit, with the array unnamed)."""
    for (path, leaf), shard in zip(jax.tree_util.tree_leaves_with_path(shapes),
                                   jax.tree.leaves(shardings), strict=True):
        for dim, axes in zip(leaf.shape, shard.spec):
            axes = () if axes is None else axes if isinstance(axes, tuple) else (axes,)
            ways = math.prod(shard.mesh.shape[axis] for axis in axes)
            if dim % ways:
                name = "/".join(str(getattr(k, "key", k)) for k in path)
                raise IndivisibleError(
                    f"{name} (shape {tuple(leaf.shape)}) cannot be split {ways} ways over mesh "
                    f"axes {axes}: its dimension {dim} is not a multiple of {ways}. Choose a "
                    "mesh that divides it, or map its logical axis to None in sharding_rules")


def logical_shardings(boxed_tree, mesh, rules):
    """NamedShardings for a tree whose leaves may be nn.Partitioned (else replicated)."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)

"""What the train state costs each device under a mesh: every parameter's shape, logical axes,
PartitionSpec and shard bytes, and per-device totals of each part of the state. Computed from
the abstract state (ShapeDtypeStructs with shardings), so nothing is allocated; train --dry_run
prints it to check a sharding plan before a many-host run."""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec


@dataclasses.dataclass(frozen=True)
class ParamRow:
    path: str  # e.g. 'text_tower/token_embed/embedding'
    shape: tuple[int, ...]
    dtype: str
    logical: tuple | None  # the logical axis names its module declared (None: not known)
    spec: PartitionSpec  # over the mesh axes
    bytes: int  # the whole array
    bytes_per_device: int  # one device's shard


@dataclasses.dataclass(frozen=True)
class Report:
    rows: list[ParamRow]
    mesh_shape: dict[str, int]
    num_devices: int
    param_count: int
    param_bytes: int  # global
    # Bytes on each device of 'params', 'opt_state', 'model_state', 'ema' (only when the state
    # keeps one) and 'total' (the whole state, step and rng included).
    per_device: dict[str, int]


def _path(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def shard_bytes(leaf) -> int:
    """Bytes of one device's shard of an abstract array: each dimension divided by the mesh
    axes its spec names, rounded up (XLA pads a dimension that does not divide)."""
    mesh, spec = leaf.sharding.mesh, leaf.sharding.spec
    shard = list(leaf.shape)
    for dim, axes in enumerate(spec):
        axes = (axes,) if isinstance(axes, str) else axes or ()
        shard[dim] = -(-shard[dim] // math.prod(mesh.shape[a] for a in axes))
    return math.prod(shard) * leaf.dtype.itemsize


def _tree_shard_bytes(tree) -> int:
    return sum(shard_bytes(leaf) for leaf in jax.tree.leaves(tree))


def logical_axes(objective, example_batch: dict, mesh, rules) -> dict[str, tuple]:
    """{parameter path: logical axis names} as the objective's modules declare them (one more
    abstract trace of the initialisation, nothing allocated)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(objective.init_variables, jax.random.PRNGKey(0), example_batch)
    leaves = jax.tree_util.tree_leaves_with_path(
        boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return {_path(path): leaf.names for path, leaf in leaves if isinstance(leaf, nn.Partitioned)}


def build_report(abstract_state, mesh, logical: dict[str, tuple] | None = None) -> Report:
    """The report of an abstract TrainState (StateFactory.abstract()) on ``mesh``."""
    logical = logical or {}
    rows = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state.params):
        name = _path(path)
        rows.append(ParamRow(name, tuple(leaf.shape), leaf.dtype.name, logical.get(name),
                             leaf.sharding.spec, math.prod(leaf.shape) * leaf.dtype.itemsize,
                             shard_bytes(leaf)))
    per_device = {"params": sum(r.bytes_per_device for r in rows),
                  "opt_state": _tree_shard_bytes(abstract_state.opt_state),
                  "model_state": _tree_shard_bytes(abstract_state.model_state)}
    if abstract_state.ema:
        per_device["ema"] = _tree_shard_bytes(abstract_state.ema)
    per_device["total"] = _tree_shard_bytes(abstract_state)
    return Report(rows, dict(mesh.shape), mesh.devices.size,
                  sum(math.prod(r.shape) for r in rows), sum(r.bytes for r in rows), per_device)


def human_bytes(n: int) -> str:
    """1536 -> '1.50 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def _spec_text(spec: PartitionSpec) -> str:
    return "P(" + ", ".join(repr(a) for a in spec) + ")"


def format_report(report: Report) -> str:
    """A table with one line per parameter, then the per-device totals."""
    header = ("parameter", "shape", "dtype", "logical axes", "spec", "per device")
    lines = [(r.path, str(r.shape), r.dtype, "-" if r.logical is None else str(r.logical),
              _spec_text(r.spec), human_bytes(r.bytes_per_device)) for r in report.rows]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    table = ["  ".join(cell.ljust(w) if i < len(header) - 1 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
             for row in [header, *lines]]
    per_device = report.per_device
    ema = (f"{human_bytes(per_device['ema'])} per device" if "ema" in per_device
           else "none (ema_decay is 0)")
    totals = [
        f"Mesh {report.mesh_shape}: {report.num_devices} device(s)",
        f"Parameters: {report.param_count:,} ({human_bytes(report.param_bytes)}), "
        f"{human_bytes(per_device['params'])} per device",
        f"Optimizer state: {human_bytes(per_device['opt_state'])} per device",
        f"EMA weights: {ema}",
        f"Model state (batch statistics, queues): "
        f"{human_bytes(per_device['model_state'])} per device",
        f"Train state in all: {human_bytes(per_device['total'])} per device "
        f"({per_device['total']:,} bytes; activations not included)",
    ]
    return "\n".join([*table, "", *totals])

"""Which rows of a global batch each process feeds, derived from the mesh and the batch sharding.

The training pipeline and the evaluators both build their global jax.Arrays here, so no
result depends on how devices are numbered or spread over processes: a process provides
exactly the rows its own devices hold (the same rows on several processes when the batch is
replicated over a 'model' axis that spans them), and ``make_array_from_callback`` places them.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from big_contrast import sharding


def _rows_by_process(mesh, batch_size: int) -> dict[int, np.ndarray]:
    """{process index: sorted global rows that process's devices hold}, for every process."""
    indices = sharding.batch_sharding(mesh).devices_indices_map((batch_size,))
    rows: dict[int, set] = {}
    for device, index in indices.items():
        rows.setdefault(device.process_index, set()).update(
            range(*index[0].indices(batch_size)))
    return {p: np.array(sorted(r), np.int64) for p, r in sorted(rows.items())}


@dataclasses.dataclass(frozen=True)
class BatchFeed:
    """How this process feeds global batches of ``batch_size`` rows on ``mesh``.

    ``rows``: the global rows this process provides, sorted; ``layout``: every process's rows
    (what a checkpoint records so that a restore on another topology can tell it changed).
    """

    mesh: jax.sharding.Mesh
    batch_size: int
    rows: np.ndarray
    layout: tuple[tuple[int, ...], ...]

    @classmethod
    def for_mesh(cls, mesh, batch_size: int) -> "BatchFeed":
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        if batch_size % shards:
            raise ValueError(f"batch_size {batch_size} does not divide over the {shards} batch "
                             f"shards of the mesh (mesh.data x mesh.fsdp = {shards})")
        by_process = _rows_by_process(mesh, batch_size)
        mine = by_process.get(jax.process_index())
        if mine is None:
            raise ValueError(f"no device of process {jax.process_index()} is in the mesh")
        return cls(mesh, batch_size, mine, tuple(tuple(map(int, r)) for r in by_process.values()))

    @property
    def local_size(self) -> int:
        return len(self.rows)

    def local_rows(self, global_rows: np.ndarray) -> np.ndarray:
        """This process's share of an array holding all ``batch_size`` rows."""
        return global_rows[self.rows]

    def to_global(self, local: dict) -> dict:
        """{name: [local_size, ...] numpy, rows in ``self.rows`` order} -> global jax.Arrays
        split over the mesh's batch axes."""
        batch_sharding = sharding.batch_sharding(self.mesh)

        def build(values: np.ndarray) -> jax.Array:
            values = np.asarray(values)
            if len(values) != self.local_size:
                raise ValueError(f"this process feeds {self.local_size} rows, got {len(values)}")

            def rows_of(index):
                start, stop, _ = index[0].indices(self.batch_size)
                first = int(np.searchsorted(self.rows, start))
                return values[first:first + stop - start]

            return jax.make_array_from_callback((self.batch_size, *values.shape[1:]),
                                                batch_sharding, rows_of)

        return {name: build(values) for name, values in local.items()}

"""Where each process reads in the global example stream, and how a saved position carries
over to another process layout.

The global stream is the seeded, shuffled, repeated sequence of records; a record's place in
it seeds its augmentation, whoever reads it. Global batch b takes stream places
b * batch_size + row, and a process reads the places of its own rows (feeding.BatchFeed.rows):
its *share* of the stream, in order. A corrupt record is skipped and counted, and that process
fills the row from the next place of its share, so a process that skipped records reads a
little ahead of the others; its position is how many places of its share it has consumed.

Resuming on the same layout continues every share exactly. On another layout (a different
mesh or number of processes) the shares change, so the stream is re-based: the places some
process had consumed ahead of the others are left out and the places below them that no
process had reached yet come first. No record is read twice or left out; when no record had
been skipped this is the very order an uninterrupted run on the new layout would read.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class StreamPosition:
    """The rest of the global stream: the places ``pending`` first, then every place from
    ``start`` on. A fresh run starts at ((), 0)."""

    pending: tuple[int, ...] = ()
    start: int = 0

    def place(self, index: int) -> int:
        """The global stream place of the ``index``-th element of the rest of the stream."""
        if index < len(self.pending):
            return self.pending[index]
        return self.start + index - len(self.pending)

    def to_json(self) -> dict:
        return {"pending": list(self.pending), "start": self.start}

    @classmethod
    def from_json(cls, value: dict) -> "StreamPosition":
        return cls(tuple(int(p) for p in value["pending"]), int(value["start"]))


def share_index(rows: np.ndarray, batch_size: int, j: int) -> int:
    """The index (into the rest of the stream) of the j-th element of a process's share."""
    batch, k = divmod(j, len(rows))
    return batch * batch_size + int(rows[k])


def rebase(position: StreamPosition, layout, consumed, batch_size: int) -> StreamPosition:
    """The stream left after process p of ``layout`` (its rows) consumed the first
    ``consumed[p]`` elements of its share of ``position``."""
    complete = min(k // len(rows) for rows, k in zip(layout, consumed))
    floor = complete * batch_size  # every index below was consumed by its row's process
    taken = set()
    for rows, k in zip(layout, consumed):
        rows = np.asarray(rows)
        taken.update(share_index(rows, batch_size, j) for j in range(complete * len(rows), k))
    end = max(taken, default=floor - 1) + 1
    gaps = [position.place(i) for i in range(floor, end) if i not in taken]
    rest_of_pending = list(position.pending[end:])
    start = position.start + max(0, end - len(position.pending))
    return StreamPosition(tuple(gaps + rest_of_pending), start)

"""The training input pipeline: a grain dataset graph feeding global jax.Array batches.

  source -> seeded global shuffle (reshuffled each epoch) -> repeat -> this process's shard
  -> decode + augment + tokenize (random_map, deterministic per element)
  -> skip-and-count corrupt records -> batch (this process's slice of the global batch)
  -> worker processes (mp_prefetch) -> background thread: make_array_from_process_local_data

The iterator state recorded after each delivered batch is what checkpoints store, so a
resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import logging
import queue
import threading

import grain
import numpy as np
from absl import flags as absl_flags

from big_contrast import sharding
from big_contrast.data import sources, transforms
from big_contrast.data.spec import BatchSpec

log = logging.getLogger(__name__)

SKIPPED_KEY = "_skipped"  # per-example count of corrupt records skipped just before it
_MAX_CONSECUTIVE_CORRUPT = 1000


class _SkipCorruptIterator(grain.DatasetIterator):
    def __init__(self, parent):
        super().__init__(parent)

    def __next__(self):
        skipped = 0
        while True:
            element = next(self._parent)
            if element is not None:
                element[SKIPPED_KEY] = np.int32(skipped)
                return element
            skipped += 1
            if skipped >= _MAX_CONSECUTIVE_CORRUPT:
                raise RuntimeError(f"{skipped} consecutive records could not be decoded; "
                                   "check the data paths (warnings above name the files)")

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


class SkipCorrupt(grain.IterDataset):
    """Drops the None elements that stand for corrupt records, counting them in SKIPPED_KEY."""

    def __iter__(self):
        return _SkipCorruptIterator(self._parent.__iter__())


def train_dataset(data_config, spec: BatchSpec, tokenizer, local_batch_size: int,
                  seed: int) -> grain.IterDataset:
    """This process's stream of training batches (numpy dicts), before device transfer."""
    source = sources.build_source(data_config, data_config.train_split)
    ds = grain.MapDataset.source(source).seed(seed)
    if data_config.shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(None)
    shard = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    ds = ds[shard.shard_index::shard.shard_count]
    ds = ds.random_map(transforms.TrainPreprocess(spec, tokenizer))
    read = grain.ReadOptions(num_threads=data_config.read_threads,
                             prefetch_buffer_size=max(2 * local_batch_size, 16))
    ds = SkipCorrupt(ds.to_iter_dataset(read, allow_nones=True))
    ds = ds.batch(local_batch_size, drop_remainder=True)
    if data_config.num_workers > 0:
        # grain 0.2.18 workers read an absl flag and fail if flags were never parsed, as in
        # scripts and notebooks that do not run under absl.app (google/grain#1355).
        if not absl_flags.FLAGS.is_parsed():
            absl_flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=data_config.num_workers,
            per_worker_buffer_size=data_config.worker_buffer_size))
    return ds


class IteratorState:
    """A frozen snapshot of a data iterator's state, savable by grain's orbax handler."""

    def __init__(self, state: bytes):
        self._state = state

    def get_state(self) -> bytes:
        return self._state


class DeviceIterator:
    """Prefetches global batches on a background thread and tracks the exact data position.

    ``next()`` returns (batch of global jax.Arrays, corrupt records skipped for it).
    ``get_state()`` is the grain state right after the last batch ``next()`` returned, not after
    whatever the thread has prefetched. ``set_state`` must come before ``start_prefetch``
    (grain's CheckpointRestore calls both, in that order).
    """

    def __init__(self, dataset: grain.IterDataset, mesh, prefetch: int = 2):
        self._iterator = iter(dataset)
        self._mesh = mesh
        self._queue: queue.Queue = queue.Queue(maxsize=max(prefetch, 1))
        self._state = self._encode(self._iterator.get_state())
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @staticmethod
    def _encode(state) -> bytes:
        return json.dumps(state).encode()

    def get_state(self) -> bytes:
        return self._state

    def snapshot(self) -> IteratorState:
        return IteratorState(self._state)

    def set_state(self, state: bytes) -> None:
        if self._thread is not None:
            raise RuntimeError("set_state after prefetching started would lose batches")
        self._iterator.set_state(json.loads(state))
        self._state = state

    def start_prefetch(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._produce, daemon=True, name="device-prefetch")
            self._thread.start()

    def _produce(self):
        try:
            while not self._stop.is_set():
                host_batch = next(self._iterator)
                skipped = int(np.sum(host_batch.pop(SKIPPED_KEY)))
                state = self._encode(self._iterator.get_state())
                batch = sharding.to_global_batch(host_batch, self._mesh)
                self._put((batch, skipped, state))
        except BaseException as e:  # hand errors (and StopIteration) to the consumer
            self._put(e)

    def _put(self, item):
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self):
        return self

    def __next__(self):
        self.start_prefetch()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        batch, skipped, self._state = item
        return batch, skipped

    def close(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

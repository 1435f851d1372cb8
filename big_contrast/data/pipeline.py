"""The training input pipeline: a grain dataset graph feeding global jax.Array batches.

  source -> seeded global shuffle (reshuffled each epoch) -> repeat
     (or several such sources mixed by weight and shuffled in windows: mixture.py)
  -> decode + augment + tokenize (random_map seeded by the example's position in the global
     stream, before any slicing) -> this process's slice -> from the saved position on
  -> worker processes (mp_prefetch, optional)
  -> background thread: skip and count corrupt records, batch, make_array_from_process_local_data

A checkpoint stores the position: how many examples this process has read from its slice (kept
or skipped) and the skip counts by reason. A resumed run rebuilds the graph from that position,
so it sees exactly the batches an uninterrupted run would have seen, whatever the number of
worker processes. Workers only decode; batches are assembled in order in the main process.
"""

from __future__ import annotations

import collections
import json
import logging
import queue
import signal
import threading

import grain
import jax
import numpy as np
from absl import flags as absl_flags

from big_contrast import sharding
from big_contrast.config import ConfigError
from big_contrast.data import mixture, transforms
from big_contrast.data.spec import BatchSpec

log = logging.getLogger(__name__)

STATE_FORMAT = 1
_WARN_FIRST = 10  # corrupt records named one by one in the log; later ones are only counted
_MIN_RECORDS_FOR_LIMIT = 1000


class CorruptDataError(RuntimeError):
    """Too large a fraction of the records read was corrupt to keep training on the rest."""


def example_stream(source, data_config, spec: BatchSpec, tokenizer, seed: int,
                   start: int = 0) -> grain.IterDataset:
    """This process's preprocessed examples (corrupt records as markers), from ``start`` on.
    ``source``: a source or a mixture.Mixture."""
    ds = mixture.records(source, seed, data_config.shuffle)
    ds = ds.random_map(transforms.TrainPreprocess(spec, tokenizer, data_config.max_image_pixels))
    shard = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    ds = ds[shard.shard_index::shard.shard_count][start:]
    read = grain.ReadOptions(num_threads=data_config.read_threads,
                             prefetch_buffer_size=max(data_config.read_threads * 8, 16))
    stream = ds.to_iter_dataset(read)
    if data_config.num_workers > 0:
        # grain 0.2.18 workers read an absl flag and fail if flags were never parsed, as in
        # scripts and notebooks that do not run under absl.app (google/grain#1355).
        if not absl_flags.FLAGS.is_parsed():
            absl_flags.FLAGS.mark_as_parsed()
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=data_config.num_workers,
            per_worker_buffer_size=max(data_config.worker_buffer_size * 16, 16)),
            worker_init_fn=_ignore_ctrl_c)
    return stream


def _ignore_ctrl_c(worker_index: int, worker_count: int) -> None:
    """Workers leave Ctrl-C (sent to the whole terminal process group) to the main process,
    which saves a checkpoint and stops them."""
    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class IteratorState:
    """A frozen snapshot of the data position, savable by grain's orbax handler."""

    def __init__(self, state: bytes):
        self._state = state

    def get_state(self) -> bytes:
        return self._state


class TrainBatches:
    """This process's share of each global training batch, prefetched on a background thread.

    ``next()`` returns a dict of global jax.Arrays. ``read`` (examples read, kept or skipped)
    and ``skipped`` (counts by reason) describe the stream up to the last batch ``next()``
    returned, not whatever the thread has prefetched; ``get_state``/``set_state`` save and
    restore them (``set_state`` must come before the first ``next()``; grain's
    CheckpointRestore calls it). A corrupt fraction above ``data.max_corrupt_fraction`` stops
    the stream with CorruptDataError.
    """

    def __init__(self, data_config, spec: BatchSpec, tokenizer, local_batch_size: int, seed: int,
                 mesh):
        try:
            self._source = mixture.build_train_source(data_config, captions=spec.text,
                                                      seed=seed)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"data (training split {data_config.train_split!r}): {e}") from None
        self._config = data_config
        self._spec, self._tokenizer, self._seed = spec, tokenizer, seed
        self._batch_size = local_batch_size
        self._mesh = mesh
        self._max_fraction = data_config.max_corrupt_fraction
        size = mixture.num_examples(self._source)
        per_process = None if size is None else -(-size // jax.process_count())
        self._min_records = min(_MIN_RECORDS_FOR_LIMIT, per_process or _MIN_RECORDS_FOR_LIMIT)
        self.read = 0
        self.skipped: dict[str, int] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=max(data_config.prefetch, 1))
        self._thread: threading.Thread | None = None
        self._stream = None
        self._stop = threading.Event()

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    # ------------------------------------------------------------------ position (checkpoints)

    def get_state(self) -> bytes:
        return json.dumps({"format": STATE_FORMAT, "read": self.read,
                           "skipped": self.skipped}).encode()

    def snapshot(self) -> IteratorState:
        return IteratorState(self.get_state())

    def set_state(self, state: bytes) -> None:
        if self._thread is not None:
            raise RuntimeError("set_state after prefetching started would lose batches")
        decoded = json.loads(state)
        if not isinstance(decoded, dict) or decoded.get("format") != STATE_FORMAT:
            raise ValueError(f"data position in an unknown format (expected format "
                             f"{STATE_FORMAT}): {str(decoded)[:200]}")
        self.read, self.skipped = int(decoded["read"]), dict(decoded["skipped"])

    # ------------------------------------------------------------------ the prefetch thread

    def start_prefetch(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._produce, daemon=True,
                                            name="train-batches")
            self._thread.start()

    def _check_fraction(self, read: int, skipped: collections.Counter) -> None:
        total = sum(skipped.values())
        if read >= self._min_records and total > self._max_fraction * read:
            counts = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items()))
            raise CorruptDataError(
                f"{total} of the {read} records read ({total / read:.0%}) were corrupt and "
                f"skipped ({counts}), more than data.max_corrupt_fraction="
                f"{self._max_fraction:g}; fix the data (the log names the first files) or "
                "raise the limit")

    def _produce(self):
        try:
            self._stream = stream = iter(example_stream(self._source, self._config, self._spec,
                                                        self._tokenizer, self._seed, self.read))
            read, skipped, warned = self.read, collections.Counter(self.skipped), 0
            while not self._stop.is_set():
                examples = []
                while len(examples) < self._batch_size:
                    element = next(stream)
                    read += 1
                    if transforms.CORRUPT_KEY in element:
                        skipped[element[transforms.CORRUPT_KEY]] += 1
                        if warned < _WARN_FIRST:
                            warned += 1
                            log.warning("skipping corrupt record (%s): %s%s",
                                        element[transforms.CORRUPT_KEY],
                                        element[transforms.DETAIL_KEY],
                                        "; later ones are only counted" if warned == _WARN_FIRST
                                        else "")
                        self._check_fraction(read, skipped)
                        continue
                    examples.append(element)
                self._check_fraction(read, skipped)
                host_batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
                batch = sharding.to_global_batch(host_batch, self._mesh)
                self._put((batch, read, dict(skipped)))
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

    def __next__(self) -> dict:
        self.start_prefetch()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        batch, self.read, self.skipped = item
        return batch

    def close(self):
        """Stops the prefetch thread and the grain iterator (and its worker processes)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._stream is not None and hasattr(self._stream, "close"):
            self._stream.close()

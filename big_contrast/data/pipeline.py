"""The training input pipeline: a grain dataset graph feeding global jax.Array batches.

  source -> seeded global shuffle (reshuffled each epoch) -> repeat
     (or several such sources mixed by weight and shuffled in windows: mixture.py)
  -> decode + augment + tokenize (random_map seeded by the example's place in the global
     stream, before any slicing) -> this process's share: the places of the rows its devices
     hold (feeding.py, position.py) -> from the saved position on
  -> worker processes (mp_prefetch, optional)
  -> background thread: skip and count corrupt records, batch, make_array_from_callback

A checkpoint stores the position of every process: how many places of its share it has read
(kept or skipped) and its skip counts by reason. A resumed run rebuilds the graph from there,
so it sees exactly the batches an uninterrupted run would have seen, whatever the number of
worker processes; on another process layout the position is re-based (position.py). Workers
only decode; batches are assembled in order in the main process.
"""

from __future__ import annotations

import collections
import logging
import queue
import signal
import sys
import threading

import grain
import numpy as np
from absl import flags as absl_flags

from big_contrast import distributed, feeding
from big_contrast.config import ConfigError
from big_contrast.data import mixture, transforms
from big_contrast.data.position import StreamPosition, rebase, share_index
from big_contrast.data.spec import BatchSpec

log = logging.getLogger(__name__)

STATE_FORMAT = 2
_WARN_FIRST = 10  # corrupt records named one by one in the log; later ones are only counted
_MIN_RECORDS_FOR_LIMIT = 1000


class CorruptDataError(RuntimeError):
    """Too large a fraction of the records read was corrupt to keep training on the rest."""


class _Share(grain.MapDataset):
    """One process's share of the rest of the global stream (position.py): element j is the
    stream place of row rows[j % len(rows)] of global batch j // len(rows)."""

    def __init__(self, parent: grain.MapDataset, rows, batch_size: int,
                 position: StreamPosition):
        super().__init__(parent)
        self._rows = np.asarray(rows, np.int64)
        self._batch_size = batch_size
        self._position = position

    def __len__(self) -> int:
        return sys.maxsize  # the stream repeats

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._position.place(share_index(self._rows, self._batch_size, index))]

    def __str__(self) -> str:
        return f"_Share(rows={len(self._rows)} of {self._batch_size})"


def example_stream(source, data_config, spec: BatchSpec, tokenizer, seed: int,
                   start: int = 0, share: tuple | None = None) -> grain.IterDataset:
    """Preprocessed examples (corrupt records as markers) from ``start`` on: of the whole
    global stream, or with ``share`` = (rows, batch_size, StreamPosition) of one process's
    share. ``source``: a source or a mixture.Mixture."""
    ds = mixture.records(source, seed, data_config.shuffle)
    ds = ds.random_map(transforms.TrainPreprocess(spec, tokenizer, data_config.max_image_pixels))
    if share is not None:
        ds = _Share(ds, *share)
    ds = ds[start:]
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


class TrainBatches:
    """This process's rows of each global training batch, prefetched on a background thread.

    ``next()`` returns a dict of global jax.Arrays. ``read`` (places of this process's share
    read, kept or skipped) and ``skipped`` (counts by reason) describe the stream up to the
    last batch ``next()`` returned, not whatever the thread has prefetched. ``get_state`` /
    ``set_state`` save and restore the position of every process (both are collective in a
    multi-process run; ``set_state`` must come before the first ``next()``). A corrupt
    fraction above ``data.max_corrupt_fraction`` stops the stream with CorruptDataError.
    """

    def __init__(self, data_config, spec: BatchSpec, tokenizer, batch_size: int, seed: int,
                 mesh):
        try:
            self._source = mixture.build_train_source(data_config, captions=spec.text,
                                                      seed=seed)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"data (training split {data_config.train_split!r}): {e}") from None
        self._config = data_config
        self._spec, self._tokenizer, self._seed = spec, tokenizer, seed
        try:
            self._feed = feeding.BatchFeed.for_mesh(mesh, batch_size)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self._max_fraction = data_config.max_corrupt_fraction
        size = mixture.num_examples(self._source)
        share = None if size is None else -(-size * self._feed.local_size // batch_size)
        self._min_records = min(_MIN_RECORDS_FOR_LIMIT, share or _MIN_RECORDS_FOR_LIMIT)
        self._position = StreamPosition()
        self.read = 0
        self.skipped: dict[str, int] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=max(data_config.prefetch, 1))
        self._thread: threading.Thread | None = None
        self._stream = None
        self._stop = threading.Event()

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def skipped_everywhere(self) -> dict[str, int]:
        """Skip counts by reason summed over all processes (collective)."""
        total: collections.Counter = collections.Counter()
        for counts in distributed.allgather_json(self.skipped):
            total.update(counts)
        return dict(total)

    # ------------------------------------------------------------------ position (checkpoints)

    def get_state(self) -> dict:
        """The position of every process, as JSON (collective in a multi-process run)."""
        mine = {"read": self.read, "skipped": self.skipped}
        return {"format": STATE_FORMAT, "batch_size": self._feed.batch_size,
                "layout": [list(rows) for rows in self._feed.layout],
                "position": self._position.to_json(),
                "processes": distributed.allgather_json(mine)}

    def set_state(self, state: dict) -> None:
        """Continues from ``state`` (get_state's): exactly on the same process layout, else
        from the re-based stream (position.py) with the skip counts kept in process 0's."""
        if self._thread is not None:
            raise RuntimeError("set_state after prefetching started would lose batches")
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"data position in an unknown format (expected format "
                             f"{STATE_FORMAT}): {str(state)[:200]}")
        position = StreamPosition.from_json(state["position"])
        layout = [tuple(rows) for rows in state["layout"]]
        processes = state["processes"]
        if state["batch_size"] == self._feed.batch_size and layout == list(self._feed.layout):
            mine = processes[distributed.process_index()]
            self._position, self.read, self.skipped = position, int(mine["read"]), dict(mine["skipped"])
            return
        self._position = rebase(position, layout, [int(p["read"]) for p in processes],
                                int(state["batch_size"]))
        self.read, self.skipped = 0, {}
        if distributed.process_index() == 0:
            total: collections.Counter = collections.Counter()
            for counts in processes:
                total.update(counts["skipped"])
            self.skipped = dict(total)
        log.warning("the data position was saved on another process layout (%d process(es)); "
                    "the stream continues re-based: no record is repeated or left out",
                    len(layout))

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
            share = (self._feed.rows, self._feed.batch_size, self._position)
            self._stream = stream = iter(example_stream(self._source, self._config, self._spec,
                                                        self._tokenizer, self._seed, self.read,
                                                        share))
            read, skipped, warned = self.read, collections.Counter(self.skipped), 0
            while not self._stop.is_set():
                examples = []
                while len(examples) < self._feed.local_size:
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
                batch = self._feed.to_global(host_batch)
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

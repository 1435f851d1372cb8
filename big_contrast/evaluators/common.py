"""What evaluators share: a fixed evaluation set loaded once through grain, and embedding
functions jitted once per model and reused by every evaluator and every evaluation round."""

from __future__ import annotations

import itertools
import logging
from typing import Any, Callable

import grain
import jax
import numpy as np

from big_contrast import feeding, sharding
from big_contrast.config import ConfigError, closest_suggestion
from big_contrast.data import sources, transforms

log = logging.getLogger(__name__)


class _FieldsEqual(grain.transforms.Filter):
    """Keeps records whose label fields equal the given values, e.g. {'num_objects': 1}, and
    corrupt records (the preprocessing skips and logs those)."""

    def __init__(self, where: dict):
        self.where = dict(where)

    def filter(self, record) -> bool:
        return "corrupt" in record or all(int(record[k]) == v for k, v in self.where.items())


# Sources that read files: an evaluator that switches to one of them needs its own path.
_NEEDS_PATH = ("manifest", "image_folder", "array_record")


def override_data(data_config, name: str, **options):
    """``data_config`` with an evaluator's own dataset options (those not None: source, path,
    image_key, caption_key) in place of the training data's, so it can read another dataset."""
    given = {key: value for key, value in options.items() if value is not None}
    if not given:
        return data_config
    kind = given.get("source", data_config.source)
    if kind not in sources.SOURCES:
        raise ConfigError(f"evals.{name}.source is {kind!r}"
                          f"{closest_suggestion(str(kind), sources.SOURCES)}; "
                          f"sources: {', '.join(sources.SOURCES)}")
    if kind != data_config.source and kind in _NEEDS_PATH and "path" not in given:
        raise ConfigError(f"evals.{name}.path is not set: a {kind!r} source needs the path of "
                          "its files (data.path is the training data's)")
    config = data_config.copy_and_resolve_references()
    config.update(given)
    return config


def sample_record(source, tries: int = 100):
    """The first readable record among the first ``tries``, or None."""
    for index in range(min(len(source), tries)):
        record = source[index]
        if "corrupt" not in record:
            return record
    return None


def load_examples(source, image_size: int, num_examples: int, tokenizer=None,
                  labels: tuple[str, ...] = (), where: dict | None = None,
                  max_pixels: int = transforms.DEFAULT_MAX_PIXELS,
                  keep_caption: bool = False) -> dict:
    """``num_examples`` decodable records of a source (after the ``where`` filter), preprocessed
    for evaluation and stacked into numpy arrays. A finite source with more records gives a
    fixed random subset, not its first records (which may all be of the first classes)."""
    sample = sample_record(source)
    needed = [*labels, *(where or {}), *(["caption"] if tokenizer is not None else [])]
    missing = sorted({k for k in needed if sample is not None and k not in sample})
    if missing:
        raise ValueError(f"records of {source!r} have no field(s) {missing}; their fields are "
                         f"{sorted(sample)}")
    ds = grain.MapDataset.source(source)
    if sources.num_examples(source) is not None and len(source) > num_examples:
        ds = ds.shuffle(seed=0)
    if where:
        ds = ds.filter(_FieldsEqual(where))
    ds = ds.map(transforms.EvalPreprocess(image_size, tokenizer, labels, max_pixels, keep_caption))
    examples = list(itertools.islice(ds.to_iter_dataset(), num_examples))
    if not examples:
        raise ValueError(f"{source!r} has no usable examples")
    if len(examples) < num_examples:
        log.warning("%r has only %d usable examples (asked for %d)", source, len(examples),
                    num_examples)
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class Embedder:
    """Batched, sharded image/text embedding (and caption scoring, for captioning objectives)
    with one compilation per input shape.

    ``initial_weights``, if given, returns the (params, model_state) of the network at its
    random initialisation (the trainer's ``StateFactory.initial_weights``): evaluators that
    report a random-initialisation baseline (knn, linear_probe) call it once and cache their
    result; without it they omit that baseline.
    """

    def __init__(self, objective, mesh, batch_size: int,
                 initial_weights: Callable[[], tuple[Any, Any]] | None = None, rules=()):
        self.initial_weights = initial_weights
        self.rules = rules
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        self.batch_size = -(-batch_size // shards) * shards  # round up to divide the mesh
        self.feed = feeding.BatchFeed.for_mesh(mesh, self.batch_size)
        self.objective = objective
        self.replicated = sharding.replicated(mesh)
        self._images = self.jit(objective.embed_images)
        self._texts = self.jit(objective.embed_texts)
        self._scores = None  # compiled on first use: only captioning objectives score captions

    def jit(self, fn):
        """fn(params, model_state, batch, ...) compiled under the logical-axis rules with a
        replicated output, for map_batches."""
        return jax.jit(sharding.under_rules(fn, self.rules), out_shardings=self.replicated)

    def map_batches(self, fn, params, model_state, inputs: np.ndarray, *shared) -> np.ndarray:
        """fn(params, model_state, batch, *shared) over fixed-size, mesh-sharded batches of
        ``inputs``; ``shared`` arrays go to every batch whole. Returns the outputs as numpy."""
        n = len(inputs)
        outputs = []
        for start in range(0, n, self.batch_size):
            chunk = inputs[start:start + self.batch_size]
            pad = self.batch_size - len(chunk)
            if pad:  # fixed shapes: pad the last chunk, drop the padding afterwards
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            batch = self.feed.to_global({"x": self.feed.local_rows(chunk)})["x"]
            # Replicated output: every process can read the whole batch's embeddings.
            outputs.append(np.asarray(fn(params, model_state, batch, *shared))[: self.batch_size - pad])
        return np.concatenate(outputs)

    def images(self, params, model_state, images: np.ndarray) -> np.ndarray:
        return self.map_batches(self._images, params, model_state, images).astype(np.float32)

    def texts(self, params, model_state, tokens: np.ndarray) -> np.ndarray:
        return self.map_batches(self._texts, params, model_state, tokens).astype(np.float32)

    def caption_scores(self, params, model_state, images: np.ndarray,
                       tokens: np.ndarray) -> np.ndarray:
        """[N, K] log-likelihood of each of K tokenised captions given each image."""
        if self._scores is None:
            self._scores = self.jit(self.objective.score_captions)
        return self.map_batches(self._scores, params, model_state, images, tokens)

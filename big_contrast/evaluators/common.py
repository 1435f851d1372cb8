"""What evaluators share: a fixed evaluation set loaded once through grain, and embedding
functions jitted once per model and reused by every evaluator and every evaluation round."""

from __future__ import annotations

import itertools
import logging

import grain
import jax
import numpy as np

from big_contrast import sharding
from big_contrast.data import sources, transforms

log = logging.getLogger(__name__)


class _FieldsEqual(grain.transforms.Filter):
    """Keeps records whose label fields equal the given values, e.g. {'num_objects': 1}."""

    def __init__(self, where: dict):
        self.where = dict(where)

    def filter(self, record) -> bool:
        return all(int(record[k]) == v for k, v in self.where.items())


def load_examples(data_config, split: str, num_examples: int, tokenizer=None,
                  labels: tuple[str, ...] = (), where: dict | None = None):
    """The first ``num_examples`` decodable records of a split (after the ``where`` filter),
    preprocessed for evaluation and stacked into numpy arrays. Returns (arrays, source)."""
    source = sources.build_source(data_config, split)
    ds = grain.MapDataset.source(source)
    if where:
        missing = set(where) - set(source[0])
        if missing:
            raise ValueError(f"eval filter fields {sorted(missing)} are not in {split!r} records")
        ds = ds.filter(_FieldsEqual(where))
    ds = ds.map(transforms.EvalPreprocess(data_config.image_size, tokenizer, labels))
    examples = list(itertools.islice(ds.to_iter_dataset(), num_examples))
    if not examples:
        raise ValueError(f"split {split!r} of {source!r} has no usable examples")
    if len(examples) < num_examples:
        log.warning("split %r has only %d usable examples (asked for %d)", split,
                    len(examples), num_examples)
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}, source


class Embedder:
    """Batched, sharded image/text embedding with one compilation per input shape."""

    def __init__(self, objective, mesh, batch_size: int):
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        self.batch_size = -(-batch_size // shards) * shards  # round up to divide the mesh
        self.mesh = mesh
        out = sharding.replicated(mesh)
        self._images = jax.jit(objective.embed_images, out_shardings=out)
        self._texts = jax.jit(objective.embed_texts, out_shardings=out)

    def _run(self, fn, params, model_state, inputs: np.ndarray) -> np.ndarray:
        n = len(inputs)
        per_process = self.batch_size // jax.process_count()
        outputs = []
        for start in range(0, n, self.batch_size):
            chunk = inputs[start:start + self.batch_size]
            pad = self.batch_size - len(chunk)
            if pad:  # fixed shapes: pad the last chunk, drop the padding afterwards
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            local = chunk[jax.process_index() * per_process:(jax.process_index() + 1) * per_process]
            batch = sharding.to_global_batch({"x": local}, self.mesh)["x"]
            # Replicated output: every process can read the whole batch's embeddings.
            outputs.append(np.asarray(fn(params, model_state, batch))[: self.batch_size - pad])
        return np.concatenate(outputs).astype(np.float32)

    def images(self, params, model_state, images: np.ndarray) -> np.ndarray:
        return self._run(self._images, params, model_state, images)

    def texts(self, params, model_state, tokens: np.ndarray) -> np.ndarray:
        return self._run(self._texts, params, model_state, tokens)

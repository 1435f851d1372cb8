"""Weighted k-nearest-neighbour classification of frozen image embeddings (the InstDisc
monitor): a labelled bank of embeddings votes for the class of each query image.

Works with any objective that embeds images (``embed_images``: CLIP's image tower, SwAV's or
SimCLR's backbone features), L2-normalised, so a dot product is the cosine similarity.

Also home to what the kNN and linear-probe evaluators share: loading labelled evaluation sets
with one class numbering, checking their options, and the metric names.
"""

from __future__ import annotations

import numpy as np

from big_contrast.config import ConfigError
from big_contrast.data import sources
from big_contrast.evaluators import common

# Similarities held at once: queries are processed in chunks of about this many bank entries.
_MAX_SIMILARITIES = 1 << 24  # 64 MiB of float32


def metric_key(split: str, metric: str) -> str:
    """The name a per-split metric is reported under: '<split>/<metric>'."""
    return f"{split}/{metric}"


def weighted_knn_votes(query: np.ndarray, bank: np.ndarray, bank_labels: np.ndarray,
                       num_classes: int, k: int = 200, temperature: float = 0.07,
                       max_similarities: int = _MAX_SIMILARITIES) -> np.ndarray:
    """[Q, num_classes] summed votes: each query's k most cosine-similar bank entries vote for
    their class with weight exp(similarity / temperature).

    query [Q, D] and bank [N, D] are L2-normalised embeddings; bank_labels [N] are class indices
    in [0, num_classes). Votes are computed in float32 with each query's largest similarity
    subtracted before exp (exp(1/0.07) ~ 1.6e6 is past float16, and smaller temperatures
    overflow float32 too); that scales a query's votes by one positive factor, so the
    ranking of classes is exp(s/temperature)'s exactly. k is capped at the bank size. Queries
    are processed in chunks holding at most ``max_similarities`` similarities.
    """
    query = np.asarray(query, np.float32)
    bank = np.asarray(bank, np.float32)
    bank_labels = np.asarray(bank_labels).astype(np.int64)
    if bank.ndim != 2 or query.ndim != 2 or query.shape[1] != bank.shape[1]:
        raise ValueError(f"query {query.shape} and bank {bank.shape} must be [Q, D] and [N, D]")
    if bank_labels.shape != (len(bank),):
        raise ValueError(f"bank_labels must have shape ({len(bank)},), got {bank_labels.shape}")
    if len(bank) == 0:
        raise ValueError("the bank is empty")
    if bank_labels.min() < 0 or bank_labels.max() >= num_classes:
        raise ValueError(f"bank labels run from {bank_labels.min()} to {bank_labels.max()}, "
                         f"outside 0..{num_classes - 1}")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, "
                         f"temperature={temperature}")
    k = min(int(k), len(bank))
    chunk = max(1, max_similarities // len(bank))
    votes = np.zeros((len(query), num_classes), np.float32)
    for start in range(0, len(query), chunk):
        similarity = query[start:start + chunk] @ bank.T  # [q, N]
        rows = np.arange(len(similarity))[:, None]
        if k < len(bank):
            nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]  # unordered top k
        else:
            nearest = np.broadcast_to(np.arange(len(bank)), similarity.shape)
        top = similarity[rows, nearest]  # [q, k]
        weights = np.exp((top - top.max(axis=1, keepdims=True)) / np.float32(temperature))
        cells = (rows * num_classes + bank_labels[nearest]).ravel()
        votes[start:start + len(similarity)] = np.bincount(
            cells, weights=weights.ravel(), minlength=len(similarity) * num_classes
        ).reshape(len(similarity), num_classes)
    return votes


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Fraction of rows whose label is among their k highest scores (ties: lower index first)."""
    order = np.argsort(-np.asarray(scores), axis=1, kind="stable")[:, :k]
    return float(np.mean((order == np.asarray(labels)[:, None]).any(axis=1)))


# --- Shared by the kNN and linear-probe evaluators ------------------------------------------

def check_splits(name: str, option: str, splits) -> tuple[str, ...]:
    """A split option (one name or a list of them) as a non-empty tuple of names."""
    splits = (splits,) if isinstance(splits, str) else tuple(splits or ())
    if not splits or not all(isinstance(s, str) and s for s in splits):
        raise ConfigError(f"evals.{name}.{option} must name at least one split, got {splits!r}")
    if len(set(splits)) != len(splits):
        raise ConfigError(f"evals.{name}.{option} names a split twice: {splits!r}")
    return splits


def check_split(name: str, option: str, split) -> str:
    if not isinstance(split, str) or not split:
        raise ConfigError(f"evals.{name}.{option} must name one split, got {split!r}")
    return split


def check_at_least(name: str, option: str, value, minimum) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise ConfigError(f"evals.{name}.{option} must be a number >= {minimum}, got {value!r}")


def check_where(name: str, where) -> dict | None:
    if where is None:
        return None
    if not isinstance(where, dict) or not all(isinstance(k, str) for k in where):
        raise ConfigError(f"evals.{name}.where must map record fields to values, e.g. "
                          f"{{'num_objects': 1}}, got {where!r}")
    return dict(where)


def check_disjoint(name: str, data_config, reference: tuple[str, str], splits) -> None:
    """The reference split (the kNN bank, the probe's training set) must not be an evaluated
    split, nor read the same file as one: evaluated examples would be among the reference's."""
    option, ref = reference
    for split in splits:
        if split == ref:
            raise ConfigError(f"evals.{name}.splits includes {option} {ref!r}: its examples "
                              f"would be evaluated against themselves")
        if data_config.source in common._NEEDS_PATH and "{split}" not in data_config.path:
            raise ConfigError(f"evals.{name}: {option} {ref!r} and split {split!r} both read "
                              f"{data_config.path!r}; put '{{split}}' in the path to read "
                              "each split's own files")


def load_labelled_sets(data_config, sets: dict, label_key: str, where: dict | None):
    """{key: (images, labels)} for sets {key: (split, num_examples)}, and the number of classes.

    Labels are class indices numbered alike in every set: where the sources name their classes
    (an image folder or a manifest of named labels names only the classes it holds), each
    set's labels are mapped through the names to one numbering, in order of first appearance.
    """
    loaded, names = {}, {}
    for key, (split, num_examples) in sets.items():
        dataset = sources.build_source(data_config, split, captions=False, label_key=label_key)
        data = common.load_examples(dataset, data_config.image_size, num_examples,
                                    labels=(label_key,), where=where,
                                    max_pixels=data_config.max_image_pixels)
        labels = data[label_key].astype(np.int64)
        if labels.min() < 0:
            raise ValueError(f"{dataset!r} has negative {label_key!r} labels; class indices "
                             "start at 0")
        loaded[key] = (data["image"], labels)
        names[key] = sources.class_names(dataset, label_key)
    if all(n is not None for n in names.values()):
        classes: dict[str, int] = {}
        for key, (images, labels) in loaded.items():
            if labels.max() >= len(names[key]):
                raise ValueError(f"{label_key!r} labels run to {labels.max()}, but the source "
                                 f"of {sets[key][0]!r} names {len(names[key])} classes")
            index = np.array([classes.setdefault(str(n), len(classes)) for n in names[key]])
            loaded[key] = (images, index[labels])
        num_classes = len(classes)
    else:
        num_classes = 1 + max(int(labels.max()) for _, labels in loaded.values())
        num_classes = max([num_classes, *(len(n) for n in names.values() if n is not None)])
    return loaded, num_classes


class WithRandomInitBaseline:
    """run() = measure(params, model_state) plus '<split>/random_init_top1': the same
    measurement of the network at initialisation, computed on the first run and cached (the
    initialisation never changes); without the embedder's initial_weights it is left out.
    Subclasses set ``embedder``, ``splits`` and ``_random_init = None``, and define measure()."""

    def random_init_metrics(self) -> dict:
        if self.embedder.initial_weights is None:
            return {}
        if self._random_init is None:
            measured = self.measure(*self.embedder.initial_weights())
            self._random_init = {metric_key(split, "random_init_top1"):
                                 measured[metric_key(split, "top1")] for split in self.splits}
        return dict(self._random_init)

    def run(self, params, model_state) -> dict:
        return {**self.measure(params, model_state), **self.random_init_metrics()}


class KNNClassification(WithRandomInitBaseline):
    """Weighted kNN top-1 (and top-5) accuracy of frozen image embeddings (InstDisc style).

    A bank of ``bank_examples`` labelled embeddings of ``bank_split`` is re-embedded each run;
    each query's k nearest bank entries (cosine similarity) vote exp(similarity / temperature)
    for their class, and the class with the most votes is the prediction.

    Metrics, for each split of ``splits``:
      '<split>/top1', '<split>/top5' (top-5 only when k >= 5 and there are >= 5 classes);
      '<split>/random_init_top1': the same evaluation of the network at its random
        initialisation (the embedder's ``initial_weights``), a baseline that says what the
        trained number is worth. It is computed on the first run and cached; it is omitted
        when the embedder has no ``initial_weights``.

    Args:
      splits: the splits whose images are classified (queries).
      label_key: the record field holding the class (synthetic data: 'shape', 'colour', ...).
      num_examples: queries per split (a fixed random subset when a split is larger).
      bank_split, bank_examples: the split and number of labelled examples of the bank.
      k: neighbours voting (capped at the bank size); 200 as InstDisc (solo-learn uses 20).
      temperature: the vote's temperature; 0.07 as InstDisc (the MoCo colab uses 0.1).
      where: keep only records whose fields equal these values, in the bank and every split,
        e.g. {'num_objects': 1}.
      source, path, image_key: read this evaluator's images from another dataset than
        training's (``data.*`` otherwise); a file source needs '{split}' in its path.
    """

    def __init__(self, embedder, data_config, tokenizer, name: str = "knn", *,
                 splits=("val",), label_key: str = "shape", num_examples: int = 1000,
                 bank_split: str = "train", bank_examples: int = 5000, k: int = 200,
                 temperature: float = 0.07, where=None, source=None, path=None,
                 image_key=None):
        self.splits = check_splits(name, "splits", splits)
        bank_split = check_split(name, "bank_split", bank_split)
        check_at_least(name, "num_examples", num_examples, 1)
        check_at_least(name, "bank_examples", bank_examples, 1)
        check_at_least(name, "k", k, 1)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not temperature > 0:
            raise ConfigError(f"evals.{name}.temperature must be a number > 0, got "
                              f"{temperature!r}")
        where = check_where(name, where)
        data_config = common.override_data(data_config, name, source=source, path=path,
                                           image_key=image_key)
        check_disjoint(name, data_config, ("bank_split", bank_split), self.splits)
        self.embedder = embedder
        self.k, self.temperature = int(k), float(temperature)
        sets = {"bank": (bank_split, int(bank_examples)),
                **{split: (split, int(num_examples)) for split in self.splits}}
        self.data, self.num_classes = load_labelled_sets(data_config, sets, label_key, where)
        self.top5 = self.k >= 5 and self.num_classes >= 5
        self._random_init = None  # the random-initialisation baseline, once computed

    def measure(self, params, model_state) -> dict:
        """kNN top-1 (and top-5) of every split against a bank embedded by these weights."""
        bank_images, bank_labels = self.data["bank"]
        bank = self.embedder.images(params, model_state, bank_images)
        metrics = {}
        for split in self.splits:
            images, labels = self.data[split]
            votes = weighted_knn_votes(self.embedder.images(params, model_state, images), bank,
                                       bank_labels, self.num_classes, self.k, self.temperature)
            metrics[metric_key(split, "top1")] = top_k_accuracy(votes, labels, 1)
            if self.top5:
                metrics[metric_key(split, "top5")] = top_k_accuracy(votes, labels, 5)
        return metrics

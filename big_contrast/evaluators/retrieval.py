"""Image<->text retrieval over a gallery of (image, caption) pairs: Recall@K both ways."""

from __future__ import annotations

import numpy as np

from big_contrast.data import sources
from big_contrast.evaluators import common


def _all_incorrect_first(incorrect: np.ndarray, correct: np.ndarray, m: np.ndarray) -> np.ndarray:
    """P(the first m of ``incorrect`` + ``correct`` tied items, in uniformly random order, are
    all incorrect); m <= incorrect + 1."""
    p = np.ones(len(m))
    for i in range(int(m.max(initial=0))):
        p = np.where(i < m, p * (incorrect - i) / np.maximum(incorrect + correct - i, 1), p)
    return p


def recall_at_k(similarity: np.ndarray, ks=(1, 5, 10), groups=None) -> dict:
    """similarity[i, j] = score of query i against item j; item j is a correct answer for
    query i when groups[j] == groups[i] (default: only item i, i.e. groups = arange(N)).

    Items i and j are both the i-th and j-th pair of the gallery, so one ``groups`` serves both
    directions (pass similarity.T for the other). Equal group ids mark identical captions: an
    image with several correct captions is a hit when any of them is in the top k, as in COCO.

    Only incorrect items can push the best-scoring correct item down: h of them score strictly
    higher; ties with it are broken uniformly at random, in expectation (with t incorrect and c
    correct items tied, the best correct item's rank is h plus the number of incorrect items
    before the first correct one in a random order of the t + c). So a collapsed model (all
    scores equal) scores chance, 1 - C(N-c, k) / C(N, k) (k/N for unique captions), never 1.
    """
    similarity = np.asarray(similarity)
    n = len(similarity)
    if similarity.shape != (n, n):
        raise ValueError(f"similarity must be square (query i pairs with item i), got "
                         f"{similarity.shape}")
    groups = np.arange(n) if groups is None else np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must have shape ({n},), got {groups.shape}")
    correct = groups[:, None] == groups[None, :]
    best = np.where(correct, similarity, -np.inf).max(axis=1, keepdims=True)
    higher = ((similarity > best) & ~correct).sum(axis=1)
    tied = similarity == best
    tied_incorrect = (tied & ~correct).sum(axis=1)
    tied_correct = (tied & correct).sum(axis=1)
    recalls = {}
    for k in ks:
        m = np.clip(k - higher, 0, tied_incorrect + 1)  # top-k places left for the tied items
        recalls[k] = float(np.mean(1 - _all_incorrect_first(tied_incorrect, tied_correct, m)))
    return recalls


def caption_groups(tokens: np.ndarray) -> np.ndarray:
    """Integer group ids of token rows: equal ids for identical captions."""
    return np.unique(tokens, axis=0, return_inverse=True)[1].reshape(-1)


class Retrieval:
    """R@K for image->text and text->image on ``num_examples`` pairs of a split.

    Pairs whose captions tokenize identically count as one caption: each of their images
    retrieves any of them, and each of them retrieves any of their images.

    Args:
      split: the split holding the (image, caption) pairs.
      num_examples: gallery size (a fixed random subset when the split is larger).
      ks: the K of Recall@K.
      source, path, image_key, caption_key: read this evaluator's pairs from another dataset
        than training's (``data.*`` otherwise).
    """

    def __init__(self, embedder, data_config, tokenizer, name: str = "retrieval", *,
                 split: str = "val", num_examples: int = 1000, ks=(1, 5, 10), source=None,
                 path=None, image_key=None, caption_key=None):
        self.embedder = embedder
        data_config = common.override_data(data_config, name, source=source, path=path,
                                           image_key=image_key, caption_key=caption_key)
        dataset = sources.build_source(data_config, split)
        self.data = common.load_examples(dataset, data_config.image_size, num_examples, tokenizer,
                                         max_pixels=data_config.max_image_pixels)
        self.groups = caption_groups(self.data["text"])
        self.ks = tuple(ks)

    def run(self, params, model_state) -> dict:
        images = self.embedder.images(params, model_state, self.data["image"])
        texts = self.embedder.texts(params, model_state, self.data["text"])
        similarity = images @ texts.T
        i2t = recall_at_k(similarity, self.ks, self.groups)
        t2i = recall_at_k(similarity.T, self.ks, self.groups)
        return {**{f"i2t_R{k}": v for k, v in i2t.items()},
                **{f"t2i_R{k}": v for k, v in t2i.items()}}

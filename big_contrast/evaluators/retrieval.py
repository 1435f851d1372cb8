"""Image<->text retrieval over a gallery of (image, caption) pairs: Recall@K both ways."""

from __future__ import annotations

import numpy as np

from big_contrast.evaluators import common


def recall_at_k(similarity: np.ndarray, ks=(1, 5, 10)) -> dict:
    """similarity[i, j] = score of query i against item j; item i is query i's match.

    Ties are broken uniformly at random, in expectation: with h items scoring higher than the
    match and t others scoring the same, the match's rank is h + U{0..t}. So duplicate
    captions or a collapsed model (all scores equal) score chance, k/N, and never 0 or 1.
    """
    matched = np.diag(similarity)[:, None]
    higher = (similarity > matched).sum(axis=1)
    ties = (similarity == matched).sum(axis=1) - 1  # other items tied with the match
    return {k: float(np.mean(np.clip(k - higher, 0, ties + 1) / (ties + 1))) for k in ks}


class Retrieval:
    """R@K for image->text and text->image on the first ``num_examples`` pairs of a split."""

    def __init__(self, embedder, data_config, tokenizer, *, split: str = "val",
                 num_examples: int = 1000, ks=(1, 5, 10)):
        self.embedder = embedder
        self.data, _ = common.load_examples(data_config, split, num_examples, tokenizer)
        self.ks = tuple(ks)

    def run(self, params, model_state) -> dict:
        images = self.embedder.images(params, model_state, self.data["image"])
        texts = self.embedder.texts(params, model_state, self.data["text"])
        similarity = images @ texts.T
        metrics = {f"i2t_R{k}": v for k, v in recall_at_k(similarity, self.ks).items()}
        metrics.update({f"t2i_R{k}": v for k, v in recall_at_k(similarity.T, self.ks).items()})
        return metrics

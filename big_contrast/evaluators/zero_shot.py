"""Zero-shot classification: class names become text through prompt templates; each class's
template embeddings are averaged (prompt ensembling) and images take the nearest class."""

from __future__ import annotations

import numpy as np

from big_contrast.data import sources
from big_contrast.evaluators import common

# Used when neither the config nor the source names templates.
DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")


def class_embeddings(embedder, params, model_state, tokenizer, class_names, templates):
    """[num_classes, D]: mean over templates of the L2-normalised prompt embeddings, renormalised."""
    prompts = [t.format(name) for name in class_names for t in templates]
    emb = embedder.texts(params, model_state, tokenizer.encode_batch(prompts))
    emb = emb.reshape(len(class_names), len(templates), -1).mean(axis=1)
    return emb / np.linalg.norm(emb, axis=-1, keepdims=True)


class ZeroShotClassification:
    """Top-1 (and top-k) accuracy of prompt-ensembled zero-shot classification.

    Args:
      split: the split to classify (e.g. 'val', 'heldout_combos').
      label_key: the record field holding the class index.
      num_examples: how many (filtered) examples to evaluate.
      class_names: names indexed by label; default: the source's names for ``label_key``.
      templates: prompt templates with one '{}'; default: the source's, else generic ones.
      where: keep only records whose fields equal these values, e.g. {'num_objects': 1}
        (single-object images, where one shape label is the whole truth).
    """

    def __init__(self, embedder, data_config, tokenizer, *, split: str, label_key: str,
                 num_examples: int = 1000, class_names=None, templates=None, where=None,
                 top_k: int = 1):
        self.embedder = embedder
        self.tokenizer = tokenizer
        self.data, source = common.load_examples(data_config, split, num_examples,
                                                 labels=(label_key,), where=where)
        self.labels = self.data[label_key]
        self.class_names = tuple(class_names or sources.class_names(source, label_key) or ())
        if not self.class_names:
            raise ValueError(f"zero-shot on {split!r}: the source names no classes for "
                             f"{label_key!r}; set class_names in the evaluator config")
        if self.labels.max() >= len(self.class_names):
            raise ValueError(f"label {self.labels.max()} has no class name "
                             f"({len(self.class_names)} names given)")
        self.templates = tuple(templates or sources.prompt_templates(source) or DEFAULT_TEMPLATES)
        self.top_k = top_k

    def run(self, params, model_state) -> dict:
        classes = class_embeddings(self.embedder, params, model_state, self.tokenizer,
                                   self.class_names, self.templates)
        images = self.embedder.images(params, model_state, self.data["image"])
        order = np.argsort(-(images @ classes.T), axis=1)
        metrics = {"top1": float(np.mean(order[:, 0] == self.labels))}
        if self.top_k > 1:
            hits = (order[:, : self.top_k] == self.labels[:, None]).any(axis=1)
            metrics[f"top{self.top_k}"] = float(np.mean(hits))
        return metrics

"""Zero-shot classification: class names become text through prompt templates. The
'embedding' scorer averages each class's template embeddings (prompt ensembling) and images
take the nearest class; the 'generative' scorer (captioning objectives) ranks classes by the
decoder's log-likelihood of their prompts given the image, averaged over the templates."""

from __future__ import annotations


import numpy as np

from big_contrast.config import ConfigError
from big_contrast.data import sources
from big_contrast.evaluators import common

SCORERS = ("embedding", "generative")
# Used when neither the config nor the source names templates (e.g. for your own images).
DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")


def class_embeddings(embedder, params, model_state, tokenizer, class_names, templates):
    """[num_classes, D]: mean over templates of the L2-normalised prompt embeddings, renormalised."""
    prompts = [t.format(name) for name in class_names for t in templates]
    emb = embedder.texts(params, model_state, tokenizer.encode_batch(prompts))
    emb = emb.reshape(len(class_names), len(templates), -1).mean(axis=1)
    return emb / np.linalg.norm(emb, axis=-1, keepdims=True)


def _configured_names(name: str, class_names, class_names_file):
    """Class names from the evaluator config (a list, or a file of one name per line), or None."""
    if class_names and class_names_file:
        raise ConfigError(f"evals.{name}: set class_names or class_names_file, not both")
    if not class_names_file:
        return tuple(str(n) for n in class_names) if class_names else None
    try:
        return sources.read_class_names_file(class_names_file)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"evals.{name}.class_names_file: {e}") from None


class ZeroShotClassification:
    """Top-1 (and top-k) accuracy of prompt-ensembled zero-shot classification.

    Args:
      split: the split to classify (e.g. 'val', 'heldout_combos').
      label_key: the record field holding the class (a manifest's label column: class indices
        or class names; an image folder's is 'label').
      num_examples: how many (filtered) examples to evaluate (a fixed random subset when the
        split is larger).
      class_names: names indexed by label; default: the source's names for ``label_key``
        (the synthetic world's, an image folder's, or a manifest's sorted label names).
      class_names_file: a text file of class names, one per line, instead of class_names.
      templates: prompt templates with one '{}'; default: the source's, else generic ones.
      where: keep only records whose fields equal these values, e.g. {'num_objects': 1}
        (single-object images, where one shape label is the whole truth).
      source, path, image_key: read this evaluator's images from another dataset than
        training's (``data.*`` otherwise), e.g. source='image_folder', path='/data/pets/{split}'.
      scorer: 'embedding' (contrastive embeddings) or 'generative' (caption log-likelihood).
    """

    def __init__(self, embedder, data_config, tokenizer, name: str = "zero_shot", *, split: str,
                 label_key: str = "label", num_examples: int = 1000, class_names=None,
                 class_names_file=None, templates=None, where=None, top_k: int = 1, source=None,
                 path=None, image_key=None, scorer: str = "embedding"):
        if scorer not in SCORERS:
            raise ConfigError(f"evals.{name}.scorer is {scorer!r}; scorers: {', '.join(SCORERS)}")
        if scorer == "generative" and not embedder.objective.can_caption:
            raise ConfigError(f"evals.{name}.scorer 'generative' needs a captioning objective "
                              f"(e.g. coca), not {type(embedder.objective).__name__}")
        self.scorer = scorer
        self.embedder = embedder
        self.tokenizer = tokenizer
        configured = _configured_names(name, class_names, class_names_file)
        data_config = common.override_data(data_config, name, source=source, path=path,
                                           image_key=image_key)
        dataset = sources.build_source(data_config, split, captions=False, label_key=label_key,
                                       class_names=configured)
        self.data = common.load_examples(dataset, data_config.image_size, num_examples,
                                         labels=(label_key,), where=where,
                                         max_pixels=data_config.max_image_pixels)
        self.labels = self.data[label_key]
        self.class_names = configured or sources.class_names(dataset, label_key)
        if not self.class_names:
            raise ConfigError(f"evals.{name}: {dataset!r} names no classes for {label_key!r}; "
                              "set class_names or class_names_file")
        if self.labels.min() < 0 or self.labels.max() >= len(self.class_names):
            raise ValueError(f"labels run from {self.labels.min()} to {self.labels.max()}, but "
                             f"{len(self.class_names)} class names give indices "
                             f"0..{len(self.class_names) - 1}")
        self.templates = tuple(templates or sources.prompt_templates(dataset, label_key)
                               or DEFAULT_TEMPLATES)
        bad = [t for t in self.templates if t.count("{}") != 1]
        if bad:
            raise ConfigError(f"evals.{name}.templates: each needs exactly one '{{}}'; got {bad}")
        self.top_k = top_k

    def _scores(self, params, model_state) -> np.ndarray:
        """[N, num_classes]: higher is more likely."""
        if self.scorer == "generative":
            prompts = [t.format(n) for n in self.class_names for t in self.templates]
            log_likelihood = self.embedder.caption_scores(
                params, model_state, self.data["image"], self.tokenizer.encode_batch(prompts))
            return log_likelihood.reshape(len(log_likelihood), len(self.class_names), -1).mean(-1)
        classes = class_embeddings(self.embedder, params, model_state, self.tokenizer,
                                   self.class_names, self.templates)
        return self.embedder.images(params, model_state, self.data["image"]) @ classes.T

    def run(self, params, model_state) -> dict:
        order = np.argsort(-self._scores(params, model_state), axis=1)
        metrics = {"top1": float(np.mean(order[:, 0] == self.labels))}
        if self.top_k > 1:
            hits = (order[:, : self.top_k] == self.labels[:, None]).any(axis=1)
            metrics[f"top{self.top_k}"] = float(np.mean(hits))
        return metrics

"""Captioning: generate a caption per image (greedy or beam search) and score it against the
record's own caption with CIDEr-D; where the records carry shape and colour labels (the
synthetic world), also how often each is named in the generated caption and right when named."""

from __future__ import annotations

import functools

import numpy as np

from big_contrast import decoding
from big_contrast.config import ConfigError
from big_contrast.data import caption_attributes, sources
from big_contrast.evaluators import cider, common


class Captioning:
    """CIDEr-D (one reference per image) and attribute accuracy of generated captions.

    Args:
      split, num_examples, where, source, path, image_key, caption_key: which records, as for
        the other evaluators.
      beam_size: 1 decodes greedily; more runs beam search with ``length_penalty``.
      max_len: generated length including BOS and EOS (default: the tokenizer's max_len).
      show: how many generated captions to print beside their references after each run.
    """

    def __init__(self, embedder, data_config, tokenizer, name: str = "captioning", *,
                 split: str, num_examples: int = 1000, where=None, beam_size: int = 1,
                 length_penalty: float = 0.6, max_len: int | None = None, show: int = 3,
                 source=None, path=None, image_key=None, caption_key=None):
        objective = embedder.objective
        if not objective.can_caption:
            raise ConfigError(f"evals.{name} (captioning) needs a captioning objective (e.g. "
                              f"coca), not {type(objective).__name__}")
        if not tokenizer.can_decode:
            raise ConfigError(f"evals.{name} (captioning): the tokenizer cannot turn generated "
                              "ids back into text; set text.tokenizer to 'vocab' or 'sentencepiece'")
        if beam_size < 1:
            raise ConfigError(f"evals.{name}.beam_size must be >= 1, got {beam_size}")
        self.embedder, self.tokenizer, self.show = embedder, tokenizer, show
        data_config = common.override_data(data_config, name, source=source, path=path,
                                           image_key=image_key, caption_key=caption_key)
        dataset = sources.build_source(data_config, split, captions=True)
        sample = common.sample_record(dataset) or {}
        labels = tuple(a for a in caption_attributes.ATTRIBUTES if a in sample)
        self.data = common.load_examples(dataset, data_config.image_size, num_examples,
                                         tokenizer, labels=labels, where=where,
                                         max_pixels=data_config.max_image_pixels,
                                         keep_caption=True)
        self.labels = {a: self.data[a] for a in labels}
        self._generate = embedder.jit(functools.partial(
            _generate, objective, max_len=max_len or tokenizer.max_len, beam_size=beam_size,
            length_penalty=length_penalty, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id))
        self.last_samples: list[str] = []

    def captions(self, params, model_state) -> list[str]:
        tokens = self.embedder.map_batches(self._generate, params, model_state, self.data["image"])
        return [self.tokenizer.decode(row) for row in tokens]

    def run(self, params, model_state) -> dict:
        generated = self.captions(params, model_state)
        references = [str(c) for c in self.data["caption"]]
        score, _ = cider.cider_d(generated, [[r] for r in references])
        metrics = {"cider": score}
        for attribute, report in caption_attributes.attribute_report(generated, self.labels).items():
            # right_when_named is undefined (NaN) when no caption names the attribute: omitted.
            metrics.update({f"{attribute}_{key}": value for key, value in report.items()
                            if not np.isnan(value)})
        self.last_samples = [f'"{g}"  (reference: "{r}")'
                             for g, r in zip(generated[: self.show], references)]
        return metrics


def _generate(objective, params, model_state, images, *, max_len, beam_size, length_penalty,
              bos_id, eos_id, pad_id):
    """Token ids [B, max_len] of the best caption per image; one compilation per batch shape."""
    cache = objective.init_decoding(params, model_state, images)

    def step(cache, token, position):
        return objective.decode_step(params, model_state, cache, token, position)

    ids = dict(batch_size=images.shape[0], max_len=max_len, bos_id=bos_id, eos_id=eos_id,
               pad_id=pad_id)
    if beam_size == 1:
        return decoding.greedy_decode(step, cache, **ids)[0]
    return decoding.beam_search(step, cache, beam_size=beam_size, length_penalty=length_penalty,
                                **ids)[0]

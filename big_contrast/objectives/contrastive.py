"""CLIP / ALIGN: a two-tower model trained with the symmetric softmax InfoNCE over the global
batch (negatives gathered across devices inside shard_map)."""

from __future__ import annotations

import functools

import jax
from jax.sharding import PartitionSpec as P

from big_contrast import losses
from big_contrast.models import two_tower
from big_contrast.data.spec import BatchSpec, ImageView
from big_contrast.objectives.base import Objective
from big_contrast.sharding import BATCH_AXES


def global_softmax_contrastive(image_emb, text_emb, scale, label_smoothing: float = 0.0):
    """softmax_contrastive over the global batch: local rows x gathered columns per device."""
    loss = functools.partial(losses.softmax_contrastive, axis_name=BATCH_AXES,
                             label_smoothing=label_smoothing)
    sharded = jax.shard_map(loss, in_specs=(P(BATCH_AXES), P(BATCH_AXES), P()), out_specs=P())
    return sharded(image_emb, text_emb, scale)


def image_text_spec(config) -> BatchSpec:
    """One augmented image view and its caption: what image-text objectives train on."""
    aug = config.data.augment
    return BatchSpec(views=(ImageView(config.data.image_size, tuple(aug.crop_scale), aug.flip),),
                     text=True)


class Contrastive(Objective):
    """config.model: {image, text, embed_dim, projection, init_scale, learn_scale, max_scale};
    config.loss: {label_smoothing}."""

    def __init__(self, config, tokenizer):
        model_cfg = config.model
        self.model = two_tower.TwoTower(
            image_tower=two_tower.build_image_tower(model_cfg.image),
            text_tower=two_tower.build_text_tower(model_cfg.text, tokenizer.vocab_size,
                                                  tokenizer.eos_id),
            embed_dim=model_cfg.embed_dim, projection=model_cfg.projection,
            init_scale=model_cfg.init_scale, learn_scale=model_cfg.learn_scale)
        self.max_scale = model_cfg.max_scale
        self.label_smoothing = config.loss.label_smoothing
        self._spec = image_text_spec(config)

    @property
    def batch_spec(self) -> BatchSpec:
        return self._spec

    def init_variables(self, rng, batch):
        return self.model.init({"params": rng, "dropout": rng}, batch["image"], batch["text"])

    def loss_fn(self, params, model_state, batch, rng, step):
        del step  # nothing scheduled
        out, new_state = self.model.apply(
            {"params": params, **model_state}, batch["image"], batch["text"], train=True,
            rngs={"dropout": rng}, mutable=list(model_state))
        loss = global_softmax_contrastive(out["image"], out["text"], out["scale"],
                                          self.label_smoothing)
        metrics = {"loss": loss, "temperature": 1.0 / out["scale"]}
        return loss, (metrics, dict(new_state))

    def postprocess_params(self, params):
        return two_tower.clamp_log_scale(params, self.max_scale)

    def embed_images(self, params, model_state, images):
        return self.model.apply({"params": params, **model_state}, images,
                                method=two_tower.TwoTower.encode_image)

    def embed_texts(self, params, model_state, tokens):
        return self.model.apply({"params": params, **model_state}, tokens,
                                method=two_tower.TwoTower.encode_text)


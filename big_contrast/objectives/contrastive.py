"""CLIP / ALIGN / SigLIP: a two-tower model trained with a contrastive loss over the global
batch (softmax InfoNCE, dense or blockwise, or SigLIP's pairwise sigmoid; negatives from every
device inside shard_map)."""

from __future__ import annotations

import functools

import jax
from jax.sharding import PartitionSpec as P

from big_contrast import losses
from big_contrast.models import precision, two_tower
from big_contrast.data.spec import BatchSpec, ImageView
from big_contrast.objectives.base import PerExampleObjective
from big_contrast.sharding import BATCH_AXES


def global_contrastive_loss(loss_config):
    """(image_emb, text_emb, logit_params) -> scalar: the configured image-text loss over the
    global batch, each device scoring its local rows (shard_map over the batch axes)."""
    if loss_config.contrastive == "sigmoid":
        sigmoid = jax.shard_map(functools.partial(losses.sigmoid_contrastive, axis_name=BATCH_AXES),
                                in_specs=(P(BATCH_AXES), P(BATCH_AXES), P(), P()), out_specs=P())
        return lambda x, y, logit: sigmoid(x, y, logit["scale"], logit["bias"])
    softmax = jax.shard_map(
        functools.partial(losses.softmax_contrastive, axis_name=BATCH_AXES,
                          label_smoothing=loss_config.label_smoothing,
                          block_size=loss_config.block_size),
        in_specs=(P(BATCH_AXES), P(BATCH_AXES), P()), out_specs=P())
    return lambda x, y, logit: softmax(x, y, logit["scale"])


def image_text_spec(config) -> BatchSpec:
    """One augmented image view and its caption: what image-text objectives train on."""
    aug = config.data.augment
    return BatchSpec(views=(ImageView(config.data.image_size, tuple(aug.crop_scale), aug.flip),),
                     text=True)


class Contrastive(PerExampleObjective):
    """config.model: {image, text, embed_dim, projection, init_scale, learn_scale, max_scale,
    init_bias, dtype, param_dtype}; config.loss: {contrastive, block_size, label_smoothing}.
    The towers compute in model.dtype; embeddings, scale and bias reach the loss in float32."""

    def __init__(self, config, tokenizer):
        model_cfg = config.model
        dtypes = precision.from_config(model_cfg)
        self.model = two_tower.TwoTower(
            image_tower=two_tower.build_image_tower(model_cfg.image, **dtypes),
            text_tower=two_tower.build_text_tower(model_cfg.text, tokenizer.vocab_size,
                                                  tokenizer.eos_id, **dtypes),
            embed_dim=model_cfg.embed_dim, projection=model_cfg.projection,
            init_scale=model_cfg.init_scale, learn_scale=model_cfg.learn_scale,
            init_bias=model_cfg.init_bias, **dtypes)
        self.max_scale = model_cfg.max_scale
        self.contrastive_loss = global_contrastive_loss(config.loss)
        self._spec = image_text_spec(config)

    @property
    def batch_spec(self) -> BatchSpec:
        return self._spec

    def init_variables(self, rng, batch):
        return self.model.init({"params": rng, "dropout": rng}, batch["image"], batch["text"])

    def per_example_outputs(self, params, model_state, batch, rng, step):
        del step  # nothing scheduled
        out, new_state = self.model.apply(
            {"params": params, **model_state}, batch["image"], batch["text"], train=True,
            rngs={"dropout": rng}, mutable=list(model_state))
        return {"image": out["image"], "text": out["text"]}, dict(new_state)

    def loss_from_outputs(self, params, outputs, step):
        logit = self.model.apply({"params": params}, method=two_tower.TwoTower.logit_parameters)
        loss = self.contrastive_loss(outputs["image"], outputs["text"], logit)
        metrics = {"loss": loss, "temperature": 1.0 / logit["scale"]}
        if "bias" in logit:
            metrics["bias"] = logit["bias"]
        return loss, metrics

    def postprocess_params(self, params):
        return two_tower.clamp_log_scale(params, self.max_scale)

    def embed_images(self, params, model_state, images):
        return self.model.apply({"params": params, **model_state}, images,
                                method=two_tower.TwoTower.encode_image)

    def embed_texts(self, params, model_state, tokens):
        return self.model.apply({"params": params, **model_state}, tokens,
                                method=two_tower.TwoTower.encode_text)


"""Two-tower (dual encoder) model: image and text towers, projections into one space, L2
normalisation, a learnable log-temperature (CLIP: scale starts at 1/0.07, clamped at 100) and,
for sigmoid losses, a learnable logit bias (SigLIP: starts at -10)."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_contrast.models import heads, precision
from big_contrast.models.convnet import ConvNet
from big_contrast.models.efficientnet import EfficientNet
from big_contrast.models.resnet import ResNet
from big_contrast.models.text import TextTransformer
from big_contrast.models.vit import ViT


IMAGE_TOWERS = ("vit", "convnet", "efficientnet", "resnet")


def build_image_tower(cfg, dtype=jnp.float32, param_dtype=jnp.float32) -> nn.Module:
    """cfg: {type: 'vit' | 'convnet' | 'efficientnet' | 'resnet', variant, pool, stem, norm,
    bn_momentum, drop_connect, max_stride, stages, fused_stages, remat, remat_policy, scan};
    validation.py says which values each type takes. dtype, param_dtype: models/precision.py."""
    dtypes = {"dtype": dtype, "param_dtype": param_dtype}
    momentum = {} if cfg.bn_momentum is None else {"bn_momentum": cfg.bn_momentum}
    stack = {"remat": cfg.remat, "remat_policy": cfg.remat_policy, "scan": cfg.scan}
    if cfg.type == "vit":
        return ViT(cfg.variant, pool=cfg.pool, stem=cfg.stem, **stack, **dtypes)
    if cfg.type == "convnet":
        return ConvNet(cfg.variant, stem=cfg.stem, norm=cfg.norm, pool=cfg.pool, **momentum,
                       **dtypes)
    if cfg.type == "efficientnet":
        return EfficientNet(cfg.variant, stem_stride=int(cfg.stem[-1]), pool=cfg.pool,
                            drop_connect_rate=cfg.drop_connect, max_stride=cfg.max_stride,
                            stages=cfg.stages, fused_stages=cfg.fused_stages,
                            **stack, **momentum, **dtypes)
    if cfg.type == "resnet":
        return ResNet(cfg.variant, stem=cfg.stem, pool=cfg.pool, **stack, **momentum, **dtypes)
    raise ValueError(f"unknown image tower {cfg.type!r}; choose one of {IMAGE_TOWERS}")


def build_text_tower(cfg, vocab_size: int, eos_id: int, dtype=jnp.float32,
                     param_dtype=jnp.float32) -> nn.Module:
    """cfg: {variant, causal, pool, remat, remat_policy, scan}; vocabulary and EOS come from
    the tokenizer. dtype, param_dtype: models/precision.py."""
    return TextTransformer(cfg.variant, vocab_size=vocab_size, causal=cfg.causal, pool=cfg.pool,
                           eos_id=eos_id, remat=cfg.remat, remat_policy=cfg.remat_policy,
                           scan=cfg.scan, dtype=dtype, param_dtype=param_dtype)


def l2_normalise(x):
    """x / |x| over the last axis, in float32 whatever x's dtype (what every loss receives)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


class TwoTower(nn.Module):
    """Returns {'image', 'text': L2-normalised embeddings, 'scale': exp(log_scale)} and, with
    ``init_bias``, 'bias'.

    Either input may be None (evaluators embed one modality at a time). ``log_scale`` is a
    parameter when ``learn_scale``; ``clamp_log_scale`` keeps it in [0, log(max_scale)] after
    every optimizer step, as CLIP does. ``init_bias`` (None: no bias) adds a learnable scalar
    'bias' added to every logit, which the sigmoid loss needs. The projections compute in
    ``dtype``; the embeddings, scale and bias are float32 whatever it is.
    """

    image_tower: nn.Module
    text_tower: nn.Module
    embed_dim: int
    projection: str = "linear"
    init_scale: float = 1 / 0.07
    learn_scale: bool = True
    init_bias: float | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.image_proj = heads.Projection(self.embed_dim, self.projection, **precision.of(self))
        self.text_proj = heads.Projection(self.embed_dim, self.projection, **precision.of(self))
        init = math.log(self.init_scale)
        if self.learn_scale:
            # A concrete dtype (not a weakly typed Python float) so the train step compiles once.
            self.log_scale = self.param(
                "log_scale", nn.with_logical_partitioning(
                    lambda _, dtype: jnp.asarray(init, dtype), ()), self.param_dtype)
        else:
            self.log_scale = jnp.asarray(init, jnp.float32)
        if self.init_bias is not None:
            self.bias = self.param("bias", nn.with_logical_partitioning(
                lambda _, dtype: jnp.asarray(self.init_bias, dtype), ()), self.param_dtype)

    def logit_parameters(self) -> dict:
        """{'scale'} and, with a bias, {'bias'} in float32: what the loss applies to the
        similarities."""
        out = {"scale": jnp.exp(self.log_scale.astype(jnp.float32))}
        if self.init_bias is not None:
            out["bias"] = self.bias.astype(jnp.float32)
        return out

    def encode_image(self, images, train: bool = False):
        pooled, _ = self.image_tower(images, train=train)
        return l2_normalise(self.image_proj(pooled))

    def encode_text(self, tokens, train: bool = False):
        pooled, _ = self.text_tower(tokens, train=train)
        return l2_normalise(self.text_proj(pooled))

    def __call__(self, images=None, texts=None, train: bool = False):
        out = self.logit_parameters()
        if images is not None:
            out["image"] = self.encode_image(images, train)
        if texts is not None:
            out["text"] = self.encode_text(texts, train)
        return out


def clamp_log_scale(params, max_scale: float):
    """CLIP's post-step clamp: log_scale in [0, log(max_scale)] (a no-op without the param)."""
    if "log_scale" not in params:
        return params
    clamped = jnp.clip(params["log_scale"], 0.0, math.log(max_scale))
    return {**params, "log_scale": clamped}

"""Vision Transformer image tower (Dosovitskiy et al. 2021), sizes by name: 'B/32', 'nano/4'."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from big_contrast.models import precision, transformer
from big_contrast.models.image_layers import pixels_to_unit_range


class ViT(nn.Module):
    """Patchify -> (+CLS) + learned positions -> pre-LN encoder -> pooled vector.

    Attributes:
      variant: size and patch, e.g. 'B/32' (see transformer.SIZES).
      pool: 'cls' (CLIP) or 'gap' (mean over patch tokens).
      stem: 'patch' (one linear patch embedding, the ViT paper) or 'conv' (stride-2 3x3
        convolutions down to the patch grid, then a 1x1 projection: Xiao et al. 2021, "Early
        convolutions help transformers see better"; it learns local shape much faster).
      remat: rematerialise each block in the backward pass (saves activation memory), keeping
        what remat_policy allows (stacks.REMAT_POLICIES).
      scan: run the encoder blocks as one nn.scan (transformer.Encoder).
      dtype, param_dtype: compute and parameter dtypes (models/precision.py).
    Returns (pooled [B, width], tokens [B, N, width]) in dtype; tokens feed captioning decoders.
    """

    variant: str = "B/32"
    pool: str = "cls"
    stem: str = "patch"
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    scan: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool = False):
        del train  # no dropout or batch statistics in a ViT
        size, patch = transformer.parse_variant(self.variant)
        if patch is None:
            raise ValueError(f"ViT variant needs a patch size, e.g. '{self.variant}/16'")
        if self.pool not in ("cls", "gap"):
            raise ValueError(f"ViT pool must be 'cls' or 'gap', got {self.pool!r}")
        x = pixels_to_unit_range(images).astype(self.dtype)
        dtypes = precision.of(self)
        if x.shape[1] % patch or x.shape[2] % patch:
            raise ValueError(f"image size {x.shape[1:3]} is not divisible by patch {patch}")
        x = self._embed_patches(x, size.width, patch)
        batch = x.shape[0]
        x = x.reshape(batch, -1, size.width)
        if self.pool == "cls":
            cls = self.param("cls", nn.with_logical_partitioning(
                nn.initializers.zeros_init(), (None, None, "embed")), (1, 1, size.width),
                self.param_dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, size.width)).astype(x.dtype), x],
                                axis=1)
        posemb = self.param("posemb", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, None, "embed")), (1, x.shape[1], size.width),
            self.param_dtype)
        x = transformer.layer_norm("ln_pre", **dtypes)(x + posemb.astype(self.dtype))
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        x = transformer.Encoder(size.depth, size.heads, size.mlp_dim, remat=self.remat,
                                remat_policy=self.remat_policy, scan=self.scan,
                                name="encoder", **dtypes)(x)
        x = transformer.layer_norm("ln_post", **dtypes)(x)
        pooled = x[:, 0] if self.pool == "cls" else x.mean(axis=1)
        return pooled, x

    def _embed_patches(self, x, width: int, patch: int):
        """Images [B, H, W, 3] -> patch features [B, H/patch, W/patch, width]."""
        if self.stem == "patch":
            return nn.Conv(width, (patch, patch), strides=(patch, patch), padding="VALID",
                           name="patchify", kernel_init=_conv_init(), bias_init=_bias_init(),
                           **precision.of(self))(x)
        if self.stem != "conv":
            raise ValueError(f"ViT stem must be 'patch' or 'conv', got {self.stem!r}")
        n_convs = patch.bit_length() - 1
        if patch != 2 ** n_convs:
            raise ValueError(f"a conv stem needs a power-of-two patch size, got {patch}")
        # A full-resolution 3x3 layer, then stride-2 3x3 layers whose channels double up to
        # the width (..., width/4, width/2, width), then a 1x1 projection.
        strides = [1] + [2] * n_convs
        for i, stride in enumerate(strides):
            channels = max(width >> (n_convs - i), 16)
            x = nn.Conv(channels, (3, 3), strides=(stride, stride), padding="SAME",
                        name=f"stem_conv{i}", kernel_init=_conv_init(None),
                        bias_init=_bias_init(None), **precision.of(self))(x)
            x = nn.gelu(x, approximate=True)
        return nn.Conv(width, (1, 1), name="stem_proj", kernel_init=_conv_init(),
                       bias_init=_bias_init(), **precision.of(self))(x)


def _conv_init(out_axis: str | None = "embed"):
    return nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, out_axis))


def _bias_init(out_axis: str | None = "embed"):
    return transformer.zeros_init((out_axis,))

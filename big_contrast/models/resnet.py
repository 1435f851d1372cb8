"""ResNet image towers (He et al. 2016): ResNet-18/34/50/101/152 with torchvision's layer shapes
(v1.5: a bottleneck block strides on its 3x3 convolution) and small variants for 32x32 images.

Like the other towers it returns (pooled, tokens), so it serves contrastive image-text
objectives as well as image-only self-supervised ones (SimCLR, SwAV).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from big_contrast.models import precision, stacks
from big_contrast.models.image_layers import batch_norm, pixels_to_unit_range, pool_tokens


@dataclasses.dataclass(frozen=True)
class Spec:
    """One variant: residual block kind, stem and stage widths, blocks per stage.

    A stage's first block strides by 2 (except the first stage's); a bottleneck block outputs
    BOTTLENECK_EXPANSION x its stage width.
    """

    block: str  # 'basic' (two 3x3 convolutions) | 'bottleneck' (1x1 -> 3x3 -> 1x1)
    stem_width: int
    widths: tuple[int, ...]
    blocks: tuple[int, ...]


_IMAGENET_WIDTHS = (64, 128, 256, 512)
VARIANTS = {
    # Small CPU variants for 32x32 images (use stem='cifar'), in the spirit of the paper's CIFAR
    # ResNets (three stages of 16/32/64 channels): one basic block per stage, so the stem conv
    # and 6 more on the main path. 'tiny': 16/32/64 channels, 77,392 params; 'small': twice
    # the width, 32/64/128, 307,360 params (about 3x the time of 'tiny' on CPU; two blocks per
    # stage would cost about 2x more again). Both leave an 8x8 map of 32x32 inputs.
    "tiny": Spec("basic", 16, (16, 32, 64), (1, 1, 1)),
    "small": Spec("basic", 32, (32, 64, 128), (1, 1, 1)),
    "18": Spec("basic", 64, _IMAGENET_WIDTHS, (2, 2, 2, 2)),
    "34": Spec("basic", 64, _IMAGENET_WIDTHS, (3, 4, 6, 3)),
    "50": Spec("bottleneck", 64, _IMAGENET_WIDTHS, (3, 4, 6, 3)),
    "101": Spec("bottleneck", 64, _IMAGENET_WIDTHS, (3, 4, 23, 3)),
    "152": Spec("bottleneck", 64, _IMAGENET_WIDTHS, (3, 8, 36, 3)),
}
BOTTLENECK_EXPANSION = 4
STEMS = ("imagenet", "cifar")


def spec(variant: str) -> Spec:
    """The variant's layout; raises ValueError naming the known variants."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown ResNet variant {variant!r}; variants are {list(VARIANTS)}")
    return VARIANTS[variant]


def output_channels(variant: str) -> int:
    """Channels of the last feature map (the pooled width for pool 'gap' or 'max')."""
    layout = spec(variant)
    expansion = BOTTLENECK_EXPANSION if layout.block == "bottleneck" else 1
    return layout.widths[-1] * expansion


# He/Kaiming normal with fan_out (kh * kw * output channels), as torchvision initialises them.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# Logical names of a kernel's (input, output) channels: a block's first convolution widens
# into 'mlp' (split by tensor parallelism), the next one reads it; 'embed' is split by FSDP.
_STEM = (None, "embed")
_INTO_BLOCK = ("embed", "mlp")
_OUT_OF_BLOCK = ("mlp", None)
_LAST = (None, "embed")  # a bottleneck's third convolution and the shortcut
_BN_EPSILON = 1e-5  # torchvision's


def _conv(features: int, kernel: int, name: str, channel_names: tuple, strides: int = 1,
          **dtypes) -> nn.Conv:
    """Bias-free convolution (a BatchNorm follows) with torchvision's symmetric padding
    (kernel // 2 each side), which differs from 'SAME' at stride 2 on even sizes;
    ``channel_names``: the logical names of its kernel's (input, output) channel axes."""
    pad = kernel // 2
    names = (None, None, *channel_names)
    return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                   padding=((pad, pad), (pad, pad)), use_bias=False, name=name,
                   kernel_init=nn.with_logical_partitioning(_CONV_INIT, names), **dtypes)


def _bn(train: bool, momentum: float, name: str, zero_scale: bool = False,
        **dtypes) -> nn.BatchNorm:
    """image_layers.batch_norm; ``zero_scale`` starts its scale at zero (Goyal et al. 2017:
    a residual branch whose last BatchNorm starts at zero starts as the identity)."""
    return batch_norm(train, momentum, _BN_EPSILON, name, zero_scale=zero_scale, **dtypes)


class ResidualBlock(nn.Module):
    """relu(branch(x) + shortcut(x)); the shortcut is a strided 1x1 conv + BN when the shape
    changes, else the identity.

    'basic': 3x3 conv (stride) -> BN -> ReLU -> 3x3 conv -> BN; outputs `features` channels.
    'bottleneck': 1x1 conv -> BN -> ReLU -> 3x3 conv (stride) -> BN -> ReLU -> 1x1 conv -> BN;
    outputs BOTTLENECK_EXPANSION * `features` channels.
    """

    block: str
    features: int
    stride: int
    bn_momentum: float
    zero_init_residual: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, inputs, train: bool = False):
        dtypes = precision.of(self)
        bn = functools.partial(_bn, train, self.bn_momentum, **dtypes)
        conv = functools.partial(_conv, **dtypes)
        zero = self.zero_init_residual
        if self.block == "basic":
            out_features = self.features
            x = conv(self.features, 3, "conv1", _INTO_BLOCK, self.stride)(inputs)
            x = nn.relu(bn("bn1")(x))
            x = bn("bn2", zero)(conv(self.features, 3, "conv2", _OUT_OF_BLOCK)(x))
        else:
            out_features = self.features * BOTTLENECK_EXPANSION
            x = nn.relu(bn("bn1")(conv(self.features, 1, "conv1", _INTO_BLOCK)(inputs)))
            x = nn.relu(bn("bn2")(conv(self.features, 3, "conv2", _OUT_OF_BLOCK, self.stride)(x)))
            x = bn("bn3", zero)(conv(out_features, 1, "conv3", _LAST)(x))
        shortcut = inputs
        if self.stride != 1 or inputs.shape[-1] != out_features:
            shortcut = conv(out_features, 1, "shortcut_conv", _LAST, self.stride)(inputs)
            shortcut = bn("shortcut_bn")(shortcut)
        return nn.relu(x + shortcut)


class ResNet(nn.Module):
    """Stem -> stages of residual blocks -> pooled feature map.

    Attributes:
      variant: key of VARIANTS: '18', '34' (basic blocks), '50', '101', '152' (bottleneck
        blocks), or the small 32x32 variants 'tiny' and 'small'.
      stem: 'imagenet' (7x7 stride-2 conv, BN, ReLU, 3x3 stride-2 max-pool: total stride 32,
        224 px -> 7x7 map) or 'cifar' (3x3 stride-1 conv, BN, ReLU, no pool: total stride 8
        for the three-stage variants, 16 for the four-stage ones).
      pool: 'gap' (the paper), 'max' or 'gap_max' (image_layers.pool_tokens).
      bn_momentum: decay of the running statistics (in 'batch_stats', so train=True needs
        mutable=['batch_stats']); 0.9 is torchvision's momentum of 0.1.
      zero_init_residual: start the last BatchNorm scale of every residual branch at zero.
      remat: rematerialise each block in the backward pass (saves activation memory), keeping
        what remat_policy allows (stacks.REMAT_POLICIES).
      scan: run the blocks after each stage's first (identical: stride 1, same channels) as
        one nn.scan named 'stage{s}_blocks', their variables stacked on a leading axis,
        instead of 'stage{s}_block1', 'stage{s}_block2', ...
      dtype, param_dtype: compute and parameter dtypes (models/precision.py).
    Takes images [B, H, W, 3] (uint8, or floats already in [-1, 1]); returns
    (pooled [B, C] ([B, 2C] for 'gap_max'), tokens [B, H' * W', C]) in dtype,
    C = output_channels.
    """

    variant: str = "50"
    stem: str = "imagenet"
    pool: str = "gap"
    bn_momentum: float = 0.9
    zero_init_residual: bool = False
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    scan: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool = False):
        layout = spec(self.variant)
        if self.stem not in STEMS:
            raise ValueError(f"ResNet stem must be one of {STEMS}, got {self.stem!r}")
        dtypes = precision.of(self)
        x = pixels_to_unit_range(images).astype(self.dtype)
        if self.stem == "imagenet":
            x = _conv(layout.stem_width, 7, "stem_conv", _STEM, strides=2, **dtypes)(x)
            x = nn.relu(_bn(train, self.bn_momentum, "stem_bn", **dtypes)(x))
            # XLA:CPU's reduce-window gradient is slow (convnet._max_pool_2x2); only this stem
            # pools, and it is meant for large images on accelerators.
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = _conv(layout.stem_width, 3, "stem_conv", _STEM, **dtypes)(x)
            x = nn.relu(_bn(train, self.bn_momentum, "stem_bn", **dtypes)(x))

        for s, (features, repeats) in enumerate(zip(layout.widths, layout.blocks)):
            block = self._block(layout.block, features)
            x = block(2 if s else 1, name=f"stage{s}_block0")(x, train)
            if self.scan and repeats > 1:
                rest = self._block(layout.block, features, scanned=True)(1, name=f"stage{s}_blocks")
                x = stacks.scan_residual(rest, x, repeats - 1, train,
                                         collections=("params", "batch_stats"))
                continue
            for r in range(1, repeats):
                x = block(1, name=f"stage{s}_block{r}")(x, train)

        batch, _, _, channels = x.shape
        tokens = x.reshape(batch, -1, channels)
        return pool_tokens(tokens, self.pool), tokens

    def _block(self, kind: str, features: int, scanned: bool = False):
        """A ResidualBlock constructor (stride and name to be given), rematerialised as
        configured."""
        # static_argnums counts self: ResidualBlock.__call__(self, inputs, train).
        block_cls = stacks.remat_layer(ResidualBlock, self.remat, self.remat_policy,
                                       static_argnums=(2,), scanned=scanned)
        return functools.partial(block_cls, kind, features, bn_momentum=self.bn_momentum,
                                 zero_init_residual=self.zero_init_residual, **precision.of(self))

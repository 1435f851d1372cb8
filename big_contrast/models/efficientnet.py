"""EfficientNet image tower (Tan & Le 2019), B0..B7, L2 and CPU sizes: ALIGN's image encoder.

Options for small images: fewer stages, a stride-1 stem, a cap on the total stride, and
EfficientNetV2's Fused-MBConv blocks (Tan & Le 2021) in the first stages. It returns
(pooled, tokens) like the ViT tower, so configs can swap one for the other.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_contrast.models import precision, stacks
from big_contrast.models.image_layers import batch_norm, pixels_to_unit_range, pool_tokens


@dataclasses.dataclass(frozen=True)
class Scaling:
    """Compound-scaling coefficients of one variant and its native input resolution."""

    width: float
    depth: float
    resolution: int


VARIANTS = {
    "tiny": Scaling(0.25, 0.34, 32),
    "small": Scaling(1.0, 0.34, 32),  # B0's widths at a third of its depth
    "B0": Scaling(1.0, 1.0, 224),
    "B1": Scaling(1.0, 1.1, 240),
    "B2": Scaling(1.1, 1.2, 260),
    "B3": Scaling(1.2, 1.4, 300),
    "B4": Scaling(1.4, 1.8, 380),
    "B5": Scaling(1.6, 2.2, 456),
    "B6": Scaling(1.8, 2.6, 528),
    "B7": Scaling(2.0, 3.1, 600),
    "L2": Scaling(4.3, 5.3, 800),
}

# B0 stages: (expand ratio, output channels, repeats, first stride, kernel size).
B0_STAGES = (
    (1, 16, 1, 1, 3),
    (6, 24, 2, 2, 3),
    (6, 40, 2, 2, 5),
    (6, 80, 3, 2, 3),
    (6, 112, 3, 1, 5),
    (6, 192, 4, 2, 5),
    (6, 320, 1, 1, 3),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
SE_RATIO = 0.25


def scaling(variant: str) -> Scaling:
    """The variant's coefficients; raises ValueError naming the known variants."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNet variant {variant!r}; variants are {list(VARIANTS)}")
    return VARIANTS[variant]


def resolution(variant: str) -> int:
    """The variant's native (square) input resolution, e.g. 224 for 'B0'."""
    return scaling(variant).resolution


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """Scales a channel count by width, to a multiple of divisor, never below 90% of the target."""
    target = channels * width
    rounded = max(divisor, int(target + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * target:
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


# Conv kernels: normal with variance 2 / fan_out, fan_out = kh * kw * output channels. A
# depthwise kernel is [kh, kw, 1, C] in Flax and each filter sees one channel, so its fan-out
# is kh * kw; that is the fan-in Flax computes (its fan_out would also count the C filters).
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_DEPTHWISE_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
# Logical names of the channel axes: the block's outer width ('embed', split by FSDP) and its
# expanded inner width ('mlp', split by tensor parallelism), like a transformer's MLP. Every
# such channel count is a multiple of 8 (round_filters); squeeze-excite's small bottleneck
# (a quarter of the input channels) stays unsplit.
_STEM = ("embed",)
_EXPAND = ("embed", "mlp")
_PROJECT = ("mlp", "embed")
_SE_REDUCE = ("mlp", None)
_SE_EXPAND = (None, "mlp")


def _conv(features, kernel, name, channel_names, strides=1, use_bias=False, **dtypes):
    """A k x k convolution whose kernel [k, k, in, out] carries logical names for its channel
    axes (``channel_names``: (out,) or (in, out))."""
    names = (None,) * (4 - len(channel_names)) + tuple(channel_names)
    return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding="SAME",
                   use_bias=use_bias, name=name,
                   kernel_init=nn.with_logical_partitioning(_CONV_INIT, names),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                          names[-1:]),
                   **dtypes)


def depthwise_conv_shifted(x, kernel, stride: int):
    """Depthwise convolution with TF 'SAME' padding as a sum of kh * kw shifted, strided
    products. XLA:CPU lowers a grouped convolution to a slow generic loop; this form runs
    3-5x faster there (benchmarks/depthwise_conv.py) and gives the same numbers."""
    kh, kw = kernel.shape[:2]
    height, width = x.shape[1:3]
    out_h, out_w = -(-height // stride), -(-width // stride)
    pad_h = max((out_h - 1) * stride + kh - height, 0)
    pad_w = max((out_w - 1) * stride + kw - width, 0)
    x = jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2),
                    (0, 0)))
    out = 0
    for i in range(kh):
        for j in range(kw):
            window = x[:, i:i + (out_h - 1) * stride + 1:stride, j:j + (out_w - 1) * stride + 1:stride]
            out = out + window * kernel[i, j, 0]
    return out


class DepthwiseConv(nn.Module):
    """A depthwise k x k convolution (no bias), kernel [k, k, 1, C] as nn.Conv stores it (so
    checkpoints do not depend on the platform): shifted products on CPU, XLA's grouped
    convolution on accelerators, where it is the fast form."""

    kernel_size: int
    strides: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        kernel = self.param("kernel", nn.with_logical_partitioning(
            _DEPTHWISE_INIT, (None, None, None, "mlp")),
                            (self.kernel_size, self.kernel_size, 1, channels), self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if jax.default_backend() == "cpu":
            return depthwise_conv_shifted(x, kernel, self.strides)
        return jax.lax.conv_general_dilated(
            x, kernel, (self.strides, self.strides), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)


class DropConnect(nn.Module):
    """Per-example stochastic depth: each example's branch is zeroed with probability ``rate``
    and otherwise scaled by 1 / (1 - rate); the random numbers of nn.Dropout(rate,
    broadcast_dims=(1, 2, 3)) of the same name, but ``rate`` may be traced (scanned blocks
    each have their own). None: no drop-connect (and no 'dropout' rng needed)."""

    @nn.compact
    def __call__(self, x, rate, deterministic: bool):
        if deterministic or rate is None or (isinstance(rate, (int, float)) and rate == 0):
            return x
        keep_prob = 1.0 - rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), p=keep_prob,
                                    shape=(x.shape[0],) + (1,) * (x.ndim - 1))
        mask = jnp.broadcast_to(mask, x.shape)
        return jax.lax.select(mask, (x / keep_prob).astype(x.dtype), jnp.zeros_like(x))


class MBConv(nn.Module):
    """Inverted-residual block: expand 1x1 -> depthwise -> squeeze-excite -> project 1x1.

    ``fused`` makes it EfficientNetV2's Fused-MBConv: one full k x k convolution (with the
    block's stride) does the expansion and the spatial filtering, without squeeze-excite;
    with an expand ratio of 1 that convolution gives the output channels and nothing follows.
    The residual (with per-example drop-connect at ``drop_rate``, a call argument so that
    scanned blocks can each have their own; None: none) applies when the block keeps both the
    resolution and the channel count.
    """

    expand_ratio: int
    features: int
    stride: int
    kernel: int
    bn_momentum: float
    bn_epsilon: float
    fused: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, inputs, train: bool = False, drop_rate=None):
        dtypes = precision.of(self)
        bn = functools.partial(batch_norm, train, self.bn_momentum, self.bn_epsilon, **dtypes)
        conv = functools.partial(_conv, **dtypes)
        in_features = inputs.shape[-1]
        hidden = in_features * self.expand_ratio
        if self.fused:
            x = self._fused(inputs, conv, bn, hidden)
        else:
            x = self._depthwise_separable(inputs, conv, bn, hidden, dtypes)
        if self.stride == 1 and in_features == self.features:
            x = DropConnect(name="drop_connect")(x, drop_rate, deterministic=not train)
            x = x + inputs
        return x

    def _depthwise_separable(self, x, conv, bn, hidden, dtypes):
        """EfficientNet's (V1) branch: expand 1x1, depthwise k x k, squeeze-excite, project."""
        in_features = x.shape[-1]
        if self.expand_ratio != 1:
            x = conv(hidden, 1, "expand_conv", _EXPAND)(x)
            x = nn.swish(bn("expand_bn")(x))
        x = DepthwiseConv(self.kernel, self.stride, name="depthwise_conv", **dtypes)(x)
        x = nn.swish(bn("depthwise_bn")(x))

        squeezed = max(1, int(in_features * SE_RATIO))
        se = jnp.mean(x, axis=(1, 2), keepdims=True)
        se = nn.swish(conv(squeezed, 1, "se_reduce", _SE_REDUCE, use_bias=True)(se))
        se = conv(hidden, 1, "se_expand", _SE_EXPAND, use_bias=True)(se)
        x = x * nn.sigmoid(se)

        x = conv(self.features, 1, "project_conv", _PROJECT)(x)
        return bn("project_bn")(x)

    def _fused(self, x, conv, bn, hidden):
        """EfficientNetV2's Fused-MBConv branch: a full k x k convolution, then a 1x1
        projection unless the expand ratio is 1 (then the k x k convolution is the block)."""
        if self.expand_ratio == 1:
            # (named like the stem's kernel: its output channels split, its input ones whole)
            x = conv(self.features, self.kernel, "fused_conv", _STEM, strides=self.stride)(x)
            return nn.swish(bn("fused_bn")(x))
        x = conv(hidden, self.kernel, "expand_conv", _EXPAND, strides=self.stride)(x)
        x = nn.swish(bn("expand_bn")(x))
        x = conv(self.features, 1, "project_conv", _PROJECT)(x)
        return bn("project_bn")(x)


def _mbconv_body(block, x, train, drop_rate):
    """One scanned MBConv: the carry is the activation, the drop rate is per block."""
    return block(x, train, drop_rate), None


class EfficientNet(nn.Module):
    """Stem -> MBConv stages -> 1x1 head conv, scaled by variant ('B0'..'B7', 'L2', 'tiny').

    Attributes:
      variant: key of VARIANTS.
      drop_connect_rate: stochastic depth; block i of n (from 0) drops its residual branch with
        probability drop_connect_rate * i / n, drawn from the 'dropout' rng when train=True.
      bn_momentum, bn_epsilon: BatchNorm settings (running statistics live in 'batch_stats',
        so train=True needs mutable=['batch_stats']).
      remat: rematerialise each MBConv block in the backward pass (saves activation memory),
        keeping what remat_policy allows (stacks.REMAT_POLICIES).
      scan: run the blocks after each stage's first (identical: stride 1, same channels, each
        with its own drop rate) as one nn.scan named 'stage{s}_blocks', their variables
        stacked on a leading axis, instead of 'stage{s}_block1', 'stage{s}_block2', ...
      dtype, param_dtype: compute and parameter dtypes (models/precision.py).
      stem_stride: 2 as in the paper; 1 keeps the full resolution for small images (32 px
        inputs would otherwise shrink to a 1 x 1 map).
      pool: 'gap' (the paper), 'max' or 'gap_max' (image_layers.pool_tokens).
      max_stride: a cap on the total stride (DeepLab's "output stride"): a stage that would
        pass it keeps the resolution instead. None: the paper's 32, which leaves a 32 px image
        a 1 x 1 map where shapes are lost; 8 keeps a 4 x 4 map.
      stages: how many of B0's seven stages to build (the head convolution follows the last);
        None: all. A 32 px image needs only the first few.
      fused_stages: the first this many stages use Fused-MBConv blocks (EfficientNetV2): full
        convolutions learn the early, high-resolution filters faster than depthwise ones.
    Takes images [B, H, W, 3] (uint8, or floats already in [-1, 1]); returns
    (pooled [B, C_head], tokens [B, H' * W', C_head]) in dtype; tokens feed captioning
    decoders.
    """

    variant: str = "B0"
    drop_connect_rate: float = 0.2
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    scan: bool = False
    stem_stride: int = 2
    pool: str = "gap"
    max_stride: int | None = None
    stages: int | None = None
    fused_stages: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool = False):
        coeffs = scaling(self.variant)
        dtypes = precision.of(self)
        bn = functools.partial(batch_norm, train, self.bn_momentum, self.bn_epsilon, **dtypes)

        x = pixels_to_unit_range(images).astype(self.dtype)
        x = _conv(round_filters(STEM_CHANNELS, coeffs.width), 3, "stem_conv", _STEM,
                  strides=self.stem_stride, **dtypes)(x)
        x = nn.swish(bn("stem_bn")(x))

        stages = [(expand, round_filters(channels, coeffs.width),
                   round_repeats(repeats, coeffs.depth), stride, kernel)
                  for expand, channels, repeats, stride, kernel in B0_STAGES[:self.stages]]
        num_blocks = sum(stage[2] for stage in stages)
        index, total_stride = 0, self.stem_stride
        for s, (expand, channels, repeats, stride, kernel) in enumerate(stages):
            if self.max_stride is not None and total_stride * stride > self.max_stride:
                stride = 1
            total_stride *= stride
            rates = [self.drop_connect_rate * (index + r) / num_blocks for r in range(repeats)]
            index += repeats
            block = functools.partial(self._block(), fused=s < self.fused_stages)
            x = block(expand, channels, stride, kernel, name=f"stage{s}_block0")(x, train, rates[0])
            if self.scan and repeats > 1:
                rest = self._block(scanned=True)(expand, channels, 1, kernel,
                                                 fused=s < self.fused_stages,
                                                 name=f"stage{s}_blocks")
                scanned = stacks.scan_layers(_mbconv_body, repeats - 1, in_axes=(nn.broadcast, 0),
                                             collections=("params", "batch_stats"))
                # (None: no drop-connect, so training needs no 'dropout' rng)
                rest_rates = jnp.asarray(rates[1:], jnp.float32) if self.drop_connect_rate else None
                x, _ = scanned(rest, x, train, rest_rates)
                continue
            for r in range(1, repeats):
                x = block(expand, channels, 1, kernel, name=f"stage{s}_block{r}")(
                    x, train, rates[r])

        x = _conv(round_filters(HEAD_CHANNELS, coeffs.width), 1, "head_conv", _EXPAND,
                  **dtypes)(x)
        x = nn.swish(bn("head_bn")(x))
        batch, _, _, channels = x.shape
        tokens = x.reshape(batch, -1, channels)
        return pool_tokens(tokens, self.pool), tokens

    def _block(self, scanned: bool = False):
        """An MBConv constructor (its shape and name to be given), rematerialised as configured
        and with this tower's BatchNorm settings and dtypes."""
        # static_argnums counts self: MBConv.__call__(self, inputs, train, drop_rate); train is
        # a Python bool, and so is the drop rate except in a scan, which traces it.
        block_cls = stacks.remat_layer(MBConv, self.remat, self.remat_policy,
                                       static_argnums=(2,) if scanned else (2, 3), scanned=scanned)
        return functools.partial(block_cls, bn_momentum=self.bn_momentum,
                                 bn_epsilon=self.bn_epsilon, **precision.of(self))

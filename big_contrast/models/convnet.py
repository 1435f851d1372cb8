"""A small VGG-style convolutional image tower for CPU-scale runs (the demo's default).

On 32x32 images a few 3x3 conv stages learn shape far faster per FLOP than a patch-8 ViT:
locality is built in rather than learned. CoordConv channels (Liu et al. 2018) give the
network the absolute position that captions mention ("on the left", "at the top").
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from big_contrast.models import precision, transformer
from big_contrast.models.image_layers import batch_norm, pixels_to_unit_range, pool_tokens


def parse_stages(variant: str) -> list[tuple[int, int]]:
    """'16x1,32,64' -> [(16, 1), (32, 2), (64, 2)]: (width, convolutions) per stage, with
    2x2 max-pooling between stages; a stage without 'xN' has two convolutions."""
    stages = []
    for entry in variant.split(","):
        width, _, convs = entry.strip().partition("x")
        if not width.isdigit() or not (convs or "2").isdigit() or int(width) == 0:
            raise ValueError(f"ConvNet variant must list stage widths, e.g. '16,32,64' or "
                             f"'16x1,32,64' (width x convolutions); got {variant!r}")
        stages.append((int(width), int(convs or 2)))
    return stages


def _max_pool_2x2(x):
    """2x2 max-pooling by reshape: its gradient is a cheap mask, where XLA:CPU's
    reduce-window gradient (select-and-scatter) is slow (benchmarks/convnet_layers.py)."""
    batch, height, width, channels = x.shape
    return x.reshape(batch, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))


class ConvNet(nn.Module):
    """Stages of (3x3 conv -> BatchNorm -> ReLU) layers, 2x2 max-pooling between stages.

    Attributes:
      variant: comma-separated stage widths, each optionally 'xN' convolutions (default 2),
        e.g. '16,32,64' or '16x1,32,64'.
      stem: 'none' (the first stage sees full-resolution pixels) or 'space_to_depth' (each 2x2
        pixel block becomes one position with 4x the channels, so every stage runs at half the
        resolution: about 4x fewer FLOPs).
      norm: 'batch' (BatchNorm after each conv: statistics of the global batch under jit,
        running averages at evaluation, in the 'batch_stats' collection) or 'none'.
      coord_channels: append normalised (y, x) coordinates to the input pixels.
      bn_momentum: decay of the running batch statistics used at evaluation.
      pool: how the last feature map becomes one vector: 'gap', 'max' or 'gap_max'
        (image_layers.pool_tokens).
      dtype, param_dtype: compute and parameter dtypes (models/precision.py).
    Returns (pooled [B, C_last] (2 C_last for 'gap_max'), tokens [B, H'W', C_last]) in dtype.
    """

    variant: str = "16,32,64"
    stem: str = "none"
    norm: str = "batch"
    coord_channels: bool = True
    pool: str = "gap"
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool = False):
        stages = parse_stages(self.variant)
        if self.norm not in ("batch", "none"):
            raise ValueError(f"ConvNet norm must be 'batch' or 'none', got {self.norm!r}")
        x = pixels_to_unit_range(images)
        batch, height, width, _ = x.shape
        if self.coord_channels:
            grid = jnp.stack(jnp.meshgrid(jnp.linspace(-1, 1, height), jnp.linspace(-1, 1, width),
                                          indexing="ij"), axis=-1)
            x = jnp.concatenate([x, jnp.broadcast_to(grid, (batch, height, width, 2))], axis=-1)
        if self.stem == "space_to_depth":
            x = x.reshape(batch, height // 2, 2, width // 2, 2, -1).transpose(0, 1, 3, 2, 4, 5)
            x = x.reshape(batch, height // 2, width // 2, -1)
        elif self.stem != "none":
            raise ValueError(f"ConvNet stem must be 'none' or 'space_to_depth', got {self.stem!r}")
        x = x.astype(self.dtype)
        for stage, (features, convs) in enumerate(stages):
            if stage:
                x = _max_pool_2x2(x)
            for layer in range(convs):
                name = f"stage{stage}_conv{layer}"
                # Logical (input, output) channel names: FSDP splits 'embed', tensor
                # parallelism 'mlp'; the first convolution's few input channels stay whole.
                channels = (None, "embed") if stage == layer == 0 else ("embed", "mlp")
                x = nn.Conv(features, (3, 3), padding="SAME", name=name,
                            use_bias=self.norm == "none",
                            kernel_init=nn.with_logical_partitioning(
                                nn.initializers.he_normal(), (None, None, *channels)),
                            bias_init=transformer.zeros_init(channels[1:]),
                            **precision.of(self))(x)
                if self.norm == "batch":
                    x = batch_norm(train, momentum=self.bn_momentum, epsilon=1e-5,
                                   name=f"{name}_bn", **precision.of(self))(x)
                x = nn.relu(x)
        tokens = x.reshape(batch, -1, x.shape[-1])
        return pool_tokens(tokens, self.pool), tokens

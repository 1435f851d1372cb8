"""A small VGG-style convolutional image tower for CPU-scale runs (the demo's default).

On 32x32 images a few 3x3 conv stages learn shape far faster per FLOP than a patch-8 ViT:
locality is built in rather than learned. CoordConv channels (Liu et al. 2018) give the
network the absolute position that captions mention ("on the left", "at the top").
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from big_contrast.models import transformer
from big_contrast.models.vit import pixels_to_unit_range


def parse_channels(variant: str) -> list[int]:
    """'16,32,64' -> [16, 32, 64]: one stage per entry, 2x2 max-pool between stages."""
    try:
        channels = [int(c) for c in variant.split(",")]
    except ValueError:
        channels = []
    if not channels or min(channels) <= 0:
        raise ValueError(f"ConvNet variant must list stage widths, e.g. '16,32,64'; got {variant!r}")
    return channels


def _max_pool_2x2(x):
    """2x2 max-pooling by reshape: its gradient is a cheap mask, where XLA:CPU's
    reduce-window gradient (select-and-scatter) is slow (benchmarks/convnet_layers.py)."""
    batch, height, width, channels = x.shape
    return x.reshape(batch, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))


class ConvNet(nn.Module):
    """Stages of two (3x3 conv -> ReLU) layers, 2x2 max-pooling between stages.

    Attributes:
      variant: comma-separated stage widths, e.g. '16,32,64'.
      stem: 'none' (the first stage sees full-resolution pixels) or 'space_to_depth' (each 2x2
        pixel block becomes one position with 4x the channels, so every stage runs at half the
        resolution: about 4x fewer FLOPs).
      coord_channels: append normalised (y, x) coordinates to the input pixels.
    Returns (pooled [B, C_last] = mean over positions, tokens [B, H'W', C_last]).
    """

    variant: str = "16,32,64"
    stem: str = "none"
    coord_channels: bool = True
    convs_per_stage: int = 2

    @nn.compact
    def __call__(self, images, train: bool = False):
        del train  # no dropout or batch statistics
        channels = parse_channels(self.variant)
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
        for stage, features in enumerate(channels):
            if stage:
                x = _max_pool_2x2(x)
            for layer in range(self.convs_per_stage):
                x = nn.Conv(features, (3, 3), padding="SAME", name=f"stage{stage}_conv{layer}",
                            kernel_init=nn.with_logical_partitioning(
                                nn.initializers.he_normal(), (None, None, None, None)),
                            bias_init=transformer.zeros_init((None,)))(x)
                x = nn.relu(x)
        tokens = x.reshape(batch, -1, x.shape[-1])
        return tokens.mean(axis=1), tokens

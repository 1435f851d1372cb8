"""Pieces every image tower shares: pixel scaling, a logically-named BatchNorm and the pooling
of a convolutional feature map."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


def pixels_to_unit_range(images):
    """uint8 pixels -> float32 in [-1, 1]; float inputs are assumed already normalised."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 127.5 - 1.0
    return images


def batch_norm(train: bool, momentum: float, epsilon: float, name: str, dtype=jnp.float32,
               param_dtype=jnp.float32, zero_scale: bool = False) -> nn.BatchNorm:
    """BatchNorm with replicated, logically-named scale (zero-initialised with ``zero_scale``)
    and bias; statistics in 'batch_stats' (computed in float32 over the global batch under
    jit, running averages kept in float32 and used when not training), result in ``dtype``."""
    scale_init = nn.initializers.zeros_init() if zero_scale else nn.initializers.ones_init()
    return nn.BatchNorm(
        use_running_average=not train, momentum=momentum, epsilon=epsilon, name=name,
        dtype=dtype, param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(scale_init, (None,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)))


POOLS = ("gap", "max", "gap_max")


def pool_tokens(tokens, kind: str):
    """[B, N, C] feature-map positions -> [B, C] ('gap': mean, 'max') or [B, 2C] ('gap_max':
    both, concatenated: the mean keeps layout and background, the max the strongest local
    evidence, e.g. the notch that tells a small heart from a circle)."""
    if kind == "gap":
        return tokens.mean(axis=1)
    if kind == "max":
        return tokens.max(axis=1)
    if kind == "gap_max":
        return jnp.concatenate([tokens.mean(axis=1), tokens.max(axis=1)], axis=-1)
    raise ValueError(f"pool must be one of {POOLS}, got {kind!r}")

"""Projection heads that map a tower's pooled features into the shared embedding space."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from big_contrast.models import precision, transformer


PROJECTIONS = ("linear", "mlp", "none")


class Projection(nn.Module):
    """'linear' (bias-free matrix, CLIP/ALIGN), 'mlp' (Dense-GELU-Dense) or 'none' (identity)."""

    features: int
    kind: str = "linear"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.kind == "none":
            if x.shape[-1] != self.features:
                raise ValueError(f"projection 'none' needs tower width {x.shape[-1]} to equal "
                                 f"the embedding size {self.features}")
            return x
        if self.kind == "linear":
            return nn.Dense(self.features, use_bias=False, name="proj",
                            kernel_init=transformer.dense_init(("embed", None)),
                            **precision.of(self))(x)
        if self.kind == "mlp":
            h = nn.Dense(x.shape[-1], name="hidden", kernel_init=transformer.dense_init(("embed", "mlp")),
                         bias_init=transformer.zeros_init(("mlp",)), **precision.of(self))(x)
            h = nn.gelu(h, approximate=True)
            return nn.Dense(self.features, use_bias=False, name="proj",
                            kernel_init=transformer.dense_init(("mlp", None)),
                            **precision.of(self))(h)
        raise ValueError(f"unknown projection {self.kind!r}; choose 'linear', 'mlp' or 'none'")

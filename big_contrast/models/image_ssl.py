"""The network of image-only self-supervised objectives (SimCLR, SwAV): an image tower, a
projection MLP to L2-normalised embeddings and, for SwAV, a bank of unit-norm prototypes."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_contrast.models import precision, transformer
from big_contrast.models.image_layers import batch_norm
from big_contrast.models.two_tower import l2_normalise


class ProjectionMLP(nn.Module):
    """``layers`` dense layers: (Dense -> BatchNorm -> ReLU) x (layers - 1), then Dense to
    ``features`` (SimCLR's and SwAV's heads; batch statistics of the global batch under jit)."""

    hidden_dim: int
    features: int
    layers: int = 2
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        dtypes = precision.of(self)
        for i in range(self.layers - 1):
            x = nn.Dense(self.hidden_dim, use_bias=False, name=f"hidden{i}",
                         kernel_init=transformer.dense_init(("embed", "mlp")), **dtypes)(x)
            x = batch_norm(train, momentum=self.bn_momentum, epsilon=1e-5, name=f"hidden{i}_bn",
                           **dtypes)(x)
            x = nn.relu(x)
        return nn.Dense(self.features, name="out",
                        kernel_init=transformer.dense_init(("mlp", None)),
                        bias_init=transformer.zeros_init((None,)), **dtypes)(x)


def _unit_rows(rng, shape, dtype=jnp.float32):
    """Prototype rows drawn at random and scaled to unit norm (SwAV's starting point)."""
    return l2_normalise(jax.random.normal(rng, shape)).astype(dtype)


class MultiCropNet(nn.Module):
    """Image tower -> projection -> L2-normalised embedding (-> prototype scores).

    ``__call__`` takes the crop groups of a batch (one array per resolution, [N, S, S, 3]),
    runs each group through the tower once (tower batch statistics per resolution), and the
    concatenated features through the head once, as SwAV's grouped forward does. Returns
    {'embeddings': [N_total, D] in group order, 'scores': embeddings @ prototypes.T when
    num_prototypes > 0}, both float32; the head computes in ``dtype``.
    """

    image_tower: nn.Module
    hidden_dim: int
    embed_dim: int
    head_layers: int = 2
    num_prototypes: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.head = ProjectionMLP(self.hidden_dim, self.embed_dim, self.head_layers,
                                  **precision.of(self))
        if self.num_prototypes:
            self.prototypes = self.param(
                "prototypes", nn.with_logical_partitioning(_unit_rows, ("vocab", None)),
                (self.num_prototypes, self.embed_dim), self.param_dtype)

    def features(self, images, train: bool = False):
        """The tower's pooled features [N, C]: what evaluators probe (before the head)."""
        pooled, _ = self.image_tower(images, train=train)
        return pooled

    def embed(self, images, train: bool = False):
        return l2_normalise(self.head(self.features(images, train), train))

    def __call__(self, groups, train: bool = False):
        features = jnp.concatenate([self.features(images, train) for images in groups])
        embeddings = l2_normalise(self.head(features, train))
        out = {"embeddings": embeddings}
        if self.num_prototypes:
            out["scores"] = embeddings @ self.prototypes.astype(jnp.float32).T
        return out


def renormalise_prototypes(params):
    """SwAV's projection of the prototypes back onto the unit sphere after each update."""
    if "prototypes" not in params:
        return params
    prototypes = params["prototypes"]
    return {**params, "prototypes": l2_normalise(prototypes).astype(prototypes.dtype)}

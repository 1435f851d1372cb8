"""GradCache (Gao et al. 2021): a contrastive loss over a global batch whose activations do not
fit in memory, with every negative kept.

Each device's batch is cut into ``micro_batches`` slices. Pass 1 runs the towers over every
slice without gradients and keeps only the per-example outputs (embeddings). The loss and its
gradients with respect to those outputs are taken on the whole global batch. Pass 2 runs each
slice through the towers again and pulls the output gradients back into the parameters, so
activations are held for one slice at a time. Slice k draws its dropout from
fold_in(step rng, k) in both passes, so the two passes see the same network.

Towers with batch norm are refused: their examples are not independent (a slice's statistics
differ from the whole batch's), so the result would silently differ from one big batch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from big_contrast.config import ConfigError
from big_contrast.objectives.base import PerExampleObjective
from big_contrast.sharding import BATCH_AXES


def check_supported(objective, model_state_shardings, global_batch: int, micro_batches: int,
                    mesh) -> None:
    """Raises ConfigError unless GradCache with ``micro_batches`` slices can train this model."""
    name = type(objective).__name__
    if not isinstance(objective, PerExampleObjective):
        raise ConfigError(f"grad_cache.micro_batches = {micro_batches}, but {name}'s loss is not "
                          "a function of per-example outputs (GradCache serves the image-text "
                          "objectives: contrastive, coca)")
    if jax.tree.leaves(model_state_shardings):
        raise ConfigError(
            f"grad_cache.micro_batches = {micro_batches}, but this model keeps "
            f"{', '.join(sorted(model_state_shardings))} (batch norm): its examples are not "
            "independent, so micro-batches would not reproduce the big batch. Use towers "
            "without batch norm (e.g. model.image.type 'vit', or convnet with norm 'none')")
    shards = batch_shards(mesh)
    per_shard = global_batch // shards
    if per_shard % micro_batches:
        raise ConfigError(f"grad_cache.micro_batches = {micro_batches} must divide each batch "
                          f"shard's {per_shard} examples (batch_size {global_batch} over "
                          f"{shards} shards)")


def batch_shards(mesh) -> int:
    """How many pieces the batch dimension is cut into over the mesh."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def _split(tree, micro_batches: int, shards: int, sharding):
    """[B, ...] -> [micro_batches, B / micro_batches, ...]: slice k takes the k-th run of rows
    of every batch shard, so each slice stays spread evenly over the devices."""
    def split(x):
        rows = x.shape[0] // (shards * micro_batches)
        x = x.reshape(shards, micro_batches, rows, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(
            x.reshape(micro_batches, shards * rows, *x.shape[3:]), sharding)
    return jax.tree.map(split, tree)


def _join(tree, shards: int):
    """The inverse of _split: rows back in their global-batch order."""
    def join(x):
        micro_batches, rows = x.shape[0], x.shape[1] // shards
        x = x.reshape(micro_batches, shards, rows, *x.shape[2:]).swapaxes(0, 1)
        return x.reshape(micro_batches * shards * rows, *x.shape[3:])
    return jax.tree.map(join, tree)


def value_and_grad(objective: PerExampleObjective, micro_batches: int, mesh):
    """A drop-in for jax.value_and_grad(objective.loss_fn, has_aux=True) that runs the towers
    micro-batch by micro-batch (GradCache). model_state must be empty (check_supported)."""
    shards = batch_shards(mesh)
    sliced = NamedSharding(mesh, P(None, BATCH_AXES))

    def forward(params, model_state, batch, rng, step):
        outputs, _ = objective.per_example_outputs(params, model_state, batch, rng, step)
        return outputs

    def grad_fn(params, model_state, batch, rng, step):
        slices = _split(batch, micro_batches, shards, sliced)
        rngs = jax.vmap(lambda k: jax.random.fold_in(rng, k))(jnp.arange(micro_batches))
        outputs = jax.lax.map(lambda xs: forward(params, model_state, *xs, step), (slices, rngs))
        outputs = jax.lax.stop_gradient(_join(outputs, shards))
        (loss, metrics), (grads, output_grads) = jax.value_and_grad(
            objective.loss_from_outputs, argnums=(0, 1), has_aux=True)(params, outputs, step)

        def accumulate(total, xs):
            batch_slice, slice_rng, cotangent = xs
            _, pull_back = jax.vjp(
                lambda p: forward(p, model_state, batch_slice, slice_rng, step), params)
            (slice_grads,) = pull_back(cotangent)
            return jax.tree.map(jnp.add, total, slice_grads), None

        cotangents = _split(output_grads, micro_batches, shards, sliced)
        grads, _ = jax.lax.scan(accumulate, grads, (slices, rngs, cotangents))
        return (loss, (metrics, model_state)), grads

    return grad_fn

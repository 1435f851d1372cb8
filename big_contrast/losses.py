"""Contrastive and captioning losses as pure functions of arrays (imports only jax).

Global-batch losses take an optional ``axis_name``. Called inside ``jax.shard_map`` over the
data axes, each device scores only its local rows against the gathered columns, so the
similarity matrix costs O(B_local * B_global) memory, while the value and the gradients equal
those of the single-device loss on the whole global batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _gather_columns(x, y, axis_name):
    """Returns (all_x, all_y, offset of this device's rows in the global batch)."""
    if axis_name is None:
        return x, y, 0
    all_x = jax.lax.all_gather(x, axis_name, tiled=True)
    all_y = jax.lax.all_gather(y, axis_name, tiled=True)
    return all_x, all_y, jax.lax.axis_index(axis_name) * x.shape[0]


def _summed_cross_entropy(logits, labels, label_smoothing):
    """Sum over rows of CE(softmax(logits), smoothed one-hot(labels))."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    if label_smoothing:
        uniform = -log_probs.mean(axis=-1)
        nll = (1.0 - label_smoothing) * nll + label_smoothing * uniform
    return nll.sum()


def softmax_contrastive(x, y, scale, *, axis_name=None, label_smoothing: float = 0.0):
    """Symmetric InfoNCE of CLIP / ALIGN.

    Args:
      x, y: L2-normalised embeddings [B, D] (the local shard under ``shard_map``); row i of x
        and row i of y are a positive pair, every other row of the global batch a negative.
      scale: the already-exponentiated logit multiplier (1 / temperature), a scalar.
      axis_name: mesh axis name(s) of the batch; None for a single device / plain jit.
      label_smoothing: weight of the uniform distribution mixed into the one-hot targets.

    Returns:
      Scalar: mean over the global batch of (CE(x -> y) + CE(y -> x)) / 2, with
      logits = scale * x @ y.T.
    """
    x = x.astype(jnp.float32)
    y = y.astype(jnp.float32)
    all_x, all_y, offset = _gather_columns(x, y, axis_name)
    labels = offset + jnp.arange(x.shape[0])
    logits_xy = scale * x @ all_y.T  # local x rows against every y in the global batch
    logits_yx = scale * y @ all_x.T
    total = (_summed_cross_entropy(logits_xy, labels, label_smoothing)
             + _summed_cross_entropy(logits_yx, labels, label_smoothing))
    loss = total / (2.0 * all_x.shape[0])
    return loss if axis_name is None else jax.lax.psum(loss, axis_name)


def caption_loss(logits, targets, mask, *, label_smoothing: float = 0.0):
    """Captioning (next-token) cross-entropy, averaged over the non-padding target tokens.

    Args:
      logits: [B, T, V] next-token logits; targets: [B, T] token ids; mask: [B, T], true where
        the target is a real token (EOS included, padding excluded).
      label_smoothing: weight of the uniform distribution over the vocabulary in the targets.

    Returns:
      Scalar: sum of the masked token losses / number of masked tokens. Under jit with a
      batch-sharded input the sums run over the global batch, so every token weighs the same
      whichever device holds it.
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * log_probs.mean(axis=-1)
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)

"""softmax_contrastive and caption_loss against independent float64 numpy derivations (the
contrastive one on one device and sharded over 8, value and gradients)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from big_contrast.losses import caption_loss, softmax_contrastive


def _normalised(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_clip_loss(x, y, scale, smoothing=0.0):
    """Symmetric InfoNCE in float64: mean over both directions of the row-wise cross-entropy."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = len(x)

    def directional(a, b):
        logits = scale * a @ b.T
        logits = logits - logits.max(axis=1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        target = np.eye(n) * (1 - smoothing) + smoothing / n
        return -(target * log_p).sum(axis=1).mean()

    return 0.5 * (directional(x, y) + directional(y, x))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_matches_numpy_float64(smoothing):
    rng = np.random.default_rng(0)
    x, y = _normalised(rng, 16, 8), _normalised(rng, 16, 8)
    got = softmax_contrastive(jnp.float32(x), jnp.float32(y), 14.3, label_smoothing=smoothing)
    np.testing.assert_allclose(float(got), numpy_clip_loss(x, y, 14.3, smoothing), rtol=1e-5)


def test_gradient_matches_numpy_finite_differences():
    rng = np.random.default_rng(1)
    x, y = _normalised(rng, 6, 4), _normalised(rng, 6, 4)
    grad = jax.grad(lambda a: softmax_contrastive(a, jnp.float32(y), 5.0))(jnp.float32(x))
    eps, numeric = 1e-6, np.zeros_like(x)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            plus, minus = x.copy(), x.copy()
            plus[i, j] += eps
            minus[i, j] -= eps
            numeric[i, j] = (numpy_clip_loss(plus, y, 5.0) - numpy_clip_loss(minus, y, 5.0)) / (2 * eps)
    np.testing.assert_allclose(np.asarray(grad), numeric, atol=2e-5)


def test_perfect_alignment_is_cheaper_than_random():
    rng = np.random.default_rng(2)
    x = _normalised(rng, 32, 16)
    aligned = softmax_contrastive(jnp.float32(x), jnp.float32(x), 50.0)
    shuffled = softmax_contrastive(jnp.float32(x), jnp.float32(x[::-1]), 50.0)
    assert float(aligned) < 0.05 < np.log(32) * 0.5 < float(shuffled)


@pytest.mark.parametrize("axes", [("data",), ("data", "fsdp")])
def test_sharded_value_and_gradients_equal_single_device(axes):
    """8 devices, each scoring its local rows against gathered columns == one device."""
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    rng = np.random.default_rng(3)
    x, y = jnp.float32(_normalised(rng, 32, 8)), jnp.float32(_normalised(rng, 32, 8))
    scale = jnp.float32(12.0)

    def sharded_loss(a, b, s):
        fn = functools.partial(softmax_contrastive, axis_name=axes, label_smoothing=0.1)
        return jax.shard_map(fn, mesh=mesh, in_specs=(P(axes), P(axes), P()), out_specs=P())(a, b, s)

    def dense_loss(a, b, s):
        return softmax_contrastive(a, b, s, label_smoothing=0.1)

    value, grads = jax.jit(jax.value_and_grad(sharded_loss, argnums=(0, 1, 2)))(x, y, scale)
    ref_value, ref_grads = jax.value_and_grad(dense_loss, argnums=(0, 1, 2))(x, y, scale)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-6)
    np.testing.assert_allclose(float(value), numpy_clip_loss(x, y, 12.0, 0.1), rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_sharded_similarity_is_local_rows_by_global_columns():
    """The per-device logits block is [B_local, B_global], never [B_global, B_global]."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    x = jnp.ones((64, 4), jnp.float32) / 2.0
    fn = functools.partial(softmax_contrastive, axis_name="data")
    lowered = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P("data"), P("data"), P()),
                                    out_specs=P())).lower(x, x, jnp.float32(1.0))
    text = lowered.as_text()
    assert "8x64" in text and "64x64" not in text


def numpy_caption_loss(logits, targets, mask, smoothing=0.0):
    """Token cross-entropy in float64 against (1 - s) one-hot + s uniform targets, averaged
    over the tokens where mask is true."""
    logits = np.asarray(logits, np.float64)
    vocab = logits.shape[-1]
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    target = np.eye(vocab)[targets] * (1 - smoothing) + smoothing / vocab
    per_token = -(target * log_p).sum(axis=-1)
    return (per_token * mask).sum() / mask.sum()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_caption_loss_matches_numpy_float64_and_ignores_padding(smoothing):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 6, 11)) * 3
    targets = rng.integers(3, 11, size=(4, 6))
    lengths = np.array([6, 4, 1, 3])
    mask = np.arange(6)[None, :] < lengths[:, None]
    targets = np.where(mask, targets, 0)  # padding after each caption
    got = caption_loss(jnp.float32(logits), jnp.int32(targets), jnp.asarray(mask),
                       label_smoothing=smoothing)
    np.testing.assert_allclose(float(got), numpy_caption_loss(logits, targets, mask, smoothing),
                               rtol=1e-5)
    # Whatever the logits at padded positions, the loss is the same.
    noisy = np.where(mask[..., None], logits, rng.normal(size=logits.shape) * 100)
    again = caption_loss(jnp.float32(noisy), jnp.int32(targets), jnp.asarray(mask),
                         label_smoothing=smoothing)
    np.testing.assert_allclose(float(again), float(got), rtol=1e-6)


def test_caption_loss_is_a_token_mean_over_the_global_batch():
    """Sharded over 8 devices under jit, every token weighs the same whichever device holds it
    (a mean of per-device means would weigh a device with few tokens more)."""
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(8, 5, 7))
    targets = rng.integers(3, 7, size=(8, 5))
    mask = np.arange(5)[None, :] < rng.integers(1, 6, size=(8, 1))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    sharded = [jax.device_put(a, jax.NamedSharding(mesh, P("data")))
               for a in (jnp.float32(logits), jnp.int32(targets), jnp.asarray(mask))]
    got = jax.jit(caption_loss)(*sharded)
    np.testing.assert_allclose(float(got), numpy_caption_loss(logits, targets, mask), rtol=1e-5)

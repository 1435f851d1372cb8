"""The global-batch losses that stay below O(B_local * B_global) memory: SigLIP's sigmoid loss
(dense on one device, a ppermute ring when sharded) and the blockwise softmax InfoNCE, against
float64 numpy derivations and the dense single-device loss (values and gradients)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from big_contrast.losses import sigmoid_contrastive, softmax_contrastive
from tests.test_losses import numpy_clip_loss

ONE_AXIS = ((8,), ("data",), "data")
TWO_AXES = ((4, 2), ("data", "fsdp"), ("data", "fsdp"))


def _normalised(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_sigmoid_loss(x, y, scale, bias):
    """SigLIP in float64: Σ over all pairs of log(1 + exp(−z · logit)) / B, z = 2·I − 1."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    z = 2.0 * np.eye(len(x)) - 1.0
    return np.logaddexp(0.0, -z * (scale * x @ y.T + bias)).sum() / len(x)


def _num_args(loss):
    return 4 if loss is sigmoid_contrastive else 3


@functools.lru_cache(maxsize=None)
def _value_and_grad(loss, **loss_kwargs):
    """jit(value_and_grad) of the single-device ``loss`` w.r.t. every argument; shared by tests."""
    return jax.jit(jax.value_and_grad(functools.partial(loss, **loss_kwargs),
                                      argnums=tuple(range(_num_args(loss)))))


@functools.lru_cache(maxsize=None)
def _sharded_value_and_grad(loss, mesh_layout, **loss_kwargs):
    """jit(value_and_grad) of ``loss`` under shard_map over the batch axes of a fake-CPU mesh,
    w.r.t. every argument (x and y sharded by rows, the scalars replicated); shared by tests."""
    shape, names, axes = mesh_layout
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))
    sharded = jax.shard_map(functools.partial(loss, axis_name=axes, **loss_kwargs), mesh=mesh,
                            in_specs=(P(axes), P(axes)) + (P(),) * (_num_args(loss) - 2),
                            out_specs=P())
    return jax.jit(jax.value_and_grad(sharded, argnums=tuple(range(_num_args(loss)))))


def _assert_all_close(got, want, rtol=1e-5):
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol,
                                   atol=rtol * float(np.max(np.abs(w))))


def test_sigmoid_matches_numpy_float64():
    rng = np.random.default_rng(0)
    x, y = _normalised(rng, 12, 8), _normalised(rng, 12, 8)
    for scale, bias in [(10.0, -10.0), (3.0, 0.5)]:
        got = sigmoid_contrastive(jnp.float32(x), jnp.float32(y), scale, bias)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(float(got), numpy_sigmoid_loss(x, y, scale, bias), rtol=1e-5)
    # Aligned pairs with a confident scale cost less than shuffled ones.
    aligned = sigmoid_contrastive(jnp.float32(x), jnp.float32(x), 20.0, -10.0)
    shuffled = sigmoid_contrastive(jnp.float32(x), jnp.float32(x[::-1]), 20.0, -10.0)
    assert float(aligned) < float(shuffled)


def test_sigmoid_gradients_match_numpy_finite_differences():
    rng = np.random.default_rng(1)
    args = [_normalised(rng, 6, 4), _normalised(rng, 6, 4), np.float64(5.0), np.float64(-2.0)]
    _, grads = _value_and_grad(sigmoid_contrastive)(*[jnp.float32(a) for a in args])
    eps = 1e-6
    for k, (arg, grad) in enumerate(zip(args, grads)):
        numeric = np.zeros(np.shape(arg))
        for index in np.ndindex(numeric.shape):
            plus = [np.array(a, np.float64, copy=True) for a in args]
            minus = [np.array(a, np.float64, copy=True) for a in args]
            plus[k][index] += eps
            minus[k][index] -= eps
            numeric[index] = (numpy_sigmoid_loss(*plus) - numpy_sigmoid_loss(*minus)) / (2 * eps)
        np.testing.assert_allclose(np.asarray(grad), numeric, atol=2e-5)


@pytest.mark.parametrize("mesh_layout", [ONE_AXIS, TWO_AXES], ids=["data", "data+fsdp"])
def test_ring_sigmoid_sharded_equals_dense_and_gathers_nothing(mesh_layout):
    """8 devices (axis "data", or the tuple ("data", "fsdp") of a 4x2 mesh), 3 rows each:
    value and gradients w.r.t. x, y, scale and bias equal the dense single-device loss; the
    program has collective permutes and no all-gather, and no [B_local, B_global] block."""
    rng = np.random.default_rng(2)
    x, y = jnp.float32(_normalised(rng, 24, 8)), jnp.float32(_normalised(rng, 24, 8))
    args = (x, y, jnp.float32(10.0), jnp.float32(-5.0))
    fn = _sharded_value_and_grad(sigmoid_contrastive, mesh_layout)
    text = fn.lower(*args).as_text()
    assert "collective_permute" in text and "all_gather" not in text
    assert "3x24x" not in text and "3x3xf32" in text
    value, grads = fn(*args)
    ref_value, ref_grads = _value_and_grad(sigmoid_contrastive)(*args)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
    np.testing.assert_allclose(float(value), numpy_sigmoid_loss(x, y, 10.0, -5.0), rtol=1e-5)
    _assert_all_close(grads, ref_grads)


@pytest.mark.parametrize("block_size, smoothing", [(3, 0.1), (5, 0.0), (16, 0.1)])
def test_blockwise_softmax_equals_dense_on_one_device(block_size, smoothing):
    """10 columns in blocks of 3 (3 + 3 + 3 + 1), of 5 (even) and of 16 (one block of 10)."""
    rng = np.random.default_rng(3)
    x, y = jnp.float32(_normalised(rng, 10, 8)), jnp.float32(_normalised(rng, 10, 8))
    scale = jnp.float32(14.3)
    value, grads = _value_and_grad(softmax_contrastive, block_size=block_size,
                                   label_smoothing=smoothing)(x, y, scale)
    ref_value, ref_grads = _value_and_grad(softmax_contrastive, label_smoothing=smoothing)(
        x, y, scale)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-6)
    np.testing.assert_allclose(float(value), numpy_clip_loss(x, y, 14.3, smoothing), rtol=1e-5)
    _assert_all_close(grads, ref_grads)


@pytest.mark.parametrize("mesh_layout, block_size, smoothing",
                         [(ONE_AXIS, 5, 0.0), (TWO_AXES, 7, 0.1)], ids=["data", "data+fsdp"])
def test_blockwise_softmax_sharded_equals_dense(mesh_layout, block_size, smoothing):
    """24 gathered columns in uneven blocks (5: 4 x 5 + 4; 7: 3 x 7 + 3), 3 local rows per
    device: value and gradients equal the dense loss, and no [3, 24] logits exist."""
    rng = np.random.default_rng(4)
    x, y = jnp.float32(_normalised(rng, 24, 8)), jnp.float32(_normalised(rng, 24, 8))
    scale = jnp.float32(12.0)
    fn = _sharded_value_and_grad(softmax_contrastive, mesh_layout, block_size=block_size,
                                 label_smoothing=smoothing)
    text = fn.lower(x, y, scale).as_text()
    assert "3x24x" not in text and f"3x{block_size}xf32" in text
    dense_text = _sharded_value_and_grad(softmax_contrastive, mesh_layout).lower(
        x, y, scale).as_text()
    assert "3x24xf32" in dense_text  # the dense path's local logits, which blocks avoid
    value, grads = fn(x, y, scale)
    ref_value, ref_grads = _value_and_grad(softmax_contrastive, label_smoothing=smoothing)(
        x, y, scale)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
    np.testing.assert_allclose(float(value), numpy_clip_loss(x, y, 12.0, smoothing), rtol=1e-5)
    _assert_all_close(grads, ref_grads)


def test_bfloat16_inputs_give_float32_results():
    """bfloat16 embeddings are cast first: the sharded ring sigmoid and the blockwise softmax
    are float32, finite and equal to the float32 losses of the same rounded values."""
    rng = np.random.default_rng(5)
    x = jnp.bfloat16(_normalised(rng, 24, 8))
    y = jnp.bfloat16(_normalised(rng, 24, 8))
    x32, y32 = x.astype(jnp.float32), y.astype(jnp.float32)
    scale, bias = jnp.float32(10.0), jnp.float32(-5.0)
    for value, grads, want in [
            (*_sharded_value_and_grad(sigmoid_contrastive, ONE_AXIS)(x, y, scale, bias),
             _value_and_grad(sigmoid_contrastive)(x32, y32, scale, bias)[0]),
            (*_value_and_grad(softmax_contrastive, block_size=5)(x, y, scale),
             _value_and_grad(softmax_contrastive, label_smoothing=0.0)(x32, y32, scale)[0])]:
        assert value.dtype == jnp.float32
        np.testing.assert_allclose(float(value), float(want), rtol=1e-5)
        assert grads[0].dtype == jnp.bfloat16
        assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads)


@pytest.mark.parametrize("block_size", [-1, 2.5, True, "8"])
def test_block_size_must_be_a_non_negative_int(block_size):
    x = jnp.ones((4, 2), jnp.float32)
    with pytest.raises(ValueError, match="block_size must be a non-negative int"):
        softmax_contrastive(x, x, 1.0, block_size=block_size)


def test_sigmoid_rejects_mismatched_embeddings():
    with pytest.raises(ValueError, match=r"one \[B, D\] shape"):
        sigmoid_contrastive(jnp.ones((4, 2)), jnp.ones((3, 2)), 1.0, 0.0)

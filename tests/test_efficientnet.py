"""EfficientNet tower: parameter counts (vs Keras), shapes, batch stats, drop-connect, learning."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from big_contrast.models import efficientnet
from big_contrast.models.efficientnet import EfficientNet
from tests.helpers import parameter_count, random_images

# Keras EfficientNetB*(include_top=True) totals; without the 7 statistics of its input
# Normalization layer and its 1000-way classifier (head_channels * 1000 + 1000) they are the
# backbone's params + batch_stats. B0: 5,330,571 -> 4,049,564, of which 4,007,548 trainable.
KERAS_TOTALS = {"B3": 12_320_535, "B7": 66_658_687}
KERAS_B0_TRAINABLE_NO_TOP = 4_007_548  # conv kernels, SE biases, BN scale and bias
TINY_HEAD = efficientnet.round_filters(efficientnet.HEAD_CHANNELS, 0.25)

# Compile time dominates on CPU: 'rbg' keys compile faster than threefry (the model does not
# care which), and XLA's lowest backend optimisation level compiles several times faster.
# (An option must exist in both jax 0.10 and 0.12: 'xla_cpu_use_fusion_emitters' does not.)
KEY = jax.random.key(0, impl="rbg")
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _shapes(variant, size):
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.uint8)
    return jax.eval_shape(lambda x: EfficientNet(variant).init(KEY, x), images)


@pytest.fixture(scope="module")
def tiny():
    model = EfficientNet("tiny")
    variables = _jit(model.init)(KEY, random_images(4))
    return model, variables


@pytest.fixture(scope="module")
def apply_train():
    def apply(model, variables, images, rng):
        return model.apply(variables, images, train=True, mutable=["batch_stats"],
                           rngs={"dropout": rng})
    return _jit(apply, static_argnums=0)


def test_b0_matches_keras_without_top():
    shapes = _shapes("B0", 224)
    assert parameter_count(shapes["params"]) == KERAS_B0_TRAINABLE_NO_TOP
    assert parameter_count(shapes["batch_stats"]) == 42_016  # running mean + var of every BN
    assert parameter_count(shapes) == 4_049_564
    # ~5.3M of the paper = backbone + 1280 x 1000 classifier.
    assert abs(parameter_count(shapes["params"]) + 1280 * 1000 + 1000 - 5.3e6) / 5.3e6 < 0.01


@pytest.mark.parametrize("variant", ["B3", "B7"])
def test_scaled_variants_match_keras(variant):
    head = efficientnet.round_filters(efficientnet.HEAD_CHANNELS,
                                      efficientnet.VARIANTS[variant].width)
    expected = KERAS_TOTALS[variant] - 7 - (head * 1000 + 1000)
    assert parameter_count(_shapes(variant, 32)) == expected  # counts do not depend on resolution


def test_l2_size():
    params = parameter_count(_shapes("L2", 64)["params"])
    assert 400e6 < params < 520e6  # Noisy Student: ~480M with its 5504 x 1000 classifier
    assert efficientnet.resolution("L2") == 800
    assert efficientnet.resolution("B0") == 224


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown EfficientNet variant"):
        efficientnet.resolution("B9")


def test_kernels_carry_logical_channel_names():
    shapes = _shapes("B0", 32)
    boxed = jax.tree_util.tree_leaves_with_path(
        shapes["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    names = {"/".join(str(k.key) for k in path): p.names for path, p in boxed}
    assert all(len(n) == shapes_leaf.value.ndim for n, (_, shapes_leaf) in zip(names.values(), boxed))
    assert names["stem_conv/kernel"] == (None, None, None, "embed")
    block = "stage1_block0"  # expand -> depthwise -> squeeze-excite -> project
    assert names[f"{block}/expand_conv/kernel"] == (None, None, "embed", "mlp")
    assert names[f"{block}/depthwise_conv/kernel"] == (None, None, None, "mlp")
    assert names[f"{block}/se_reduce/kernel"] == (None, None, "mlp", None)
    assert names[f"{block}/se_expand/bias"] == ("mlp",)
    assert names[f"{block}/project_conv/kernel"] == (None, None, "mlp", "embed")
    assert names["head_conv/kernel"] == (None, None, "embed", "mlp")


def test_tiny_forward_and_batch_stats(tiny, apply_train):
    model, variables = tiny
    images = random_images(4)
    assert variables["params"]["stem_conv"]["kernel"].value.shape == (3, 3, 3, 8)

    apply_eval = _jit(lambda v, x: model.apply(v, x, mutable=["batch_stats"]))
    (pooled, tokens), stats = apply_eval(variables, images)
    assert pooled.shape == (4, TINY_HEAD)
    assert tokens.shape == (4, 1, TINY_HEAD)  # total stride 32: a 32x32 image is one token
    assert np.all(np.isfinite(pooled)) and np.all(np.isfinite(tokens))
    np.testing.assert_allclose(tokens.mean(axis=1), pooled, rtol=1e-6)
    (again, _), _ = apply_eval(variables, images)
    np.testing.assert_array_equal(again, pooled)
    jax.tree.map(np.testing.assert_array_equal, stats, {"batch_stats": variables["batch_stats"]})

    (train_pooled, _), stats = apply_train(model, variables, images, KEY)
    assert np.all(np.isfinite(train_pooled))
    moved = jax.tree.map(lambda new, old: np.abs(new - old).max() > 0,
                         stats["batch_stats"], variables["batch_stats"])
    assert all(jax.tree.leaves(moved)), moved  # every running mean and variance
    # Momentum 0.99: the stem's statistics move 1% of the way to the batch's.
    kernel = variables["params"]["stem_conv"]["kernel"].value
    stem = jax.lax.conv_general_dilated(
        images.astype(jnp.float32) / 127.5 - 1.0, kernel, (2, 2), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    new = stats["batch_stats"]["stem_bn"]
    np.testing.assert_allclose(new["mean"], 0.01 * stem.mean(axis=(0, 1, 2)), atol=1e-6)
    np.testing.assert_allclose(new["var"], 0.99 + 0.01 * stem.var(axis=(0, 1, 2)), atol=1e-5)


def test_drop_connect(tiny, apply_train):
    model, variables = tiny
    images = random_images(4)
    rng_a, rng_b = jax.random.split(jax.random.key(1, impl="rbg"))
    (a, _), _ = apply_train(model, variables, images, rng_a)
    (a_again, _), _ = apply_train(model, variables, images, rng_a)
    (b, _), _ = apply_train(model, variables, images, rng_b)
    np.testing.assert_array_equal(a, a_again)
    assert np.abs(a - b).max() > 1e-4

    no_drop = EfficientNet("tiny", drop_connect_rate=0.0)
    (a, _), _ = apply_train(no_drop, variables, images, rng_a)
    (b, _), _ = apply_train(no_drop, variables, images, rng_b)
    np.testing.assert_array_equal(a, b)


def test_remat_matches(tiny, apply_train):
    model, variables = tiny
    images = random_images(4)
    (plain, _), plain_stats = apply_train(model, variables, images, KEY)
    (rematted, _), remat_stats = apply_train(EfficientNet("tiny", remat=True), variables,
                                             images, KEY)
    np.testing.assert_allclose(rematted, plain, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 remat_stats, plain_stats)


def test_learns_red_vs_blue(tiny):
    model, variables = tiny
    red = np.zeros((4, 32, 32, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((4, 32, 32, 3), np.uint8)
    blue[..., 2] = 255
    images = jnp.asarray(np.concatenate([red, blue]))
    labels = jnp.array([0] * 4 + [1] * 4)

    params = {"tower": variables["params"],
              "head": {"w": jnp.zeros((TINY_HEAD, 2)), "b": jnp.zeros((2,))}}
    optimizer = optax.adam(1e-2)

    @_jit
    def step(params, batch_stats, opt_state, rng):
        def loss_fn(params):
            (pooled, _), new_vars = model.apply(
                {"params": params["tower"], "batch_stats": batch_stats}, images, train=True,
                mutable=["batch_stats"], rngs={"dropout": rng})
            logits = pooled @ params["head"]["w"] + params["head"]["b"]
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, new_vars["batch_stats"]
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    batch_stats, opt_state = variables["batch_stats"], optimizer.init(params)
    losses = []
    for rng in jax.random.split(jax.random.key(2, impl="rbg"), 30):
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, rng)
        losses.append(float(loss))
    assert losses[0] == pytest.approx(np.log(2), abs=1e-5)  # zero-initialised head
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("size, kernel, stride", [(8, 3, 1), (8, 3, 2), (9, 5, 2), (7, 5, 1)])
def test_shifted_depthwise_convolution_equals_the_grouped_convolution(size, kernel, stride):
    """The CPU form of the depthwise convolution gives XLA's grouped convolution's numbers,
    'SAME' padding included (asymmetric for even sizes at stride 2)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, size, size, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, 1, 6)), jnp.float32)
    expected = jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=6)
    np.testing.assert_allclose(efficientnet.depthwise_conv_shifted(x, w, stride), expected,
                               atol=1e-5)


def _conv_same_numpy(x, kernel, stride):
    """float64 'SAME' convolution (TensorFlow's padding: the odd pixel at the end), NHWC."""
    k = kernel.shape[0]
    size = x.shape[1]
    out = -(-size // stride)
    pad = max((out - 1) * stride + k - size, 0)
    x = np.pad(x, ((0, 0), (pad // 2, pad - pad // 2), (pad // 2, pad - pad // 2), (0, 0)))
    result = np.zeros((x.shape[0], out, out, kernel.shape[-1]))
    for i in range(k):
        for j in range(k):
            window = x[:, i:i + (out - 1) * stride + 1:stride, j:j + (out - 1) * stride + 1:stride]
            result += window @ kernel[i, j]
    return result


def _batch_norm_numpy(x, epsilon):
    """Training-mode BatchNorm at initialisation (scale 1, bias 0): the batch's statistics."""
    return (x - x.mean(axis=(0, 1, 2))) / np.sqrt(x.var(axis=(0, 1, 2)) + epsilon)


def _swish(x):
    return x / (1 + np.exp(-x))


@pytest.mark.parametrize("expand, features, stride", [(4, 6, 1), (1, 8, 2)])
def test_fused_mbconv_matches_numpy(expand, features, stride):
    """Fused-MBConv (EfficientNetV2) in training mode against a float64 re-derivation: a full
    k x k convolution, BatchNorm, swish, then a 1x1 projection and BatchNorm (expand ratio > 1,
    with the residual when the shape is kept), or that convolution alone (expand ratio 1)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 6, 6, 6)).astype(np.float32)
    block = efficientnet.MBConv(expand, features, stride, 3, bn_momentum=0.9, bn_epsilon=1e-3,
                                fused=True)
    variables = nn.unbox(block.init(KEY, x))
    params = variables["params"]
    assert "depthwise_conv" not in params and "se_reduce" not in params
    out, _ = block.apply(variables, x, train=True, mutable=["batch_stats"])

    x64 = x.astype(np.float64)
    if expand == 1:
        kernel = np.asarray(params["fused_conv"]["kernel"], np.float64)
        assert kernel.shape == (3, 3, 6, features)
        expected = _swish(_batch_norm_numpy(_conv_same_numpy(x64, kernel, stride), 1e-3))
    else:
        expand_kernel = np.asarray(params["expand_conv"]["kernel"], np.float64)
        assert expand_kernel.shape == (3, 3, 6, 6 * expand)
        hidden = _swish(_batch_norm_numpy(_conv_same_numpy(x64, expand_kernel, stride), 1e-3))
        project = np.asarray(params["project_conv"]["kernel"], np.float64)[0, 0]
        expected = _batch_norm_numpy(hidden @ project, 1e-3) + x64  # shape kept: residual
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, atol=2e-4)


def test_stages_and_fused_stages():
    """`stages` builds the first stages only (and the head after them); `fused_stages` makes the
    first ones Fused-MBConv; a 32 px image through 'small' with a stride-1 stem and four
    stages (strides 1, 2, 2, 2) leaves a 4 x 4 map of 1,280 channels."""
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.uint8)
    model = EfficientNet("small", stem_stride=1, stages=4, fused_stages=2, pool="gap_max")
    (pooled, tokens), variables = jax.eval_shape(
        lambda x: model.init_with_output(KEY, x), images)
    params = nn.unbox(variables["params"])
    assert [name for name in params if name.startswith("stage")] == [
        "stage0_block0", "stage1_block0", "stage2_block0", "stage3_block0", "stage3_block1"]
    assert set(params["stage0_block0"]) == {"fused_conv", "fused_bn"}  # expand ratio 1
    assert set(params["stage1_block0"]) == {"expand_conv", "expand_bn", "project_conv",
                                            "project_bn"}
    assert params["stage1_block0"]["expand_conv"]["kernel"].shape == (3, 3, 16, 96)
    assert {"depthwise_conv", "se_reduce"} <= set(params["stage2_block0"])
    assert tokens.shape == (1, 16, 1280) and pooled.shape == (1, 2560)

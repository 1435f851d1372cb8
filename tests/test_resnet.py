"""ResNet tower: parameter counts (vs torchvision), block layout, shapes, batch statistics,
zero-init residuals, gradients, learning, and its wiring into build_image_tower/validation."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from big_contrast import config as bc, validation
from big_contrast.models import resnet, two_tower
from big_contrast.models.resnet import ResNet
from tests.helpers import parameter_count, random_images

# torchvision.models.resnetN().parameters() totals minus the 1000-way fc layer
# (512 or 2048 inputs x 1000 + 1000 biases): 11,689,512, 21,797,672, 25,557,032, 44,549,160.
TORCHVISION_NO_FC = {"18": 11_176_512, "34": 21_284_672, "50": 23_508_032, "101": 42_500_160}

# As in test_efficientnet: 'rbg' keys and XLA's lowest backend optimisation level compile faster.
KEY = jax.random.key(0, impl="rbg")
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _shapes(model, size, batch=1, **kwargs):
    """(output, variables) of model.init on [batch, size, size, 3] uint8 images, as shapes."""
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
    return jax.eval_shape(lambda x: model.init_with_output(KEY, x, **kwargs), images)


@pytest.fixture(scope="module")
def tiny():
    model = ResNet("tiny", stem="cifar")
    return model, _jit(model.init)(KEY, random_images(4))


@pytest.fixture(scope="module")
def apply_train():
    def apply(model, variables, images):
        return model.apply(variables, images, train=True, mutable=["batch_stats"])
    return _jit(apply, static_argnums=0)


@pytest.mark.parametrize("variant", sorted(TORCHVISION_NO_FC))
def test_parameter_counts_match_torchvision(variant):
    (pooled, tokens), variables = _shapes(ResNet(variant), 224)
    assert parameter_count(variables["params"]) == TORCHVISION_NO_FC[variant]
    channels = resnet.output_channels(variant)
    assert pooled.shape == (1, channels) and tokens.shape == (1, 7 * 7, channels)
    if variant == "18":
        # Running mean + var of the 20 BatchNorms: stem 64, 4 x 64, 4 x 128 + 128 (shortcut),
        # 4 x 256 + 256, 4 x 512 + 512 channels.
        assert parameter_count(variables["batch_stats"]) == 2 * 4800


def test_block_layout_follows_torchvision():
    """Shortcut convolutions only where the shape changes; a bottleneck block strides on its
    3x3 convolution (v1.5), a basic block on its first; torchvision's kernel shapes."""
    _, variables = _shapes(ResNet("50"), 64, capture_intermediates=True)
    params, acts = variables["params"], variables["intermediates"]
    assert params["stem_conv"]["kernel"].value.shape == (7, 7, 3, 64)
    assert "shortcut_conv" in params["stage0_block0"]  # 64 -> 256 channels
    assert "shortcut_conv" not in params["stage0_block1"]
    block = params["stage1_block0"]
    assert [block[f"conv{i}"]["kernel"].value.shape for i in (1, 2, 3)] == [
        (1, 1, 256, 128), (3, 3, 128, 128), (1, 1, 128, 512)]
    assert block["shortcut_conv"]["kernel"].value.shape == (1, 1, 256, 512)
    first = acts["stage1_block0"]
    assert first["conv1"]["__call__"][0].shape == (1, 16, 16, 128)  # 64 px: 16x16 after the stem
    assert first["conv2"]["__call__"][0].shape == (1, 8, 8, 128)
    assert first["shortcut_conv"]["__call__"][0].shape == (1, 8, 8, 512)

    _, variables = _shapes(ResNet("18"), 64, capture_intermediates=True)
    params, acts = variables["params"], variables["intermediates"]
    assert "shortcut_conv" not in params["stage0_block0"]  # 64 -> 64 channels, stride 1
    assert params["stage1_block0"]["shortcut_conv"]["kernel"].value.shape == (1, 1, 64, 128)
    assert acts["stage1_block0"]["conv1"]["__call__"][0].shape == (1, 8, 8, 128)


def test_kernels_carry_logical_channel_names():
    _, variables = _shapes(ResNet("50"), 32)
    boxed = jax.tree_util.tree_leaves_with_path(
        variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    names = {"/".join(str(k.key) for k in path): p.names for path, p in boxed}
    assert all(len(p.names) == p.value.ndim for _, p in boxed)
    block = "stage1_block0"  # bottleneck: widen into 'mlp', read it, project; a shortcut
    assert names["stem_conv/kernel"] == (None, None, None, "embed")
    assert names[f"{block}/conv1/kernel"] == (None, None, "embed", "mlp")
    assert names[f"{block}/conv2/kernel"] == (None, None, "mlp", None)
    assert names[f"{block}/conv3/kernel"] == (None, None, None, "embed")
    assert names[f"{block}/shortcut_conv/kernel"] == (None, None, None, "embed")


@pytest.mark.parametrize("variant, stem, size, tokens, channels", [
    ("tiny", "cifar", 32, 8 * 8, 64),
    ("small", "cifar", 32, 8 * 8, 128),
    ("tiny", "imagenet", 32, 2 * 2, 64),
    ("18", "imagenet", 64, 2 * 2, 512),
    ("18", "cifar", 32, 4 * 4, 512),
    ("50", "cifar", 32, 4 * 4, 2048),
])
def test_output_shapes(variant, stem, size, tokens, channels):
    for pool, width in (("gap", channels), ("max", channels), ("gap_max", 2 * channels)):
        (pooled, out_tokens), _ = _shapes(ResNet(variant, stem=stem, pool=pool), size, batch=3)
        assert pooled.shape == (3, width) and out_tokens.shape == (3, tokens, channels)


def test_small_forward_pools_its_tokens():
    model = ResNet("small", stem="cifar", pool="gap_max")
    images = random_images(2)
    (pooled, tokens), _ = _jit(model.init_with_output)(KEY, images)
    assert np.all(np.isfinite(pooled)) and np.all(tokens >= 0)  # after the final ReLU
    np.testing.assert_allclose(pooled[:, :128], tokens.mean(axis=1), rtol=1e-5)
    np.testing.assert_array_equal(pooled[:, 128:], tokens.max(axis=1))


def test_batch_statistics_train_and_eval(tiny, apply_train):
    model, variables = tiny
    images = random_images(4)
    (_, _), stats = apply_train(model, variables, images)
    moved = jax.tree.map(lambda new, old: np.abs(new - old).max() > 0,
                         stats["batch_stats"], variables["batch_stats"])
    assert all(jax.tree.leaves(moved)), moved  # every running mean and variance
    # Momentum 0.9: the stem's statistics move 10% of the way to the batch's.
    kernel = variables["params"]["stem_conv"]["kernel"].value
    stem = jax.lax.conv_general_dilated(
        images.astype(jnp.float32) / 127.5 - 1.0, kernel, (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    new = stats["batch_stats"]["stem_bn"]
    np.testing.assert_allclose(new["mean"], 0.1 * stem.mean(axis=(0, 1, 2)), atol=1e-6)
    np.testing.assert_allclose(new["var"], 0.9 + 0.1 * stem.var(axis=(0, 1, 2)), atol=1e-5)

    # Evaluation uses the running averages: an example's output does not depend on the others
    # in its batch (in training it does), and the statistics stay as they were.
    trained = {"params": variables["params"], "batch_stats": stats["batch_stats"]}
    others = random_images(4, seed=1).at[0].set(images[0])
    apply_eval = _jit(lambda v, x: model.apply(v, x, mutable=["batch_stats"]))
    (a, _), unchanged = apply_eval(trained, images)
    (b, _), _ = apply_eval(trained, others)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, unchanged["batch_stats"], stats["batch_stats"])
    (a, _), _ = apply_train(model, trained, images)
    (b, _), _ = apply_train(model, trained, others)
    assert np.abs(a[0] - b[0]).max() > 1e-3


def test_zero_init_residual(tiny):
    model, variables = tiny
    zeroed = ResNet("tiny", stem="cifar", zero_init_residual=True)
    params = _jit(zeroed.init)(KEY, random_images(4))["params"]
    for s in range(3):
        block, plain = params[f"stage{s}_block0"], variables["params"][f"stage{s}_block0"]
        assert np.all(block["bn2"]["scale"].value == 0) and np.all(plain["bn2"]["scale"].value == 1)
        assert np.all(block["bn1"]["scale"].value == 1)
    _, variables = _shapes(ResNet("50", zero_init_residual=True), 32)
    assert {"bn1", "bn2", "bn3", "shortcut_bn"} <= set(variables["params"]["stage3_block0"])


def test_forward_is_finite_and_differentiable(tiny):
    model, variables = tiny
    images = random_images(4).astype(jnp.float32) / 127.5 - 1.0

    @_jit
    def grads(params, images):
        def loss(params, images):
            (pooled, tokens), _ = model.apply({"params": params,
                                               "batch_stats": variables["batch_stats"]},
                                              images, train=True, mutable=["batch_stats"])
            return jnp.mean(pooled ** 2) + jnp.mean(tokens[:, :5])
        return jax.value_and_grad(loss, argnums=(0, 1))(params, images)

    value, (g_params, g_images) = grads(variables["params"], images)
    assert np.isfinite(value)
    leaves = jax.tree.leaves(g_params)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert all(np.abs(g).max() > 0 for g in leaves)  # every parameter gets a gradient
    assert np.all(np.isfinite(g_images)) and np.abs(g_images).max() > 0


def test_remat_matches(tiny, apply_train):
    model, variables = tiny
    images = random_images(4)
    (plain, _), plain_stats = apply_train(model, variables, images)
    (rematted, _), remat_stats = apply_train(ResNet("tiny", stem="cifar", remat=True), variables,
                                             images)
    np.testing.assert_allclose(rematted, plain, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 remat_stats, plain_stats)


def test_tiny_learns_with_sgd(tiny):
    """Which half of a noisy image is brighter: the loss of a linear head on the pooled
    features falls within a few SGD steps."""
    model, variables = tiny
    rng = np.random.RandomState(3)
    images = rng.randint(0, 128, (8, 32, 32, 3)).astype(np.uint8)
    labels = np.arange(8) % 2
    for i, label in enumerate(labels):
        images[i, :, 16 * label:16 * label + 16] += 127
    images, labels = jnp.asarray(images), jnp.asarray(labels)

    channels = resnet.output_channels("tiny")
    params = {"tower": variables["params"],
              "head": {"w": jnp.zeros((channels, 2)), "b": jnp.zeros((2,))}}
    optimizer = optax.sgd(0.1, momentum=0.9)

    @_jit
    def step(params, batch_stats, opt_state):
        def loss_fn(params):
            (pooled, _), new_vars = model.apply(
                {"params": params["tower"], "batch_stats": batch_stats}, images, train=True,
                mutable=["batch_stats"])
            logits = pooled @ params["head"]["w"] + params["head"]["b"]
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, new_vars["batch_stats"]
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    batch_stats, opt_state = variables["batch_stats"], optimizer.init(params)
    losses = []
    for _ in range(10):
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state)
        losses.append(float(loss))
    assert losses[0] == pytest.approx(np.log(2), abs=1e-5)  # zero-initialised head
    assert losses[-1] < 0.5 * losses[0], losses


def _image_config(**values):
    config = bc.base_config()
    values = {"type": "resnet", "variant": "tiny", "stem": "cifar", "pool": "gap", **values}
    for key, value in values.items():
        config.model.image[key] = value
    return config


def test_build_image_tower_makes_a_resnet():
    config = _image_config(bn_momentum=0.5, pool="gap_max")
    validation.validate(config)
    tower = two_tower.build_image_tower(config.model.image)
    assert isinstance(tower, ResNet)
    assert (tower.variant, tower.stem, tower.pool, tower.bn_momentum) == ("tiny", "cifar",
                                                                          "gap_max", 0.5)
    assert two_tower.build_image_tower(_image_config().model.image).bn_momentum == 0.9
    # As a CLIP image tower.
    model = two_tower.TwoTower(tower, two_tower.build_text_tower(config.model.text, 100, 1),
                               embed_dim=16)
    images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.uint8)
    texts = jax.ShapeDtypeStruct((2, 8), jnp.int32)
    out, _ = jax.eval_shape(lambda x, t: model.init_with_output(KEY, x, t), images, texts)
    assert out["image"].shape == (2, 16) and out["text"].shape == (2, 16)


@pytest.mark.parametrize("key, value, message", [
    ("variant", "19", "model.image.variant '19': unknown ResNet variant '19'; variants are "
                      "['tiny', 'small', '18', '34', '50', '101', '152']"),
    ("stem", "patch", "model.image.stem is 'patch'; choose one of: imagenet, cifar"),
    ("pool", "cls", "model.image.pool is 'cls'; choose one of: gap, max, gap_max"),
    ("bn_momentum", 1.0, "model.image.bn_momentum must be in [0, 1), got 1.0"),
])
def test_bad_resnet_values_are_one_line_config_errors(key, value, message):
    with pytest.raises(bc.ConfigError) as error:
        validation.validate(_image_config(**{key: value}))
    assert str(error.value) == message

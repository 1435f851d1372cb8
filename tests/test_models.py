"""Towers and the two-tower model: sizes by name, pooling semantics, logical axis names,
normalised embeddings, CLIP's temperature initialisation and clamp."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_contrast.models import transformer, two_tower
from big_contrast.models.text import TextTransformer
from big_contrast.models.vit import ViT
from tests.helpers import parameter_count


def _shapes(module, *inputs):
    return nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *inputs))["params"]


def test_vit_b32_parameter_count_matches_clip():
    # CLIP ViT-B/32's visual tower without its final projection: 87,456,000 weights
    # (conv1 2,359,296 + class 768 + positions 50x768 + 12 blocks of 7,087,872 + 2 LayerNorms),
    # plus the patch-embedding bias ours has and CLIP's does not.
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.uint8)
    params = _shapes(ViT("B/32", pool="cls"), images)
    assert parameter_count(params) == 87_456_000 + 768


def test_text_tower_matches_clip_b32_text_transformer():
    # CLIP's text side before its projection (width 512, 12 layers, 8 heads, 77 positions,
    # 49,408 tokens): 12 blocks of 3,152,384 + token and position embeddings + final LayerNorm.
    tokens = jax.ShapeDtypeStruct((1, 77), jnp.int32)
    params = _shapes(TextTransformer("M", vocab_size=49_408), tokens)
    assert parameter_count(params["encoder"]) == 12 * 3_152_384
    assert parameter_count(params) == 12 * 3_152_384 + 49_408 * 512 + 77 * 512 + 2 * 512


@pytest.mark.parametrize("variant", ["Ti/16", "S/16", "B/16", "L/14", "H/14", "g/14", "So400m/14"])
def test_standard_vit_sizes_build(variant):
    size, patch = transformer.parse_variant(variant)
    params = _shapes(ViT(variant), jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.uint8))
    blocks = [k for k in params["encoder"] if k.startswith("block_")]
    assert len(blocks) == size.depth and patch in (14, 16)
    assert params["posemb"].shape == (1, (224 // patch) ** 2 + 1, size.width)


def test_bad_variants_are_named():
    with pytest.raises(ValueError, match="unknown transformer variant"):
        transformer.parse_variant("Q/16")
    with pytest.raises(ValueError, match="patch"):
        ViT("B").init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.uint8))


def test_conv_stem_reaches_the_same_token_grid():
    images = np.zeros((2, 32, 32, 3), np.uint8)
    model = ViT("mu/8", pool="gap", stem="conv")
    variables = model.init(jax.random.key(0), images)
    pooled, tokens = model.apply(variables, images)
    assert pooled.shape == (2, 32) and tokens.shape == (2, 16, 32)
    names = nn.unbox(variables)["params"]
    assert {"stem_conv0", "stem_conv3", "stem_proj"} <= set(names)


def _text_inputs():
    tokens = np.zeros((2, 8), np.int32)
    tokens[0, :4] = [1, 10, 11, 2]  # BOS a b EOS PAD...
    tokens[1, :6] = [1, 12, 13, 14, 15, 2]
    return tokens


def test_causal_eos_pooling_ignores_padding_and_reads_the_eos_token():
    model = TextTransformer("mu", vocab_size=32, causal=True, pool="eos")
    tokens = _text_inputs()
    variables = model.init(jax.random.key(0), tokens)
    pooled, out = model.apply(variables, tokens)
    np.testing.assert_allclose(pooled[0], out[0, 3], rtol=1e-6)
    np.testing.assert_allclose(pooled[1], out[1, 5], rtol=1e-6)
    garbage = tokens.copy()
    garbage[0, 4:] = 7  # whatever follows EOS cannot reach it through a causal mask
    np.testing.assert_allclose(model.apply(variables, garbage)[0][0], pooled[0], rtol=1e-6)


def test_bidirectional_first_pooling_masks_padding():
    model = TextTransformer("mu", vocab_size=32, causal=False, pool="first")
    tokens = _text_inputs()
    variables = model.init(jax.random.key(0), tokens)
    pooled, out = model.apply(variables, tokens)
    np.testing.assert_allclose(pooled, out[:, 0], rtol=1e-6)
    longer = np.concatenate([tokens, np.zeros((2, 4), np.int32)], axis=1)
    longer_model = TextTransformer("mu", vocab_size=32, causal=False, pool="first")
    params = longer_model.init(jax.random.key(0), longer)
    params["params"]["posemb"] = nn.Partitioned(
        jnp.concatenate([variables["params"]["posemb"].value,
                         jnp.zeros((1, 4, 32))], axis=1), (None, None, "embed"))
    for k in variables["params"]:
        if k != "posemb":
            params["params"][k] = variables["params"][k]
    # Extra padding is masked out, so the [CLS] output does not change.
    np.testing.assert_allclose(longer_model.apply(params, longer)[0], pooled, atol=1e-5)


def test_every_transformer_parameter_has_logical_names():
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    boxed = jax.eval_shape(TextTransformer("mu", vocab_size=64).init, jax.random.key(0), tokens)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    names = {n for x in leaves for n in x.names if n}
    assert {"embed", "mlp", "heads", "kv", "vocab"} <= names


def _two_tower(**kwargs):
    return two_tower.TwoTower(ViT("mu/8", pool="gap"), TextTransformer("mu", vocab_size=64),
                              embed_dim=16, **kwargs)


def test_two_tower_outputs_unit_vectors_and_clip_scale():
    model = _two_tower()
    images, tokens = np.zeros((3, 32, 32, 3), np.uint8), _text_inputs()[:1].repeat(3, 0)
    variables = model.init(jax.random.key(0), images, tokens)
    log_scale = variables["params"]["log_scale"]
    log_scale = log_scale.value if isinstance(log_scale, nn.Partitioned) else log_scale
    assert log_scale.dtype == jnp.float32 and not getattr(log_scale, "weak_type", False)
    np.testing.assert_allclose(float(log_scale), math.log(1 / 0.07), rtol=1e-6)
    out = model.apply(variables, images, tokens)
    for key in ("image", "text"):
        np.testing.assert_allclose(np.linalg.norm(out[key], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(float(out["scale"]), 1 / 0.07, rtol=1e-5)
    only_text = model.apply(variables, None, tokens)
    assert "image" not in only_text and only_text["text"].shape == (3, 16)


def test_clamp_keeps_scale_between_1_and_max():
    params = {"log_scale": jnp.float32(7.0), "other": jnp.ones(2)}
    clamped = two_tower.clamp_log_scale(params, 100.0)
    np.testing.assert_allclose(float(jnp.exp(clamped["log_scale"])), 100.0, rtol=1e-6)
    assert float(two_tower.clamp_log_scale({"log_scale": jnp.float32(-1.0)}, 100.0)["log_scale"]) == 0.0
    assert two_tower.clamp_log_scale({"w": 1}, 100.0) == {"w": 1}


def test_fixed_temperature_has_no_parameter():
    model = _two_tower(learn_scale=False, init_scale=10.0)
    variables = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.uint8), _text_inputs()[:1])
    assert "log_scale" not in variables["params"]


def test_convnet_matches_a_reference_network():
    from big_contrast.models.convnet import ConvNet
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    model = ConvNet("4,6", norm="none", coord_channels=False)
    variables = model.init(jax.random.key(0), images)
    pooled, tokens = model.apply(variables, images)
    assert pooled.shape == (2, 6) and tokens.shape == (2, 16, 6)
    # The same network written with lax.conv and reduce-window max-pooling.
    p = variables["params"]
    x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
    for stage, layers in enumerate([("stage0_conv0", "stage0_conv1"), ("stage1_conv0", "stage1_conv1")]):
        if stage:
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        for name in layers:
            kernel = p[name]["kernel"].value
            x = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            x = jax.nn.relu(x + p[name]["bias"].value)
    np.testing.assert_allclose(tokens, x.reshape(2, -1, 6), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="stage widths"):
        ConvNet("16,x").init(jax.random.key(0), images)
    one_conv = nn.unbox(ConvNet("4x1,6").init(jax.random.key(0), images))["params"]
    assert {k for k in one_conv if k.endswith("conv0") or k.endswith("conv1")} == {
        "stage0_conv0", "stage1_conv0", "stage1_conv1"}


def test_convnet_batch_norm_uses_batch_statistics_in_training_and_running_ones_after():
    from big_contrast.models.convnet import ConvNet
    images = np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    model = ConvNet("4", norm="batch")
    variables = model.init(jax.random.key(0), images)
    assert set(variables) == {"params", "batch_stats"}
    (pooled, tokens), updated = model.apply(variables, images, train=True, mutable=["batch_stats"])
    # A training step moves the running statistics towards the batch's (momentum 0.9) ...
    stats = updated["batch_stats"]["stage0_conv1_bn"]
    assert not np.allclose(stats["mean"], 0.0)
    # ... and evaluation normalises with those running statistics, not the batch's own.
    frozen = model.apply({**variables, **updated}, images, train=False)
    assert frozen[0].shape == pooled.shape and not np.allclose(frozen[0], pooled)


def _attention_float64(q, k, v, mask, g):
    """Softmax attention and its gradients for the output cotangent g, re-derived in float64:
    dV = P^T g, dP = g V^T, dS = P * (dP - rowsum(dP * P)), dQ = dS K / sqrt(d), dK = dS^T Q /
    sqrt(d); masked logits get no gradient (a fully masked row attends uniformly)."""
    q, k, v, g = (np.asarray(a, np.float64) for a in (q, k, v, g))
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = np.where(mask, np.einsum("bhqd,bhkd->bhqk", q, k) * scale,
                      -0.7 * np.finfo(np.float32).max)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bhkd->bhqd", probs, v)
    dprobs = np.einsum("bhqd,bhkd->bhqk", g, v)
    dlogits = np.where(mask, probs * (dprobs - (dprobs * probs).sum(-1, keepdims=True)), 0.0)
    dq = np.einsum("bhqk,bhkd->bhqd", dlogits, k) * scale
    dk = np.einsum("bhqk,bhqd->bhkd", dlogits, q) * scale
    dv = np.einsum("bhqk,bhqd->bhkd", probs, g)
    return out, (dq, dk, dv)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_and_its_hand_written_gradients_match_a_float64_derivation(causal):
    q, k, v, g = (np.asarray(jax.random.normal(key, (3, 2, 5, 8)))
                  for key in jax.random.split(jax.random.key(3), 4))
    # The third sequence is all padding: its rows attend uniformly and pass no gradient to q, k.
    pad = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool)[:, None, None, :]
    mask = pad & np.tril(np.ones((5, 5), bool)) if causal else pad
    out, vjp = jax.vjp(lambda q, k, v: transformer.attend(q, k, v, pad, causal=causal), q, k, v)
    want_out, want_grads = _attention_float64(q, k, v, np.broadcast_to(mask, (3, 2, 5, 5)), g)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
    for got, want in zip(vjp(g), want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

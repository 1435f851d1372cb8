"""Mixed precision and layer stacks: bfloat16 compute keeps float32 parameters, optimizer
state and losses; scanned stacks equal the unrolled ones given the same (stacked) weights;
remat policies change memory, never numbers; bad values are named with a suggestion."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_contrast import config as bc, workdir as workdir_lib
from big_contrast.experiment import Experiment
from big_contrast.models import coca, efficientnet, resnet, stacks
from big_contrast.models.convnet import ConvNet
from big_contrast.models.efficientnet import EfficientNet
from big_contrast.models.resnet import ResNet
from big_contrast.models.text import TextTransformer
from big_contrast.models.vit import ViT
from tests.helpers import random_images, tiny_clip_config

# As in test_efficientnet: 'rbg' keys and XLA's lowest backend optimisation level compile faster.
KEY = jax.random.key(0, impl="rbg")
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _init(model, *inputs):
    """Unboxed variables of ``model`` for ``inputs``."""
    return nn.unbox(_jit(model.init)(KEY, *inputs))


def _tokens(batch: int, length: int, vocab: int, seed: int = 0):
    """BOS, random words, EOS (id 2), padding: [batch, length] int32."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((batch, length), np.int32)
    for row in tokens:
        n = rng.integers(2, length - 1)
        row[0], row[1:n], row[n] = 1, rng.integers(3, vocab, n - 1), 2
    return jnp.asarray(tokens)


def _stacked(tree: dict, names: list[str], into: str) -> dict:
    """An unrolled stack's entries ``names`` replaced by one entry ``into`` holding them
    stacked on a new leading axis: the layout of the scanned stack."""
    out = {k: v for k, v in tree.items() if k not in names}
    out[into] = jax.tree.map(lambda *layers: jnp.stack(layers), *(tree[n] for n in names))
    return out


def _float_dtypes(tree) -> set:
    return {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


# ----------------------------------------------------------------------------- bfloat16


def _five_steps(dtype: str):
    """(experiment, initial train state, metrics of each of five train steps) of the tiny CLIP
    computing in dtype, fitting one batch: a trajectory whose loss falls."""
    exp = Experiment(tiny_clip_config(**{"model.dtype": dtype}), jax.devices()[:1])
    state = exp.state_factory.create()
    step = exp.train_step()
    batch = {"image": random_images(16, size=16), "text": _tokens(16, 12, 256)}
    initial = jax.tree.map(np.asarray, state)  # (the step donates the state)
    history = []
    with jax.set_mesh(exp.mesh):
        compiled = step.lower(state, batch).compile({"xla_backend_optimization_level": 0})
        for _ in range(5):
            state, metrics = compiled(state, batch)
            history.append(jax.tree.map(np.asarray, metrics))
    return exp, initial, history


@pytest.fixture(scope="module")
def steps():
    return {dtype: _five_steps(dtype) for dtype in ("float32", "bfloat16")}


def test_bfloat16_compute_keeps_float32_parameters_and_optimizer_state(steps):
    _, state, _ = steps["bfloat16"]
    assert _float_dtypes(state.params) == {np.dtype(np.float32)}
    assert _float_dtypes(state.opt_state) == {np.dtype(np.float32)}
    # The same weights as the float32 model's: only the computation differs.
    _, state32, _ = steps["float32"]
    jax.tree.map(np.testing.assert_array_equal, state.params, state32.params)


def test_bfloat16_losses_of_five_steps_are_float32_and_near_the_float32_losses(steps):
    history16, history32 = steps["bfloat16"][2], steps["float32"][2]
    losses16 = np.array([m["loss"] for m in history16])
    losses32 = np.array([m["loss"] for m in history32])
    assert {m["loss"].dtype for m in history16 + history32} == {np.dtype(np.float32)}
    assert np.isfinite(losses16).all() and np.isfinite(losses32).all()
    # bfloat16 keeps 8 bits of mantissa (relative rounding 2^-9 ~ 0.2% per operation);
    # through two towers the logits move by about a percent, the loss (~ln 16) less, and the
    # five updates (Adam, float32 parameters) do not let the runs drift apart.
    np.testing.assert_allclose(losses16, losses32, rtol=2e-2)
    assert (losses16 != losses32).any()  # it did compute in bfloat16
    assert losses32[-1] < losses32[0] and losses16[-1] < losses16[0]  # both learn
    grads16 = np.array([m["grad_norm"] for m in history16])
    grads32 = np.array([m["grad_norm"] for m in history32])
    np.testing.assert_allclose(grads16, grads32, rtol=5e-2)


def test_bfloat16_towers_compute_in_bfloat16_and_the_loss_sees_float32(steps):
    exp, state, _ = steps["bfloat16"]
    objective = exp.objective
    batch = {"image": random_images(4, size=16), "text": _tokens(4, 12, 256)}
    params, model_state = state.params, state.model_state
    # The towers' outputs, before the projections' float32 normalisation, are bfloat16 ...
    pooled, _ = jax.eval_shape(objective.model.image_tower.apply,
                               {"params": params["image_tower"]}, batch["image"])
    text, _ = jax.eval_shape(objective.model.text_tower.apply,
                             {"params": params["text_tower"]}, batch["text"])
    assert pooled.dtype == text.dtype == jnp.bfloat16
    # ... the matrix products of the loss's forward pass are bfloat16 ...
    jaxpr = jax.make_jaxpr(objective.loss_fn)(params, model_state, batch, KEY, jnp.int32(0))
    dots = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    assert dots and all(e.invars[0].aval.dtype == jnp.bfloat16 for e in dots[:4])
    # ... and what reaches the loss is float32.
    outputs, _ = jax.eval_shape(objective.per_example_outputs, params, model_state, batch, KEY, 0)
    assert {v.dtype for v in outputs.values()} == {np.dtype(np.float32)}


def _equations(jaxpr):
    """Every equation of a jaxpr, those of its sub-jaxprs (jit, custom_vjp, scan) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    yield from _equations(getattr(inner, "jaxpr", inner))


def test_bfloat16_parameters_are_stored_in_bfloat16():
    model = TextTransformer("mu", vocab_size=64, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = nn.unbox(jax.eval_shape(model.init, KEY, _tokens(2, 8, 64)))["params"]
    assert _float_dtypes(params) == {np.dtype(jnp.bfloat16)}


# ----------------------------------------------------------------------------- scan


def _encoder_blocks(depth: int) -> list[str]:
    return [f"block_{i:02d}" for i in range(depth)]


def _scanned_transformer(params: dict, depth: int) -> dict:
    return {**params, "encoder": _stacked(params["encoder"], _encoder_blocks(depth), "blocks")}


@pytest.mark.parametrize("make, inputs", [
    (lambda scan: ViT("pico/8", pool="cls", scan=scan), lambda: random_images(3, size=16)),
    (lambda scan: TextTransformer("pico", vocab_size=64, causal=False, pool="first", scan=scan),
     lambda: _tokens(3, 10, 64)),
    (lambda scan: TextTransformer("pico", vocab_size=64, remat=True, scan=scan),
     lambda: _tokens(3, 10, 64)),
], ids=["vit", "bidirectional_text", "causal_text_remat"])
def test_scanned_transformer_equals_the_unrolled_one(make, inputs):
    x = inputs()
    unrolled = _init(make(False), x)
    scanned_params = _scanned_transformer(unrolled["params"], 2)
    scanned = make(True)
    # Same tree as the scanned model initialises, with a leading axis of 2 layers.
    expected = jax.tree.map(jnp.shape, nn.unbox(jax.eval_shape(scanned.init, KEY, x))["params"])
    assert jax.tree.map(jnp.shape, scanned_params) == expected
    out = _jit(make(False).apply)(unrolled, x)
    out_scanned = _jit(scanned.apply)({"params": scanned_params}, x)
    for a, b in zip(out, out_scanned):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_scanned_parameters_have_a_layers_axis_that_no_mesh_axis_shards():
    config = tiny_clip_config(**{"model.text.variant": "pico", "model.text.scan": "true",
                                 "mesh.data": "2", "mesh.fsdp": "2"})
    state = Experiment(config, jax.devices()[:4]).state_factory.abstract()
    qkv = state.params["text_tower"]["encoder"]["blocks"]["attn"]["qkv_kernel"]
    assert qkv.shape == (2, 64, 2, 3, 32)
    # The unscanned kernel's spec ('embed', 'heads', ...) behind an unsharded 'layers' axis.
    assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "model", None, None)


def _convnet_stages(tree: dict, blocks: dict[int, int]) -> dict:
    """Unrolled stage blocks 1.. of each stage -> 'stage{s}_blocks'."""
    for stage, repeats in blocks.items():
        if repeats > 1:
            names = [f"stage{stage}_block{r}" for r in range(1, repeats)]
            tree = _stacked(tree, names, f"stage{stage}_blocks")
    return tree


def test_scanned_resnet_stages_equal_the_unrolled_ones_batch_statistics_included(monkeypatch):
    monkeypatch.setitem(resnet.VARIANTS, "test", resnet.Spec("basic", 8, (8, 16), (3, 2)))
    blocks = {0: 3, 1: 2}
    images = random_images(4)
    unrolled = _init(ResNet("test", stem="cifar"), images)
    scanned = {name: _convnet_stages(tree, blocks) for name, tree in unrolled.items()}

    def train(scan, variables):
        model = ResNet("test", stem="cifar", remat=True, scan=scan)
        return _jit(lambda v: model.apply(v, images, train=True, mutable=["batch_stats"]))(
            variables)

    (out, _), stats = train(False, unrolled)
    (out_scanned, _), stats_scanned = train(True, scanned)
    np.testing.assert_allclose(out, out_scanned, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 _convnet_stages(stats["batch_stats"], blocks), stats_scanned["batch_stats"])


@pytest.mark.parametrize("fused_stages", [0, 2])
def test_scanned_efficientnet_stages_equal_the_unrolled_ones(monkeypatch, fused_stages):
    # Three of B0's stages at full depth: blocks of 1, 3 and 2 (faster to compile than 'tiny');
    # with fused_stages=2 the first two are Fused-MBConv (the second's three blocks scanned).
    monkeypatch.setitem(efficientnet.VARIANTS, "test", efficientnet.Scaling(0.25, 1.0, 32))
    monkeypatch.setattr(efficientnet, "B0_STAGES", efficientnet.B0_STAGES[:1] + (
        (6, 24, 3, 2, 3), (6, 40, 2, 2, 5)))
    blocks = {1: 3, 2: 2}
    images = random_images(4)
    # (Evaluation: the scanned blocks' traced drop rates are given but not drawn.)
    model = EfficientNet("test", drop_connect_rate=0.2, fused_stages=fused_stages)
    (out, _), unrolled = _jit(functools.partial(model.init_with_output, KEY))(images)
    scanned = {name: _convnet_stages(tree, blocks) for name, tree in nn.unbox(unrolled).items()}
    out_scanned, _ = _jit(EfficientNet("test", drop_connect_rate=0.2, scan=True,
                                       fused_stages=fused_stages).apply)(
        scanned, images)
    np.testing.assert_allclose(out, out_scanned, rtol=1e-5, atol=1e-5)


def _tiny_coca(scan: bool):
    tower = ConvNet("8,16", norm="none", coord_channels=False)
    return coca.CoCa(tower, vocab_size=64, max_len=8, text_variant="mu",
                     unimodal_depth=2, multimodal_depth=2, decoder_queries=4, embed_dim=16,
                     remat=True, remat_policy="dots_saveable", scan=scan)


def test_scanned_coca_decoder_equals_the_unrolled_one_training_and_decoding():
    images, tokens = random_images(2, size=16), _tokens(2, 8, 64)
    plain, scanned = _tiny_coca(False), _tiny_coca(True)
    out, unrolled = _jit(functools.partial(plain.init_with_output, KEY))(images, tokens)
    unrolled = nn.unbox(unrolled)
    params = _stacked(unrolled["params"], ["unimodal_0", "unimodal_1"], "unimodal")
    params = _stacked(params, ["multimodal_0", "multimodal_1"], "multimodal")
    out_scanned = _jit(scanned.apply)({"params": params}, images, tokens)
    for key in ("image", "text", "logits"):
        np.testing.assert_allclose(out[key], out_scanned[key], rtol=1e-5, atol=1e-5)

    @_jit
    def decode(variables):
        """Log-probs [B, 2, V] of feeding the captions' first two tokens, and the cache."""
        cache = scanned.apply(variables, images, method=coca.CoCa.init_decoding)
        first, cache = scanned.apply(variables, cache, tokens[:, 0], 0,
                                     method=coca.CoCa.decode_step)
        second, cache = scanned.apply(variables, cache, tokens[:, 1], 1,
                                      method=coca.CoCa.decode_step)
        return jnp.stack([first, second], axis=1), cache

    # Decoding with the scanned caches predicts what the unrolled model's teacher-forced
    # logits do (test_coca checks the same of unrolled decoding).
    log_probs, cache = decode({"params": params})
    expected = jax.nn.log_softmax(out["logits"][:, :2])
    np.testing.assert_allclose(log_probs, expected, rtol=1e-5, atol=1e-5)
    # Cached decoding wants the sequences first in every cache leaf (decoding.py).
    assert all(leaf.shape[:2] == (2, 2) for leaf in jax.tree.leaves(cache))


# ----------------------------------------------------------------------------- remat


def test_remat_policies_change_no_gradient():
    # (Unrolled rematerialisation: test_resnet and test_efficientnet; it is the same wrapper.)
    tokens = _tokens(3, 10, 64)
    weights = jax.random.normal(jax.random.key(1), (3, 64))
    params = _init(TextTransformer("pico", vocab_size=64, scan=True), tokens)["params"]

    def grads(**remat):
        model = TextTransformer("pico", vocab_size=64, scan=True, **remat)

        def loss(p):
            pooled, states = model.apply({"params": p}, tokens)
            return jnp.sum(pooled * weights) + jnp.mean(states * weights[:, None])

        return _jit(jax.grad(loss))(params)

    plain = grads()
    for policy in stacks.REMAT_POLICIES:
        rematted = grads(remat=True, remat_policy=policy)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                     rematted, plain)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, message", [
    ({"model.dtype": "bfloat61"}, "model.dtype is 'bfloat61'; did you mean 'bfloat16'"),
    ({"model.param_dtype": "float16"}, "model.param_dtype is 'float16'; did you mean"),
    ({"model.text.remat_policy": "dots_savable"}, "did you mean 'dots_saveable'"),
    ({"model.image.remat_policy": "dots_saveable"}, "set model.image.remat=True"),
    ({"model.image.type": "convnet", "model.image.variant": "8,16", "model.image.stem": "none",
      "model.image.scan": "true"}, "model.image.scan is for vit, efficientnet and resnet"),
])
def test_bad_precision_and_stack_settings_are_named(overrides, message):
    with pytest.raises(bc.ConfigError, match=message):
        Experiment(tiny_clip_config(**overrides), jax.devices()[:1])


def test_a_workdir_recorded_before_these_keys_existed_still_resumes(tmp_path):
    config = tiny_clip_config()
    recorded = json.loads(config.to_json())
    del recorded["model"]["dtype"], recorded["model"]["param_dtype"]
    for tower in ("image", "text"):
        del recorded["model"][tower]["remat_policy"], recorded["model"][tower]["scan"]
    workdir_lib.write_json(str(tmp_path), workdir_lib.CONFIG_FILE, recorded)
    assert workdir_lib.check_resume(str(tmp_path), config) == {}
    workdir_lib.check_weights_config(str(tmp_path), config)
    # A scanned model stores other weights than the recorded run's.
    with pytest.raises(bc.ConfigError, match="model.text.scan: False -> True"):
        workdir_lib.check_resume(str(tmp_path), tiny_clip_config(**{"model.text.scan": "true"}))

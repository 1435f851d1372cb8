"""GradCache: micro-batched towers give the gradients of one big batch (CLIP, CoCa), on one
device and sharded over a mesh; both passes draw the same dropout; batch norm is refused."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_contrast import config as bc, grad_cache, sharding
from big_contrast.experiment import Experiment
from big_contrast.objectives.base import PerExampleObjective
from tests.helpers import REPO, tiny_clip_config

VIT = {"model.image.type": "vit", "model.image.variant": "mu/8", "model.image.pool": "gap",
       "model.image.stem": "patch"}


def _coca_config(**overrides):
    config = bc.load_config_file(f"{REPO}/tests/tiny_coca.py")
    return bc.apply_overrides(config, {**VIT, **{k: str(v) for k, v in overrides.items()}})


def _batch(exp, seed=0):
    rng = np.random.default_rng(seed)
    size = exp.config.data.image_size
    images = rng.integers(0, 256, size=(exp.config.batch_size, size, size, 3), dtype=np.uint8)
    words = ["red", "blue", "green", "circle", "star", "square", "big", "small", "a", "the"]
    captions = [" ".join(rng.choice(words, size=rng.integers(2, 7))) for _ in images]
    return {"image": images, "text": exp.tokenizer.encode_batch(captions)}


def _grads(config, devices, micro_batches):
    """(loss, parameter gradients) of one step at initialisation."""
    config = bc.apply_overrides(config, {"grad_cache.micro_batches": str(micro_batches)})
    exp = Experiment(config, devices)
    state = exp.state_factory.create()
    objective = exp.objective
    grad_fn = (grad_cache.value_and_grad(objective, micro_batches, exp.mesh) if micro_batches > 1
               else jax.value_and_grad(objective.loss_fn, has_aux=True))
    with jax.set_mesh(exp.mesh):
        batch = jax.device_put(_batch(exp), jax.sharding.NamedSharding(
            exp.mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
        (loss, _), grads = jax.jit(grad_fn)(state.params, state.model_state, batch,
                                           jax.random.PRNGKey(1), state.step)
    return float(loss), jax.tree.map(np.asarray, grads)


def _assert_same(reference, got):
    assert got[0] == pytest.approx(reference[0], rel=1e-6)
    flat_ref, flat_got = jax.tree.leaves(reference[1]), jax.tree.leaves(got[1])
    scale = max(np.abs(g).max() for g in flat_ref)
    for ref, g in zip(flat_ref, flat_got, strict=True):
        np.testing.assert_allclose(g, ref, atol=1e-5 * scale, rtol=1e-4)


def test_clip_grad_cache_equals_one_big_batch_on_a_mesh():
    config = tiny_clip_config(**VIT)
    _assert_same(_grads(config, jax.devices()[:4], 1), _grads(config, jax.devices()[:4], 2))


def test_siglip_ring_loss_through_grad_cache_equals_one_big_batch():
    config = tiny_clip_config(**VIT, **{"loss.contrastive": "sigmoid", "model.init_bias": "-5",
                                        "model.init_scale": "5"})
    _assert_same(_grads(config, jax.devices()[:2], 1), _grads(config, jax.devices()[:2], 4))


def test_coca_grad_cache_equals_one_big_batch():
    """The contrastive term dominates (caption weight 0.05, not the paper's 2), so an error in
    it could not hide under the caption gradients; the captions' token losses, which travel as
    per-example outputs, still count well above the tolerance."""
    config = _coca_config(**{"loss.caption_weight": "0.05"})
    _assert_same(_grads(config, jax.devices()[:2], 1), _grads(config, jax.devices()[:2], 4))


class _DropoutTower(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8)(x)
        x = nn.Dropout(0.5, deterministic=False)(x)
        return nn.Dense(4)(jnp.tanh(x))


class _DropoutObjective(PerExampleObjective):
    """Two towers with dropout and a softmax contrastive loss on one device."""

    model = _DropoutTower()
    batch_spec = None

    def init_variables(self, rng, batch):
        return self.model.init({"params": rng, "dropout": rng}, batch["a"])

    def per_example_outputs(self, params, model_state, batch, rng, step):
        embed = lambda x: self.model.apply({"params": params}, x, rngs={"dropout": rng})  # noqa: E731
        return {"a": embed(batch["a"]), "b": embed(batch["b"])}, model_state

    def loss_from_outputs(self, params, outputs, step):
        logits = outputs["a"] @ outputs["b"].T
        loss = -jnp.mean(jnp.diag(jax.nn.log_softmax(logits, axis=1)))
        return loss, {"loss": loss}


def test_both_passes_draw_the_same_dropout():
    """GradCache's gradients equal autodiff through the same micro-batch forward passes (same
    dropout masks); with other masks in the second pass they would not."""
    objective = _DropoutObjective()
    rng = np.random.default_rng(0)
    batch = {"a": jnp.float32(rng.normal(size=(8, 6))), "b": jnp.float32(rng.normal(size=(8, 6)))}
    params = objective.init_variables(jax.random.PRNGKey(0), batch)["params"]
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "model": 1}, jax.devices()[:1])
    step_rng = jax.random.PRNGKey(3)
    with jax.set_mesh(mesh):
        (loss, _), grads = jax.jit(grad_cache.value_and_grad(objective, 2, mesh))(
            params, {}, batch, step_rng, 0)

    def direct(p):  # the same slices and rngs, differentiated straight through
        halves = [objective.per_example_outputs(
            p, {}, jax.tree.map(lambda x: x[k * 4:(k + 1) * 4], batch),
            jax.random.fold_in(step_rng, k), 0)[0] for k in range(2)]
        outputs = jax.tree.map(lambda *xs: jnp.concatenate(xs), *halves)
        return objective.loss_from_outputs(p, outputs, 0)[0]

    expected_loss, expected = jax.value_and_grad(direct)(params)
    assert float(loss) == pytest.approx(float(expected_loss), rel=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    full, _ = objective.loss_fn(params, {}, batch, step_rng, 0)  # one mask for the whole batch
    assert abs(float(full) - float(loss)) > 1e-4


def test_batch_norm_towers_are_refused_with_the_reason():
    config = tiny_clip_config("convnet", **{"grad_cache.micro_batches": "2"})
    with pytest.raises(bc.ConfigError, match="batch norm"):
        Experiment(config, jax.devices()[:1])


def test_micro_batches_must_divide_each_shard():
    config = tiny_clip_config(**VIT, **{"grad_cache.micro_batches": "3"})
    with pytest.raises(bc.ConfigError, match="must divide each batch shard's 4 examples"):
        Experiment(config, jax.devices()[:4])


def test_image_only_objectives_are_refused():
    config = bc.load_config_file(f"{REPO}/tests/tiny_ssl.py")
    config = bc.apply_overrides(config, {"grad_cache.micro_batches": "2"})
    with pytest.raises(bc.ConfigError, match="per-example outputs"):
        Experiment(config, jax.devices()[:1])


def test_train_step_with_grad_cache_moves_the_weights_like_the_big_batch():
    config = tiny_clip_config(**VIT)
    after = []
    for micro_batches in (1, 2):
        exp = Experiment(bc.apply_overrides(
            config, {"grad_cache.micro_batches": str(micro_batches)}), jax.devices()[:1])
        abstract = exp.state_factory.abstract()
        step = exp.train_step(abstract)
        with jax.set_mesh(exp.mesh):
            state, metrics = step(exp.state_factory.create(), _batch(exp))
        after.append((float(metrics["loss"]), jax.tree.map(np.asarray, state.params)))
    assert after[1][0] == pytest.approx(after[0][0], rel=1e-6)
    for a, b in zip(jax.tree.leaves(after[0][1]), jax.tree.leaves(after[1][1]), strict=True):
        np.testing.assert_allclose(b, a, atol=2e-6)

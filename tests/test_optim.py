"""Schedules and weight-decay masks against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import optax
import numpy as np
import pytest

from big_contrast import config as bc, optim


def _optim(**kw):
    c = bc.base_config().optim
    for k, v in kw.items():
        c[k] = v
    return c


def test_warmup_then_cosine_hits_the_textbook_values():
    schedule = optim.make_schedule(_optim(lr=1.0, decay="cosine"), total_steps=110, warmup_steps=10)
    assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(60)) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert float(schedule(110)) == pytest.approx(0.0, abs=1e-7)


def test_linear_decay_ends_at_the_end_fraction():
    schedule = optim.make_schedule(_optim(lr=2.0, decay="linear", end_lr_fraction=0.1), 20, 0)
    assert float(schedule(0)) == pytest.approx(2.0)
    assert float(schedule(10)) == pytest.approx(1.1)
    assert float(schedule(20)) == pytest.approx(0.2)


def test_bad_schedules_are_named():
    with pytest.raises(bc.ConfigError, match="must be shorter"):
        optim.make_schedule(_optim(), 10, 10)
    with pytest.raises(bc.ConfigError, match="unknown optim.decay 'cosin'"):
        optim.make_schedule(_optim(decay="cosin"), 10, 1)


def test_weight_decay_spares_vectors_scalars_and_named_parameters():
    params = {"tower": {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
                        "posemb": jnp.ones((1, 4, 2)), "cls": jnp.ones((1, 1, 2))},
              "log_scale": jnp.float32(1.0)}
    mask = optim.weight_decay_mask(params, bc.base_config().optim.no_decay)
    assert mask == {"tower": {"dense": {"kernel": True, "bias": False}, "posemb": False,
                              "cls": False}, "log_scale": False}


def test_adamw_decays_only_masked_leaves():
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    tx, _ = optim.make_optimizer(_optim(lr=0.1, weight_decay=0.5, clip_norm=0.0), params,
                                 total_steps=10, warmup_steps=0)
    zero_grads = {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)}
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["bias"], 0.0)


def test_lars_scales_each_decayed_leaf_by_its_trust_ratio():
    """One LARS step against the formula: w -= lr * eta * |w| / |g + wd w| * (g + wd w) for
    decayed leaves; excluded groups ('vectors') get neither decay nor trust-ratio scaling."""
    rng = np.random.default_rng(0)
    params = {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
              "bias": jnp.asarray(rng.normal(size=4), jnp.float32)}
    grads = {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
             "bias": jnp.asarray(rng.normal(size=4), jnp.float32)}
    config = _optim(name="lars", lr=0.5, weight_decay=0.01, clip_norm=0.0,
                    trust_coefficient=0.02)
    tx, _ = optim.make_optimizer(config, params, total_steps=10, warmup_steps=0)
    updates, _ = tx.update(grads, tx.init(params), params)
    w, g = np.float64(params["kernel"]), np.float64(grads["kernel"])
    decayed = g + 0.01 * w
    expected = -0.5 * 0.02 * np.linalg.norm(w) / np.linalg.norm(decayed) * decayed
    np.testing.assert_allclose(updates["kernel"], expected, rtol=1e-5)
    np.testing.assert_allclose(updates["bias"], -0.5 * np.float64(grads["bias"]), rtol=1e-6)


def test_exclude_groups_empty_decays_and_scales_every_leaf():
    """SwAV's LARC covers every parameter: with optim.exclude_groups = [] the bias is decayed."""
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    tx, _ = optim.make_optimizer(_optim(lr=0.1, weight_decay=0.5, clip_norm=0.0,
                                        exclude_groups=[]), params, 10, 0)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["bias"], -0.1 * 0.5 * np.ones(2), rtol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "lars"])
def test_a_frozen_group_neither_moves_nor_accumulates_state_until_its_step(name):
    """A group frozen for N steps gets zero updates (no decay, no momentum) for N steps, its
    optimizer moments stay zero, and its first update uses the schedule's rate at step N."""
    params = {"proto": jnp.full((2, 3), 0.5), "kernel": jnp.ones((2, 2))}
    groups = {"proto": "prototypes", "kernel": "weights"}
    config = _optim(name=name, lr=1.0, weight_decay=0.1, clip_norm=0.0, decay="linear",
                    end_lr_fraction=0.0)
    tx, schedule = optim.make_optimizer(config, params, total_steps=10, warmup_steps=0,
                                        groups=groups, frozen_groups={"prototypes": 3})
    grads = {"proto": jnp.full((2, 3), 0.2), "kernel": jnp.full((2, 2), 0.3)}
    state = tx.init(params)
    for step in range(3):
        updates, state = tx.update(grads, state, params)
        np.testing.assert_array_equal(updates["proto"], 0.0)
        assert np.all(np.asarray(updates["kernel"]) != 0.0), step
    moments = [leaf for leaf in jax.tree.leaves(
        optax.tree_map_params(tx, lambda x: x, state)) if getattr(leaf, "shape", None) == (2, 3)]
    assert moments and all(np.all(np.asarray(m) == 0.0) for m in moments)
    updates, _ = tx.update(grads, state, params)
    rate = float(schedule(3))
    if name == "adamw":  # first Adam step: g / (|g| + eps) = 1, plus decoupled decay
        expected = -rate * (1.0 + 0.1 * 0.5)
    else:  # first LARS step: trust ratio on g + wd w
        decayed = np.full((2, 3), 0.2 + 0.1 * 0.5)
        expected = -rate * 0.001 * np.linalg.norm(np.full((2, 3), 0.5)) / np.linalg.norm(decayed) * decayed
    np.testing.assert_allclose(updates["proto"], expected, rtol=1e-4)


def test_freezing_an_unknown_group_is_named():
    params = {"kernel": jnp.ones((2, 2))}
    with pytest.raises(bc.ConfigError, match="frozen parameter group 'protos' does not exist"):
        optim.make_optimizer(_optim(), params, 10, 0, frozen_groups={"protos": 5})

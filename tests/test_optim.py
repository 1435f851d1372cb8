"""Schedules and weight-decay masks against hand-computed values."""

import math

import jax.numpy as jnp
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

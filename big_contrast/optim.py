"""Optimizers from config: global-norm clipping -> AdamW / LAMB / Adafactor with warmup +
cosine or linear decay, and a weight-decay mask that spares biases, norms, temperatures and
position/class embeddings."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

from big_contrast.config import ConfigError

OPTIMIZERS = ("adamw", "lamb", "adafactor")
DECAYS = ("cosine", "linear")


def make_schedule(optim_config, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``lr``, then cosine or linear decay to ``lr * end_lr_fraction``."""
    if warmup_steps >= total_steps:
        raise ConfigError(f"the warmup ({warmup_steps} steps, optim.warmup_*) must be shorter "
                          f"than training ({total_steps} steps)")
    peak, end = optim_config.lr, optim_config.lr * optim_config.end_lr_fraction
    if optim_config.decay == "cosine":
        decay = optax.cosine_decay_schedule(peak, total_steps - warmup_steps, end / peak if peak else 0.0)
    elif optim_config.decay == "linear":
        decay = optax.linear_schedule(peak, end, total_steps - warmup_steps)
    else:
        raise ConfigError(f"unknown optim.decay {optim_config.decay!r}; choose 'cosine' or 'linear'")
    if not warmup_steps:
        return decay
    warmup = optax.linear_schedule(0.0, peak, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def weight_decay_mask(params, no_decay_patterns) -> dict:
    """True for leaves that decay: matrices and kernels, minus names matching any pattern."""
    patterns = [re.compile(p) for p in no_decay_patterns]

    def decays(path, leaf):
        name = _path_str(path)
        return leaf.ndim > 1 and not any(p.search(name) for p in patterns)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_config, params, total_steps: int, warmup_steps: int):
    """Returns (optax transformation, learning-rate schedule)."""
    schedule = make_schedule(optim_config, total_steps, warmup_steps)
    mask = weight_decay_mask(params, optim_config.no_decay)
    name = optim_config.name
    if name == "adamw":
        opt = optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                          weight_decay=optim_config.weight_decay, mask=mask)
    elif name == "lamb":
        opt = optax.lamb(schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                         weight_decay=optim_config.weight_decay, mask=mask)
    elif name == "adafactor":
        opt = adafactor(optim_config, schedule, mask)
    else:
        raise ConfigError(f"unknown optim.name {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    chain = [opt]
    if optim_config.clip_norm:
        chain.insert(0, optax.clip_by_global_norm(optim_config.clip_norm))
    return optax.chain(*chain), schedule


def capped_second_moment_decay(b2: float):
    """Adafactor's second-moment decay at step t: optax's default 1 - (t + 1) ** -0.8 (which
    starts at 0, so early steps need no bias correction) capped at ``b2``. optax has no
    constant-decay option; with the cap the decay is exactly b2 = 0.999 from step ~5,600 on,
    as in CoCa's Adafactor with beta2 0.999."""

    def decay(step, exponent):
        return jnp.minimum(b2, 1.0 - jnp.power(step + 1.0, -exponent))

    return decay


def adafactor(optim_config, schedule, mask):
    """Adafactor as CoCa trains with it: factored second moments (decay capped at b2),
    first-moment momentum b1, no update clipping or parameter-scale multiplication (the
    schedule gives the absolute rate), and decoupled weight decay (lr * weight_decay * param,
    like AdamW's)."""
    return optax.chain(
        optax.scale_by_factored_rms(decay_rate_fn=capped_second_moment_decay(optim_config.b2),
                                    epsilon=optim_config.eps),
        optax.trace(decay=optim_config.b1),
        optax.add_decayed_weights(optim_config.weight_decay, mask),
        optax.scale_by_learning_rate(schedule))

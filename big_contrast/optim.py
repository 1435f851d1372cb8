"""Optimizers from config: global-norm clipping -> AdamW / LAMB / Adafactor / LARS with warmup
+ cosine or linear decay; parameter groups (named by the objective) that weight decay and
LARS spare, or that stay frozen for a number of steps."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

from big_contrast.config import ConfigError

OPTIMIZERS = ("adamw", "lamb", "adafactor", "lars")
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


def default_groups(params):
    """Each leaf's default parameter group: 'vectors' below 2 dimensions (biases, norm scales,
    scalars), else 'weights' (matrices and kernels). Leaves may be ShapeDtypeStructs."""
    return jax.tree.map(lambda leaf: "weights" if len(leaf.shape) > 1 else "vectors", params)


def weight_decay_mask(params, no_decay_patterns, groups=None, exclude_groups=("vectors",)) -> dict:
    """True for leaves that decay (and, under LARS, get trust-ratio scaling): every leaf whose
    group is not in ``exclude_groups`` and whose name matches none of ``no_decay_patterns``.
    Without ``groups`` a leaf's group is 'vectors' below 2 dimensions, else 'weights' (the
    objectives' default grouping)."""
    patterns = [re.compile(p) for p in no_decay_patterns]
    if groups is None:
        groups = default_groups(params)

    def decays(path, group):
        return group not in exclude_groups and not any(p.search(_path_str(path)) for p in patterns)

    return jax.tree_util.tree_map_with_path(decays, groups)


def _by_path(flags) -> callable:
    """A mask function that looks each leaf up by its path, so it also serves the sub-trees
    optax.partition hands each group's optimizer (other groups' leaves are left out there)."""
    table = {_path_str(path): flag for path, flag in jax.tree_util.tree_leaves_with_path(flags)}
    return lambda tree: jax.tree_util.tree_map_with_path(lambda p, _: table[_path_str(p)], tree)


def _base_optimizer(optim_config, schedule, mask):
    name = optim_config.name
    if name == "adamw":
        return optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                           weight_decay=optim_config.weight_decay, mask=mask)
    if name == "lamb":
        return optax.lamb(schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                          weight_decay=optim_config.weight_decay, mask=mask)
    if name == "adafactor":
        return adafactor(optim_config, schedule, mask)
    if name == "lars":
        # Decay and trust ratio spare the same leaves, as SimCLR's LARS does; SwAV's LARC
        # spares none (optim.exclude_groups = []).
        return optax.lars(schedule, weight_decay=optim_config.weight_decay,
                          weight_decay_mask=mask, trust_ratio_mask=mask,
                          trust_coefficient=optim_config.trust_coefficient,
                          momentum=optim_config.momentum)
    raise ConfigError(f"unknown optim.name {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def make_optimizer(optim_config, params, total_steps: int, warmup_steps: int, groups=None,
                   frozen_groups=None):
    """Returns (optax transformation, learning-rate schedule).

    ``groups``: the objective's group name per parameter leaf (Objective.param_groups);
    ``frozen_groups``: {group: N} held still for the first N steps. A frozen group gets its
    own optimizer behind optax.partition that is masked off until step N: no update, no weight
    decay, no momentum or second moments accumulated (a zero gradient alone would still decay
    and carry momentum). Its schedule is shifted by N because a masked optimizer's own step
    count pauses, so it follows the same learning rate as every other group once it starts.
    Global-norm clipping sees every gradient, frozen ones included.
    """
    schedule = make_schedule(optim_config, total_steps, warmup_steps)
    if groups is None:
        groups = default_groups(params)
    mask = _by_path(weight_decay_mask(params, optim_config.no_decay, groups,
                                      tuple(optim_config.exclude_groups)))
    frozen = {g: n for g, n in (frozen_groups or {}).items() if n > 0}
    present = set(jax.tree.leaves(groups))
    for group in frozen:
        if group not in present:
            raise ConfigError(f"frozen parameter group {group!r} does not exist; groups: "
                              f"{', '.join(sorted(present))}")
    if not frozen:
        opt = _base_optimizer(optim_config, schedule, mask)
    else:
        transforms = {"train": _base_optimizer(optim_config, schedule, mask)}
        for group, steps in frozen.items():
            shifted = lambda count, steps=steps: schedule(count + steps)  # noqa: E731
            transforms[f"frozen:{group}"] = optax.transforms.conditionally_mask(
                _base_optimizer(optim_config, shifted, mask),
                lambda count, steps=steps: count >= steps)
        labels = jax.tree.map(lambda g: f"frozen:{g}" if g in frozen else "train", groups)
        opt = optax.partition(transforms, labels)
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

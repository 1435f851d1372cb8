"""The train state (one pytree), its shardings, and the jitted train step.

State = params + optimizer state + step + rng + the objective's model_state (batch statistics,
queues) + an optional exponential moving average (EMA) of the weights. Parameters, their
optimizer moments and their averages are sharded by the logical axis names the modules
declare; everything else is replicated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from big_contrast import grad_cache, sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    model_state: Any  # non-parameter collections, e.g. {'batch_stats': ...}
    rng: jax.Array  # raw uint32[2] key; each step folds in its step number
    # {'params': ..., 'batch_stats': ...} averaged over steps when config.ema_decay > 0, else {}.
    ema: Any = flax.struct.field(default_factory=dict)


def split_variables(variables: dict) -> tuple[Any, dict]:
    params = variables["params"]
    return params, {k: v for k, v in variables.items() if k != "params"}


# The model_state collections that are averaged with the weights. Batch statistics measured
# with the live weights do not fit the averaged ones, so they are averaged over the same
# horizon; other collections (queues, counters) are not weights and are never averaged.
EMA_COLLECTIONS = ("batch_stats",)


def ema_targets(params, model_state) -> dict:
    """What the EMA tracks: the parameters and the averaged model_state collections."""
    return {"params": params, **{k: v for k, v in model_state.items() if k in EMA_COLLECTIONS}}


def ema_update(ema: dict, params, model_state, step, decay: float) -> dict:
    """One EMA step. The decay warms up as min(decay, (1 + t) / (10 + t)) so the average is
    not dominated by the random initial weights early in a short run."""
    rate = jnp.minimum(decay, (1.0 + step) / (10.0 + step)).astype(jnp.float32)
    new = ema_targets(params, model_state)
    return jax.tree.map(lambda e, x: (rate * e + (1.0 - rate) * x).astype(e.dtype), ema, new)


def evaluation_weights(state: "TrainState", which: str) -> tuple[Any, dict]:
    """(params, model_state) of the online weights ('online') or their average ('ema')."""
    if which == "online":
        return state.params, state.model_state
    if not state.ema:
        raise ValueError("this train state keeps no EMA of the weights (config.ema_decay is 0)")
    averaged = {k: v for k, v in state.ema.items() if k != "params"}
    return state.ema["params"], {**state.model_state, **averaged}


def _path_key(path) -> tuple[str, ...]:
    """A pytree path as a tuple of names, whatever the key types (dict keys, attributes)."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


class StateFactory:
    """Builds the train state directly sharded (no host copy of the parameters).

    ``abstract()`` gives shapes and shardings without allocating (paper-scale recipes are
    shape-checked on CPU this way); ``create()`` materialises it with jit(out_shardings=...).
    """

    def __init__(self, objective, make_tx, example_batch: dict, mesh, rules, seed: int,
                 ema_decay: float = 0.0, micro_batches: int = 1):
        self.objective = objective
        self.ema_decay = ema_decay
        self.micro_batches = micro_batches  # GradCache slices per step (1: off)
        self.mesh = mesh
        self.rules = rules
        self._batch = example_batch
        self._seed = seed
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            boxed = jax.eval_shape(self._init_variables, jax.random.PRNGKey(seed))
            var_shardings = sharding.logical_shardings(boxed, mesh, rules)
        sharding.check_divisible(nn.unbox(boxed), var_shardings)
        params_abstract, _ = split_variables(nn.unbox(boxed))
        self.param_shardings, self.model_state_shardings = split_variables(var_shardings)
        self.tx, self.schedule = make_tx(params_abstract)

    def _init_variables(self, rng):
        init_rng, _ = jax.random.split(rng)
        return self.objective.init_variables(init_rng, self._batch)

    def _init(self, rng):
        params, model_state = split_variables(nn.unbox(self._init_variables(rng)))
        ema = ema_targets(params, model_state) if self.ema_decay else {}
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=self.tx.init(params), model_state=model_state,
                          rng=jax.random.split(rng)[1], ema=ema)

    def shardings(self, abstract_state: TrainState) -> TrainState:
        replicated = sharding.replicated(self.mesh)
        # An optimizer leaf whose path ends with a parameter's path and that has its shape
        # (Adam's moments, LARS momentum, also inside optax.partition's per-group states) is
        # sharded like the parameter; the rest (counts, Adafactor's factored row and column
        # statistics) are small and replicated.
        params = {_path_key(path): (leaf.shape, shard) for (path, leaf), shard in zip(
            jax.tree_util.tree_leaves_with_path(abstract_state.params),
            jax.tree.leaves(self.param_shardings), strict=True)}

        def opt_sharding(path, leaf):
            key = _path_key(path)
            for start in range(len(key)):  # the longest matching suffix first
                shape, shard = params.get(key[start:], (None, None))
                if shape == leaf.shape:
                    return shard
            return replicated

        opt_shardings = jax.tree_util.tree_map_with_path(opt_sharding, abstract_state.opt_state)
        ema = (ema_targets(self.param_shardings, self.model_state_shardings)
               if self.ema_decay else {})
        return TrainState(step=replicated, params=self.param_shardings, opt_state=opt_shardings,
                          model_state=self.model_state_shardings, rng=replicated, ema=ema)

    def abstract(self) -> TrainState:
        """ShapeDtypeStructs carrying the target shardings (also the restore target)."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            shapes = jax.eval_shape(self._init, jax.random.PRNGKey(self._seed))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.shardings(shapes))

    def create(self) -> TrainState:
        abstract = self.abstract()
        out_shardings = jax.tree.map(lambda s: s.sharding, abstract)
        # Initialisation runs once: XLA's cheapest optimisation level compiles it ~5x faster
        # (random-number kernels dominate); values agree with the optimised build to 1 ulp.
        init = jax.jit(self._init, out_shardings=out_shardings,
                       compiler_options={"xla_backend_optimization_level": 0})
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return init(jax.random.PRNGKey(self._seed))

    def initial_weights(self) -> tuple[Any, dict]:
        """(params, model_state) as ``create()`` initialises them, without optimizer state:
        the randomly initialised network that evaluators report as a baseline."""
        init = jax.jit(lambda rng: split_variables(nn.unbox(self._init_variables(rng))),
                       out_shardings=(self.param_shardings, self.model_state_shardings),
                       compiler_options={"xla_backend_optimization_level": 0})
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return init(jax.random.PRNGKey(self._seed))


# Bits of the 'nonfinite' metric: which part of a step held a NaN or an infinity.
NONFINITE_PARTS = {1: "the loss", 2: "the gradients", 4: "the parameters"}


@dataclasses.dataclass(frozen=True)
class Poison:
    """A fault injected into one step for tests (config.debug): 'loss', 'grads' or 'params'
    are overwritten with ``value`` (nan or inf) at optimizer step ``step`` (1-based)."""

    step: int
    where: str
    value: float

    def apply(self, state_step, where: str, tree):
        if where != self.where:
            return tree
        hit = state_step + 1 == self.step
        return jax.tree.map(lambda x: jnp.where(hit, jnp.asarray(self.value, x.dtype), x), tree)


def nonfinite_bits(loss, grad_norm, params) -> jax.Array:
    """int32 bitmask of NONFINITE_PARTS for one step (0: all finite)."""
    bad = [~jnp.isfinite(loss), ~jnp.isfinite(grad_norm), ~jnp.isfinite(optax.tree.norm(params))]
    return sum(b.astype(jnp.int32) * bit for b, bit in zip(bad, NONFINITE_PARTS))


def make_train_step(factory: StateFactory, state_shardings: TrainState, poison: Poison | None = None):
    """jit(state, batch) -> (state, metrics): one optimizer step, state donated. The metrics
    include 'nonfinite' (see NONFINITE_PARTS), which the trainer checks before every save."""
    objective, tx, schedule = factory.objective, factory.tx, factory.schedule
    spoil = poison.apply if poison else (lambda step, where, tree: tree)

    def train_step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(state.rng, state.step)
        grad_fn = (grad_cache.value_and_grad(objective, factory.micro_batches, factory.mesh)
                   if factory.micro_batches > 1
                   else jax.value_and_grad(objective.loss_fn, has_aux=True))
        (_, (metrics, model_state)), grads = grad_fn(state.params, state.model_state, batch, rng,
                                                     state.step)
        grads = spoil(state.step, "grads", grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = objective.postprocess_params(optax.apply_updates(state.params, updates))
        params = spoil(state.step, "params", params)
        metrics = {**metrics, "loss": spoil(state.step, "loss", metrics["loss"])}
        grad_norm = optax.tree.norm(grads)
        metrics.update(learning_rate=schedule(state.step), grad_norm=grad_norm,
                       nonfinite=nonfinite_bits(metrics["loss"], grad_norm, params))
        ema = (ema_update(state.ema, params, model_state, state.step, factory.ema_decay)
               if factory.ema_decay else state.ema)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  model_state=model_state, ema=ema)
        return new_state, metrics

    return jax.jit(sharding.under_rules(train_step, factory.rules),
                   in_shardings=(state_shardings, sharding.batch_sharding(factory.mesh)),
                   out_shardings=(state_shardings, sharding.replicated(factory.mesh)),
                   donate_argnums=0)

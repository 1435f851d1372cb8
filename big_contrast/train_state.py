"""The train state (one pytree), its shardings, and the jitted train step.

State = params + optimizer state + step + rng + the objective's model_state (batch statistics,
queues, EMA). Parameters and their optimizer moments are sharded by the logical axis names the
modules declare; everything else is replicated.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from big_contrast import sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    model_state: Any  # non-parameter collections, e.g. {'batch_stats': ...}
    rng: jax.Array  # raw uint32[2] key; each step folds in its step number


def split_variables(variables: dict) -> tuple[Any, dict]:
    params = variables["params"]
    return params, {k: v for k, v in variables.items() if k != "params"}


class StateFactory:
    """Builds the train state directly sharded (no host copy of the parameters).

    ``abstract()`` gives shapes and shardings without allocating (paper-scale recipes are
    shape-checked on CPU this way); ``create()`` materialises it with jit(out_shardings=...).
    """

    def __init__(self, objective, make_tx, example_batch: dict, mesh, rules, seed: int):
        self.objective = objective
        self.mesh = mesh
        self.rules = rules
        self._batch = example_batch
        self._seed = seed
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            boxed = jax.eval_shape(self._init_variables, jax.random.PRNGKey(seed))
            var_shardings = sharding.logical_shardings(boxed, mesh, rules)
        params_abstract, _ = split_variables(nn.unbox(boxed))
        self.param_shardings, self.model_state_shardings = split_variables(var_shardings)
        self.tx, self.schedule = make_tx(params_abstract)

    def _init_variables(self, rng):
        init_rng, _ = jax.random.split(rng)
        return self.objective.init_variables(init_rng, self._batch)

    def _init(self, rng):
        params, model_state = split_variables(nn.unbox(self._init_variables(rng)))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=self.tx.init(params), model_state=model_state,
                          rng=jax.random.split(rng)[1])

    def shardings(self, abstract_state: TrainState) -> TrainState:
        replicated = sharding.replicated(self.mesh)
        opt_shardings = optax.tree_map_params(
            self.tx, lambda _, s: s, abstract_state.opt_state, self.param_shardings,
            transform_non_params=lambda _: replicated)
        return TrainState(step=replicated, params=self.param_shardings, opt_state=opt_shardings,
                          model_state=self.model_state_shardings, rng=replicated)

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


def make_train_step(factory: StateFactory, state_shardings: TrainState):
    """jit(state, batch) -> (state, metrics): one optimizer step, state donated."""
    objective, tx, schedule = factory.objective, factory.tx, factory.schedule

    def train_step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(state.rng, state.step)
        grad_fn = jax.value_and_grad(objective.loss_fn, has_aux=True)
        (_, (metrics, model_state)), grads = grad_fn(state.params, state.model_state, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = objective.postprocess_params(optax.apply_updates(state.params, updates))
        metrics = {**metrics, "learning_rate": schedule(state.step),
                   "grad_norm": optax.tree.norm(grads)}
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  model_state=model_state)
        return new_state, metrics

    return jax.jit(train_step,
                   in_shardings=(state_shardings, sharding.batch_sharding(factory.mesh)),
                   out_shardings=(state_shardings, sharding.replicated(factory.mesh)),
                   donate_argnums=0)

"""What train, evaluate and the benchmarks all derive from a config: mesh, tokenizer,
objective, training length and the train-state factory."""

from __future__ import annotations

import jax
import numpy as np

from big_contrast import config as config_lib, feeding, grad_cache, optim, sharding, validation
from big_contrast import workdir as workdir_lib
from big_contrast.data import sources, tokenizers
from big_contrast.objectives import build_objective
from big_contrast.train_state import Poison, StateFactory, TrainState, make_train_step


def build_tokenizer(config, workdir: str | None = None) -> tokenizers.Tokenizer:
    """The config's tokenizer; a built-in word vocabulary comes from the run's stored copy
    when the workdir has one (workdir.store_vocabulary)."""
    t = config.text
    model_path = t.model_path or None
    if t.tokenizer == "vocab" and not model_path:
        model_path = workdir_lib.stored_vocabulary(workdir)
    return tokenizers.get_tokenizer(t.tokenizer, t.max_len, t.vocab_size, model_path,
                                    config.data.source)


def example_batch(spec, max_len: int) -> dict:
    """A one-example batch with the spec's shapes, for initialising parameters: 'image'
    [1, H, W, 3] for one view, 'crops_{size}' [1, num_views, size, size, 3] per resolution for
    several (BatchSpec.image_groups)."""
    batch = {group.key: np.zeros((1, *group.example_shape), np.uint8)
             for group in spec.image_groups()}
    if spec.text:
        batch["text"] = np.zeros((1, max_len), np.int32)
    return batch


def training_length(config, examples_per_epoch: int | None) -> tuple[int, int]:
    """(total_steps, warmup_steps) from whichever duration units the config uses."""
    total = config_lib.steps_from_duration(config, "total", config.batch_size, examples_per_epoch)
    if total is None:
        raise config_lib.ConfigError("set the training length: total_steps, total_examples "
                                     "or total_epochs")
    warmup = config_lib.steps_from_duration(config.optim, "warmup", config.batch_size,
                                            examples_per_epoch) or 0
    return total, warmup


class Experiment:
    """The pieces of a run that follow from its config alone (no data read, no state built).

    ``examples_per_epoch`` may be given to avoid opening the training source (shape checks of
    paper-scale recipes whose data is not on this machine); ``workdir``, the run's, holds
    what the config does not pin down (a built-in vocabulary).
    """

    def __init__(self, config, devices=None, examples_per_epoch: int | None = None,
                 workdir: str | None = None):
        validation.validate(config)
        self.config = config
        try:
            self.mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
            self.batch_feed = feeding.BatchFeed.for_mesh(self.mesh, config.batch_size)
        except ValueError as e:
            raise config_lib.ConfigError(str(e)) from None
        self.rules = sharding.rules_from_config(config.sharding_rules)
        self.tokenizer = build_tokenizer(config, workdir)
        self.objective = build_objective(config, self.tokenizer)
        if examples_per_epoch is None and config.total_epochs is not None:
            try:
                train_source = sources.build_source(config.data, config.data.train_split)
            except (ValueError, FileNotFoundError) as e:
                raise config_lib.ConfigError(f"total_epochs needs the training split's size: "
                                             f"{e}") from None
            examples_per_epoch = sources.num_examples(train_source)
        self.total_steps, self.warmup_steps = training_length(config, examples_per_epoch)
        self.eval_weights = {"online": ("online",), "ema": ("ema",)}.get(
            config.eval_weights, ("online", "ema") if config.ema_decay else ("online",))
        debug = config.debug
        self.poison = (Poison(debug.poison_step, debug.poison_where, debug.poison_value)
                       if debug.poison_step else None)
        try:
            self.state_factory = StateFactory(
                self.objective,
                lambda params: optim.make_optimizer(
                    config.optim, params, self.total_steps, self.warmup_steps,
                    self.objective.param_groups(params), self.objective.frozen_groups()),
                example_batch(self.objective.batch_spec, config.text.max_len),
                self.mesh, self.rules, config.seed, config.ema_decay,
                config.grad_cache.micro_batches)
        except sharding.IndivisibleError as e:
            raise config_lib.ConfigError(f"mesh {dict(self.mesh.shape)}: {e}") from None
        if config.grad_cache.micro_batches > 1:
            grad_cache.check_supported(self.objective, self.state_factory.model_state_shardings,
                                       config.batch_size, config.grad_cache.micro_batches,
                                       self.mesh)

    def train_step(self, abstract_state: TrainState | None = None):
        """The jitted train step (train_state.make_train_step) for this experiment's sharded
        state, poisoned as config.debug asks; pass the abstract state if you have it already."""
        if abstract_state is None:
            abstract_state = self.state_factory.abstract()
        return make_train_step(self.state_factory,
                               jax.tree.map(lambda s: s.sharding, abstract_state), self.poison)

    def abstract_batch(self, size: int) -> dict:
        """ShapeDtypeStructs of a global batch of ``size`` examples, sharded over the batch
        axes as the input pipeline delivers it: for lowering the train step without data."""
        batch_sharding = sharding.batch_sharding(self.mesh)
        one = example_batch(self.objective.batch_spec, self.config.text.max_len)
        return {k: jax.ShapeDtypeStruct((size, *v.shape[1:]), v.dtype, sharding=batch_sharding)
                for k, v in one.items()}

"""Evaluators declared in the config: ``config.evals.<name> = {type, every, **options}``.

An evaluator is built as ``cls(embedder, data_config, tokenizer, name, **options)``, its
options being its keyword-only arguments; ``run(params, model_state)`` returns {metric: value},
which the trainer logs as '<name>/<metric>' every ``every`` steps and after the last step.
"""

from __future__ import annotations

import dataclasses
import inspect

from big_contrast.config import ConfigError, closest_suggestion
from big_contrast.evaluators.captioning import Captioning
from big_contrast.evaluators.common import Embedder
from big_contrast.evaluators.knn import KNNClassification
from big_contrast.evaluators.linear_probe import LinearProbeClassification
from big_contrast.evaluators.retrieval import Retrieval
from big_contrast.evaluators.zero_shot import ZeroShotClassification

EVALUATORS = {"zero_shot": ZeroShotClassification, "retrieval": Retrieval,
              "captioning": Captioning, "knn": KNNClassification,
              "linear_probe": LinearProbeClassification}


@dataclasses.dataclass
class ScheduledEvaluator:
    name: str
    every: int  # steps between runs; 0 = only after the last step
    evaluator: object

    def due(self, step: int, total_steps: int) -> bool:
        return step == total_steps or (self.every > 0 and step % self.every == 0)


def _options(name: str, cls, options: dict) -> dict:
    """The options, checked against the evaluator's keyword-only arguments."""
    params = inspect.signature(cls).parameters.values()
    accepted = [p.name for p in params if p.kind == inspect.Parameter.KEYWORD_ONLY]
    for key in options:
        if key not in accepted:
            raise ConfigError(f"unknown option 'evals.{name}.{key}' for a {cls.__name__} "
                              f"evaluator{closest_suggestion(key, accepted)}; "
                              f"options: {', '.join(accepted)}")
    for p in params:
        required = p.kind == inspect.Parameter.KEYWORD_ONLY and p.default is p.empty
        if required and p.name not in options:
            raise ConfigError(f"evals.{name}.{p.name} is required for a {cls.__name__} evaluator")
    return options


def build_evaluators(evals_config, objective, mesh, data_config, tokenizer,
                     batch_size: int, *, initial_weights=None,
                     rules=()) -> list[ScheduledEvaluator]:
    """``initial_weights``: () -> (params, model_state) at the random initialisation (the
    trainer passes ``StateFactory.initial_weights``); with it, knn and linear_probe also report
    a random-initialisation baseline ('<split>/random_init_top1'), without it they omit it.
    ``rules``: the experiment's logical-axis rules, in force while the models are traced."""
    embedder = Embedder(objective, mesh, batch_size, initial_weights, rules)
    scheduled = []
    for name, cfg in evals_config.items():
        options = cfg.to_dict()
        kind, every = options.pop("type", None), options.pop("every", 0)
        if kind not in EVALUATORS:
            raise ConfigError(f"evals.{name}.type is {kind!r}{closest_suggestion(str(kind), EVALUATORS)}; "
                              f"types: {', '.join(EVALUATORS)}")
        cls = EVALUATORS[kind]
        options = _options(name, cls, options)
        try:
            evaluator = cls(embedder, data_config, tokenizer, name, **options)
        except ConfigError:
            raise
        except (ValueError, FileNotFoundError) as e:  # its data: say which evaluator reads it
            raise ConfigError(f"evals.{name} ({kind}): {e}") from e
        scheduled.append(ScheduledEvaluator(name, int(every), evaluator))
    return scheduled


def run_all(evaluators, params, model_state, show) -> dict:
    """{'<name>/<metric>': value} for every evaluator; the samples an evaluator keeps of its
    run (generated captions) go to ``show``, one line each."""
    results = {}
    for item in evaluators:
        for key, value in item.evaluator.run(params, model_state).items():
            results[f"{item.name}/{key}"] = value
        for line in getattr(item.evaluator, "last_samples", ()):
            show(f"{item.name}: {line}")
    return results

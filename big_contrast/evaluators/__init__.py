"""Evaluators declared in the config: ``config.evals.<name> = {type, every, **options}``.

Each evaluator's ``run(params, model_state)`` returns {metric: value}; the trainer logs them
as '<name>/<metric>' every ``every`` steps and after the last step.
"""

from __future__ import annotations

import dataclasses
import inspect

from big_contrast.config import ConfigError, closest_suggestion
from big_contrast.evaluators.common import Embedder
from big_contrast.evaluators.retrieval import Retrieval
from big_contrast.evaluators.zero_shot import ZeroShotClassification

EVALUATORS = {"zero_shot": ZeroShotClassification, "retrieval": Retrieval}


@dataclasses.dataclass
class ScheduledEvaluator:
    name: str
    every: int  # steps between runs; 0 = only after the last step
    evaluator: object

    def due(self, step: int, total_steps: int) -> bool:
        return step == total_steps or (self.every > 0 and step % self.every == 0)


def _options(name: str, cls, options: dict) -> dict:
    accepted = [p for p, spec in inspect.signature(cls).parameters.items()
                if spec.kind == inspect.Parameter.KEYWORD_ONLY]
    for key in options:
        if key not in accepted:
            raise ConfigError(f"unknown option 'evals.{name}.{key}' for a {cls.__name__} "
                              f"evaluator{closest_suggestion(key, accepted)}; "
                              f"options: {', '.join(accepted)}")
    return options


def build_evaluators(evals_config, objective, mesh, data_config, tokenizer,
                     batch_size: int) -> list[ScheduledEvaluator]:
    embedder = Embedder(objective, mesh, batch_size)
    scheduled = []
    for name, cfg in evals_config.items():
        options = cfg.to_dict()
        kind, every = options.pop("type", None), options.pop("every", 0)
        if kind not in EVALUATORS:
            raise ConfigError(f"evals.{name}.type is {kind!r}{closest_suggestion(str(kind), EVALUATORS)}; "
                              f"types: {', '.join(EVALUATORS)}")
        cls = EVALUATORS[kind]
        evaluator = cls(embedder, data_config, tokenizer, **_options(name, cls, options))
        scheduled.append(ScheduledEvaluator(name, int(every), evaluator))
    return scheduled


def run_all(evaluators, params, model_state) -> dict:
    """{'<name>/<metric>': value} for every evaluator."""
    results = {}
    for item in evaluators:
        for key, value in item.evaluator.run(params, model_state).items():
            results[f"{item.name}/{key}"] = value
    return results

"""Watches a SwAV run for collapse: code and prediction entropies, embedding spread, prototype use.

  python tools/swav_dynamics.py --config configs/swav.py:demo --steps 150 --every 25 \
      [--set swav.epsilon=0.02 loss.temperature=0.2]

Trains with the real train step (no checkpoints, no evaluators) and every ``--every`` steps
prints, on the next batch: the mean entropy of the Sinkhorn codes of the first crop (ln K
when every code is uniform), the mean entropy of the second crop's predictions softmax(s / τ),
the mean cosine between the first crop's embeddings of different images (1 when they have
collapsed onto one point), the spread of the prototype scores over the batch, and how many
prototypes are some image's strongest code. A loss that falls while the code entropy climbs
to ln K and the cosine rises is the trivial solution, not learning, unless the run turns back
(the hard-code demo does after about 200 steps: README, "Image-only self-supervision").
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp

from big_contrast import cli, config as config_lib, host_memory, losses
from big_contrast.data import pipeline
from big_contrast.experiment import Experiment


# Printed in this order (jax.device_get hands the dict back with its keys sorted).
STATISTICS = ("code_entropy", "prediction_entropy", "mean_cosine", "score_spread",
              "prototypes_used")


def _entropy(probs):
    return -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1).mean()


def statistics(objective, config, params, model_state, batch) -> dict:
    """The collapse statistics of one batch (training-mode forward, state left unchanged)."""
    out, _ = objective.crop_outputs(params, model_state, batch)
    scores, embeddings = out["scores"], out["embeddings"][0]
    codes = losses.sinkhorn(scores[0], config.swav.epsilon, config.swav.sinkhorn_iterations)
    predictions = jax.nn.softmax(scores[1] / config.loss.temperature, axis=-1)
    batch_size, num_prototypes = codes.shape
    cosines = embeddings @ embeddings.T
    off_diagonal = (jnp.sum(cosines) - jnp.trace(cosines)) / (batch_size * (batch_size - 1))
    strongest = jax.nn.one_hot(jnp.argmax(codes, axis=-1), num_prototypes).max(axis=0)
    return {"code_entropy": _entropy(codes), "prediction_entropy": _entropy(predictions),
            "mean_cosine": off_diagonal, "score_spread": scores[0].std(axis=0).mean(),
            "prototypes_used": strongest.sum()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a SwAV config, e.g. configs/swav.py:demo")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. swav.epsilon=0.02 seed=1")
    args = parser.parse_args()
    host_memory.keep_freed_memory()
    config = cli.config_from_arguments(parser, args.config, args.set)
    if config.objective != "swav":
        parser.error(f"{args.config} trains {config.objective!r}; this tool watches SwAV")
    try:
        experiment = Experiment(config)  # validates the config
    except config_lib.ConfigError as e:
        parser.error(str(e))
    state = experiment.state_factory.create()
    step_fn = experiment.train_step()
    measure = jax.jit(lambda p, s, b: statistics(experiment.objective, config, p, s, b))
    data = pipeline.TrainBatches(config.data, experiment.objective.batch_spec,
                                 experiment.tokenizer, config.batch_size, config.seed,
                                 experiment.mesh)
    print(f"ln K = {math.log(config.model.num_prototypes):.3f}")
    metrics = None
    try:
        with jax.set_mesh(experiment.mesh):
            for step in range(args.steps + 1):
                batch = next(data)
                if step % args.every == 0:
                    stats = jax.device_get(measure(state.params, state.model_state, batch))
                    loss = f"{float(metrics['loss']):.3f}" if metrics else "-"
                    print(f"step {step:5d} | last loss {loss} | "
                          + " | ".join(f"{k} {float(stats[k]):.3f}" for k in STATISTICS),
                          flush=True)
                if step < args.steps:
                    state, metrics = step_fn(state, batch)
    finally:
        data.close()


if __name__ == "__main__":
    main()

"""Linear probe: multinomial logistic regression on frozen image embeddings.

The probe is fitted full-batch with L-BFGS (optax) for a fixed number of steps, on features
standardised with its training examples' mean and standard deviation. Its L2 penalty is chosen
from a grid by accuracy on a held-out part of the training split (never on an evaluated split),
then the probe is refitted on the whole training set with that penalty.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from big_contrast.config import ConfigError
from big_contrast.evaluators import common, knn

DEFAULT_L2_GRID = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)


def _fit(features, labels, weights, l2, *, num_classes: int, steps: int):
    """L-BFGS on the weighted mean cross-entropy + l2/2 * |W|^2 (the bias is not penalised)."""
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    total = jnp.maximum(weights.sum(), 1.0)

    def loss(params):
        logits = features @ params["w"] + params["b"]
        cross_entropy = -jnp.sum(onehot * jax.nn.log_softmax(logits), axis=-1)
        return jnp.sum(weights * cross_entropy) / total + 0.5 * l2 * jnp.sum(params["w"] ** 2)

    params = {"w": jnp.zeros((features.shape[1], num_classes), jnp.float32),
              "b": jnp.zeros((num_classes,), jnp.float32)}
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry, _):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad,
                                       value_fn=loss)
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, solver.init(params)), None, length=steps)
    return params["w"], params["b"]


# One compilation per (examples, features, classes, steps): the L2 penalty and the example
# weights (which select the fitting part) are traced, so the grid search and the refit share it.
_fit_jit = jax.jit(_fit, static_argnames=("num_classes", "steps"))


def fit_logistic_regression(features: np.ndarray, labels: np.ndarray, num_classes: int,
                            l2: float, steps: int = 200, weights: np.ndarray | None = None):
    """(W [D, C], b [C]) of multinomial logistic regression from zero, as numpy; ``weights``
    [N] (default ones) weight each example's loss (zero leaves it out). Runs on this process's
    first device: every process fits the same probe on the same (replicated) features."""
    features = np.asarray(features, np.float32)
    weights = np.ones(len(features), np.float32) if weights is None else weights
    local = jax.sharding.Mesh(np.array(jax.local_devices()[:1]), ("local",))
    with jax.set_mesh(local):
        w, b = _fit_jit(features, np.asarray(labels, np.int32), np.asarray(weights, np.float32),
                        np.float32(l2), num_classes=int(num_classes), steps=int(steps))
        return np.asarray(w), np.asarray(b)


def standardiser(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per feature; a constant feature's std is taken as 1 (it stays 0)."""
    features = np.asarray(features, np.float64)
    mean, std = features.mean(axis=0), features.std(axis=0)
    return mean.astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32)


def holdout_split(n: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, held-out indices): a seeded random ``fraction`` of n held out, at least
    one example in each part."""
    if n < 2:
        raise ValueError(f"a linear probe needs at least 2 training examples, got {n}")
    held = min(max(int(round(n * fraction)), 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[held:]), np.sort(order[:held])


@dataclasses.dataclass(frozen=True)
class LinearProbe:
    """A fitted probe: logits = ((x - mean) / std) @ weights + bias."""
    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray
    bias: np.ndarray
    l2: float  # the penalty chosen on the held-out part
    holdout_top1: float  # that penalty's held-out accuracy (fitted without the held-out part)
    holdout_accuracies: dict  # {l2: held-out accuracy} over the grid

    def logits(self, features: np.ndarray) -> np.ndarray:
        standardised = (np.asarray(features, np.float32) - self.mean) / self.std
        return standardised @ self.weights + self.bias

    def accuracy(self, features: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean(np.argmax(self.logits(features), axis=1) == np.asarray(labels)))


def train_linear_probe(features: np.ndarray, labels: np.ndarray, num_classes: int, *,
                       l2_grid=DEFAULT_L2_GRID, holdout_fraction: float = 0.2, steps: int = 200,
                       seed: int = 0) -> LinearProbe:
    """Choose the L2 penalty on a held-out part of these training examples, then refit on all.

    For each penalty of ``l2_grid`` a probe is fitted on the fitting part (standardised with
    its own mean and std) and scored on the held-out ``holdout_fraction`` (a seeded random
    subset); the most accurate penalty wins, ties going to the larger penalty. The returned
    probe is refitted with it on every example, standardised with all their mean and std.
    """
    features = np.asarray(features, np.float32)
    labels = np.asarray(labels).astype(np.int32)
    fit, held = holdout_split(len(features), holdout_fraction, seed)
    mean, std = standardiser(features[fit])
    standardised = (features - mean) / std
    weights = np.zeros(len(features), np.float32)
    weights[fit] = 1.0  # held-out examples ride along with zero weight: one compiled shape
    accuracies = {}
    for l2 in l2_grid:
        w, b = fit_logistic_regression(standardised, labels, num_classes, l2, steps, weights)
        predicted = np.argmax(standardised[held] @ w + b, axis=1)
        accuracies[float(l2)] = float(np.mean(predicted == labels[held]))
    best = max(accuracies, key=lambda l2: (accuracies[l2], l2))
    mean, std = standardiser(features)
    w, b = fit_logistic_regression((features - mean) / std, labels, num_classes, best, steps)
    return LinearProbe(mean, std, w, b, best, accuracies[best], accuracies)


def _check_l2_grid(name: str, l2_grid) -> tuple[float, ...]:
    values = (l2_grid,) if isinstance(l2_grid, (int, float)) else tuple(l2_grid or ())
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                             and v >= 0 for v in values):
        raise ConfigError(f"evals.{name}.l2_grid must list at least one penalty >= 0, got "
                          f"{l2_grid!r}")
    return tuple(float(v) for v in values)


class LinearProbeClassification(knn.WithRandomInitBaseline):
    """Top-1 accuracy of a linear probe (multinomial logistic regression) on frozen image
    embeddings, fitted each run on ``train_examples`` labelled examples of ``train_split``.

    The probe's L2 penalty is chosen from ``l2_grid`` by accuracy on a held-out
    ``holdout_fraction`` of the training examples, never on the evaluated splits; the probe is
    then refitted on all training examples with it (see ``train_linear_probe``).

    Metrics:
      '<split>/top1' for each split of ``splits``;
      'l2': the chosen penalty; 'holdout_top1': its accuracy on the held-out part;
      '<split>/random_init_top1': the same protocol on the network at its random
        initialisation (the embedder's ``initial_weights``), a baseline that says what the
        trained number is worth. It is computed on the first run and cached; it is omitted
        when the embedder has no ``initial_weights``.

    Args:
      splits: the splits whose images are classified.
      label_key: the record field holding the class (synthetic data: 'shape', 'colour', ...).
      num_examples: examples per evaluated split (a fixed random subset when larger).
      train_split, train_examples: the split and number of the probe's training examples.
      holdout_fraction: the part of the training examples held out to choose the penalty.
      l2_grid: the L2 penalties tried (on the mean cross-entropy of standardised features).
      steps: L-BFGS steps of each fit.
      where: keep only records whose fields equal these values, in the training set and every
        split, e.g. {'num_objects': 1}.
      source, path, image_key: read this evaluator's images from another dataset than
        training's (``data.*`` otherwise); a file source needs '{split}' in its path.
    """

    def __init__(self, embedder, data_config, tokenizer, name: str = "linear_probe", *,
                 splits=("val",), label_key: str = "shape", num_examples: int = 1000,
                 train_split: str = "train", train_examples: int = 5000,
                 holdout_fraction: float = 0.2, l2_grid=DEFAULT_L2_GRID, steps: int = 200,
                 where=None, source=None, path=None, image_key=None):
        self.splits = knn.check_splits(name, "splits", splits)
        train_split = knn.check_split(name, "train_split", train_split)
        knn.check_at_least(name, "num_examples", num_examples, 1)
        knn.check_at_least(name, "train_examples", train_examples, 2)
        knn.check_at_least(name, "steps", steps, 1)
        if isinstance(holdout_fraction, bool) or not isinstance(holdout_fraction, (int, float)) \
                or not 0 < holdout_fraction < 1:
            raise ConfigError(f"evals.{name}.holdout_fraction must be between 0 and 1 "
                              f"(exclusive), got {holdout_fraction!r}")
        self.l2_grid = _check_l2_grid(name, l2_grid)
        where = knn.check_where(name, where)
        data_config = common.override_data(data_config, name, source=source, path=path,
                                           image_key=image_key)
        knn.check_disjoint(name, data_config, ("train_split", train_split), self.splits)
        self.embedder = embedder
        self.holdout_fraction, self.steps = float(holdout_fraction), int(steps)
        sets = {"train": (train_split, int(train_examples)),
                **{split: (split, int(num_examples)) for split in self.splits}}
        self.data, self.num_classes = knn.load_labelled_sets(data_config, sets, label_key, where)
        holdout_split(len(self.data["train"][1]), self.holdout_fraction)  # enough examples?
        self._random_init = None  # the random-initialisation baseline, once computed

    def measure(self, params, model_state) -> dict:
        """Fits the probe on these weights' features; its top-1 on every split."""
        images, labels = self.data["train"]
        probe = train_linear_probe(self.embedder.images(params, model_state, images), labels,
                                   self.num_classes, l2_grid=self.l2_grid,
                                   holdout_fraction=self.holdout_fraction, steps=self.steps)
        metrics = {}
        for split in self.splits:
            images, labels = self.data[split]
            metrics[knn.metric_key(split, "top1")] = probe.accuracy(
                self.embedder.images(params, model_state, images), labels)
        return {**metrics, "l2": probe.l2, "holdout_top1": probe.holdout_top1}

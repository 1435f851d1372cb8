"""The kNN and linear-probe evaluators: the weighted kNN vote against a per-query
re-derivation, the probe's penalty chosen on held-out training examples only, both end to end
on a tiny CLIP with the random-initialisation baseline computed once, and their option errors."""

import math

import jax
import ml_collections
import numpy as np
import pytest

from big_contrast import config as bc, evaluators, sharding
from big_contrast.evaluators import linear_probe as lp
from big_contrast.evaluators.knn import top_k_accuracy, weighted_knn_votes
from big_contrast.experiment import Experiment
from tests.helpers import tiny_clip_config


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _votes_one_by_one(query, bank, bank_labels, num_classes, k, temperature):
    """Sort each query's similarities, take the k largest, add exp(s / T) (float64) per class."""
    votes = np.zeros((len(query), num_classes))
    for i, q in enumerate(query.astype(np.float64)):
        similarity = bank.astype(np.float64) @ q
        for j in np.argsort(-similarity)[:k]:
            votes[i, bank_labels[j]] += math.exp(similarity[j] / temperature)
    return votes


@pytest.mark.parametrize("k, temperature, max_similarities", [
    (7, 0.1, 1 << 24), (7, 0.07, 60), (1, 0.5, 1 << 24), (80, 0.2, 100)])  # 80 > bank: all 50
def test_knn_votes_match_a_per_query_re_derivation(k, temperature, max_similarities):
    rng = np.random.default_rng(0)
    query, bank = _unit(rng.normal(size=(30, 8))), _unit(rng.normal(size=(50, 8)))
    labels = rng.integers(0, 6, size=50)
    got = weighted_knn_votes(query, bank, labels, 6, k, temperature, max_similarities)
    want = _votes_one_by_one(query, bank, labels, 6, k, temperature)
    assert got.shape == (30, 6) and got.dtype == np.float32
    # Each query's votes are scaled by exp(-max similarity / T): compare the vote shares.
    np.testing.assert_allclose(got / got.sum(1, keepdims=True),
                               want / want.sum(1, keepdims=True), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
    # Only the k nearest vote: a query has at most k classes with votes.
    assert ((got > 0).sum(1) <= min(k, 50)).all()


def test_knn_votes_stay_finite_at_a_tiny_temperature():
    # exp(1 / 0.005) overflows float32; subtracting each query's top similarity does not.
    rng = np.random.default_rng(1)
    query, bank = _unit(rng.normal(size=(20, 4))), _unit(rng.normal(size=(40, 4)))
    labels = rng.integers(0, 5, size=40)
    votes = weighted_knn_votes(query, bank, labels, 5, k=10, temperature=0.005)
    assert np.isfinite(votes).all()
    nearest = labels[np.argmax(query @ bank.T, axis=1)]
    np.testing.assert_array_equal(votes.argmax(1), nearest)  # the nearest neighbour dominates


def test_knn_top5_is_at_least_top1_and_clusters_are_classified_perfectly():
    rng = np.random.default_rng(2)
    centres = _unit(rng.normal(size=(10, 32)))
    bank_labels, query_labels = np.repeat(np.arange(10), 20), rng.integers(0, 10, size=100)
    bank = _unit(centres[bank_labels] + 0.05 * rng.normal(size=(200, 32)))
    query = _unit(centres[query_labels] + 0.05 * rng.normal(size=(100, 32)))
    votes = weighted_knn_votes(query, bank, bank_labels, 10, k=30, temperature=0.07)
    assert top_k_accuracy(votes, query_labels, 1) == 1.0
    # Noise features: accuracy near chance, top-5 >= top-1, and top-10 of 10 classes is 1.
    noise = weighted_knn_votes(_unit(rng.normal(size=(100, 32))), bank, bank_labels, 10, 30, 0.07)
    top1, top5 = top_k_accuracy(noise, query_labels, 1), top_k_accuracy(noise, query_labels, 5)
    assert top1 < 0.3 and top5 >= top1 and top_k_accuracy(noise, query_labels, 10) == 1.0


def test_top_k_accuracy_counts_the_label_among_the_k_best():
    scores = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    labels = np.array([2, 0, 0])
    assert top_k_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
    assert top_k_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
    assert top_k_accuracy(scores, labels, 3) == 1.0


def _clusters(rng, n, num_classes=4, dim=16, spread=0.5):
    centres = np.random.default_rng(99).normal(size=(num_classes, dim)) * 2
    labels = rng.integers(0, num_classes, size=n)
    return (centres[labels] + spread * rng.normal(size=(n, dim))).astype(np.float32), labels


def test_linear_probe_separates_gaussian_clusters():
    rng = np.random.default_rng(0)
    (x, y), (test_x, test_y) = _clusters(rng, 300), _clusters(rng, 500)
    probe = lp.train_linear_probe(x * 0.01 + 3.0, y, 4, steps=50)  # standardised: scale is moot
    assert probe.holdout_top1 == 1.0 and probe.l2 in lp.DEFAULT_L2_GRID
    assert probe.accuracy(test_x * 0.01 + 3.0, test_y) >= 0.99
    np.testing.assert_allclose(probe.mean, (x * 0.01 + 3.0).mean(0), rtol=1e-5)


def test_linear_probe_chooses_the_penalty_by_accuracy_on_the_held_out_part_only():
    rng = np.random.default_rng(0)
    x, y = _clusters(rng, 100, spread=3.0)
    probe = lp.train_linear_probe(x, y, 4, l2_grid=(0.0, 0.01, 1.0), holdout_fraction=0.25,
                                  steps=40)
    # Re-derive: fit on the seeded 75 examples, standardised with their own statistics, and
    # score the other 25.
    fit, held = lp.holdout_split(100, 0.25)
    assert len(held) == 25 and not set(fit) & set(held)
    mean, std = x[fit].mean(0), x[fit].std(0)
    for l2 in (0.0, 0.01, 1.0):
        w, b = lp.fit_logistic_regression((x[fit] - mean) / std, y[fit], 4, l2, steps=40)
        accuracy = np.mean(np.argmax((x[held] - mean) / std @ w + b, 1) == y[held])
        assert probe.holdout_accuracies[l2] == pytest.approx(accuracy)
    best = max(probe.holdout_accuracies.values())
    assert probe.holdout_top1 == best
    assert probe.l2 == max(l2 for l2, a in probe.holdout_accuracies.items() if a == best)


def test_the_held_out_part_picks_a_small_penalty_or_a_large_one_as_the_data_need():
    # Classes differ along x0 - x1 under noise shared by x0 and x1: a strong penalty pulls
    # the weights toward the class-mean difference (x0 alone), which is at chance.
    def correlated(rng, n):
        y = rng.integers(0, 2, n)
        shared = 3 * rng.normal(size=n)
        x0 = 0.5 * (2 * y - 1) + shared + 0.1 * rng.normal(size=n)
        return np.stack([x0, shared + 0.1 * rng.normal(size=n)], 1).astype(np.float32), y

    rng = np.random.default_rng(0)
    (x, y), (test_x, test_y) = correlated(rng, 300), correlated(rng, 1000)
    probe = lp.train_linear_probe(x, y, 2, l2_grid=(0.0, 100.0), steps=100)
    assert probe.l2 == 0.0 and probe.holdout_top1 == 1.0
    assert probe.holdout_accuracies[100.0] < 0.65
    assert probe.accuracy(test_x, test_y) >= 0.99

    # 300 noise features and 300 fitting examples (the interpolation threshold): the penalty
    # helps, on the held-out part and on fresh data.
    def noisy(rng, n):
        y = rng.integers(0, 2, n)
        x = rng.normal(size=(n, 300)).astype(np.float32)
        x[:, :10] += 0.5 * (2 * y - 1)[:, None]
        return x, y

    rng = np.random.default_rng(3)
    (x, y), (test_x, test_y) = noisy(rng, 375), noisy(rng, 2000)
    probe = lp.train_linear_probe(x, y, 2, l2_grid=(0.0, 1.0), steps=100)
    unpenalised = lp.train_linear_probe(x, y, 2, l2_grid=(0.0,), steps=100)
    assert probe.l2 == 1.0 and probe.holdout_top1 > unpenalised.holdout_top1
    assert probe.accuracy(test_x, test_y) > unpenalised.accuracy(test_x, test_y) + 0.03


# --- End to end on a tiny CLIP -----------------------------------------------------------

_EVALS = {
    "knn": {"type": "knn", "splits": ("val", "heldout_combos"), "bank_examples": 200,
            "num_examples": 100, "k": 20},
    "probe": {"type": "linear_probe", "train_examples": 200, "num_examples": 100, "steps": 30,
              "l2_grid": (0.0, 1e-2), "where": {"num_objects": 1}},
}


@pytest.fixture(scope="module")
def tiny_clip():
    config = tiny_clip_config(eval_batch_size=32)
    exp = Experiment(config)
    state = exp.state_factory.create()
    return config, exp, state


def _build(tiny_clip, evals=_EVALS, initial_weights=None):
    config, exp, _ = tiny_clip
    return evaluators.build_evaluators(ml_collections.ConfigDict(evals), exp.objective, exp.mesh,
                                       config.data, exp.tokenizer, config.eval_batch_size,
                                       initial_weights=initial_weights)


def test_knn_and_linear_probe_on_a_tiny_clip_with_a_cached_random_init_baseline(tiny_clip):
    _, exp, state = tiny_clip
    calls = []

    def initial_weights():
        calls.append(1)
        return state.params, state.model_state

    built = _build(tiny_clip, initial_weights=initial_weights)
    knn, probe = (b.evaluator for b in built)
    assert knn.num_classes == probe.num_classes == 8  # shapes
    assert (probe.data["train"][0].shape, probe.data["val"][0].shape) == (
        (200, 16, 16, 3), (100, 16, 16, 3))
    # A different network than the initial one: the params scaled.
    trained = jax.tree.map(lambda p: p * 1.5, state.params)
    with jax.set_mesh(exp.mesh):
        first = evaluators.run_all(built, trained, state.model_state, print)
        assert len(calls) == 2  # once per evaluator
        second = evaluators.run_all(built, trained, state.model_state, print)
        at_init = evaluators.run_all(built, state.params, state.model_state, print)
    assert len(calls) == 2  # cached: never again
    keys = {f"knn/{s}/{m}" for s in ("val", "heldout_combos")
            for m in ("top1", "top5", "random_init_top1")}
    keys |= {"probe/val/top1", "probe/val/random_init_top1", "probe/l2", "probe/holdout_top1"}
    assert set(first) == keys
    assert first == second  # deterministic
    assert all(0.0 <= v <= 1.0 for v in first.values()) and first["probe/l2"] in (0.0, 1e-2)
    for split in ("val", "heldout_combos"):
        assert first[f"knn/{split}/top5"] >= first[f"knn/{split}/top1"]
    # The baseline is this evaluation of the initial weights, and stays as first computed.
    for name in ("knn/val", "knn/heldout_combos", "probe/val"):
        assert at_init[f"{name}/top1"] == first[f"{name}/random_init_top1"]
        assert at_init[f"{name}/random_init_top1"] == first[f"{name}/random_init_top1"]

    # Shuffling the evaluated split's labels changes its accuracy, not the chosen penalty.
    images, labels = probe.data["val"]
    probe.data["val"] = (images, np.random.default_rng(0).permutation(labels))
    with jax.set_mesh(exp.mesh):
        shuffled = probe.run(trained, state.model_state)
    assert (shuffled["l2"], shuffled["holdout_top1"]) == (first["probe/l2"],
                                                          first["probe/holdout_top1"])

    # Without initial weights: no baseline.
    plain = _build(tiny_clip, {"knn": {**_EVALS["knn"], "splits": "val", "k": 3}})
    with jax.set_mesh(exp.mesh):
        result = evaluators.run_all(plain, trained, state.model_state, print)
    assert set(result) == {"knn/val/top1"}  # k < 5: no top-5
    assert 0.0 <= result["knn/val/top1"] <= 1.0


@pytest.mark.parametrize("kind, options, message", [
    ("knn", {"k": 0}, r"evals\.bad\.k must be a number >= 1, got 0"),
    ("knn", {"temperature": 0.0}, r"evals\.bad\.temperature must be a number > 0"),
    ("knn", {"splits": []}, r"evals\.bad\.splits must name at least one split"),
    ("knn", {"splits": ["val", "train"]}, r"evals\.bad\.splits includes bank_split 'train'"),
    ("knn", {"bank_examples": 0}, r"evals\.bad\.bank_examples must be a number >= 1"),
    ("knn", {"where": "num_objects=1"}, r"evals\.bad\.where must map record fields"),
    ("knn", {"nk": 5}, r"unknown option 'evals\.bad\.nk'.*did you mean 'k'"),
    ("linear_probe", {"holdout_fraction": 1.0}, r"evals\.bad\.holdout_fraction must be between"),
    ("linear_probe", {"holdout_fraction": 0}, r"evals\.bad\.holdout_fraction must be between"),
    ("linear_probe", {"l2_grid": []}, r"evals\.bad\.l2_grid must list at least one penalty"),
    ("linear_probe", {"l2_grid": [0.1, -1.0]}, r"evals\.bad\.l2_grid must list"),
    ("linear_probe", {"steps": 0}, r"evals\.bad\.steps must be a number >= 1"),
    ("linear_probe", {"train_split": "val"}, r"evals\.bad\.splits includes train_split 'val'"),
    ("linear_probe", {"source": "manifest", "path": "/data/labels.csv"},
     r"evals\.bad: train_split 'train' and split 'val' both read '/data/labels\.csv'"),
    ("linear_probe", {"label_key": "flavour"},
     r"evals\.bad \(linear_probe\): records of .* have no field\(s\) \['flavour'\]"),
])
def test_option_errors_name_the_option(kind, options, message):
    data = bc.base_config().data
    data.update({"source": "synthetic", "image_size": 16})
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1}, jax.devices()[:1])
    evals = ml_collections.ConfigDict({"bad": {"type": kind, "num_examples": 4, **options}})
    with pytest.raises(bc.ConfigError, match=message):
        evaluators.build_evaluators(evals, _NoModel(), mesh, data, None, 8)


class _NoModel:
    """An objective never called: configuration errors come before any embedding."""

    def embed_images(self, params, model_state, images):
        raise AssertionError("not called")

    embed_texts = embed_images

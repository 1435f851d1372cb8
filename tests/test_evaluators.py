"""Evaluation metrics against brute-force re-derivations, and evaluator configuration errors."""

import numpy as np
import pytest

from big_contrast.evaluators.retrieval import recall_at_k


def _brute_force_recall(similarity, k, trials=4000, seed=0):
    """Monte-Carlo R@k: rank items by score with random tie-breaking, many times."""
    rng = np.random.default_rng(seed)
    n = len(similarity)
    hits = 0.0
    for _ in range(trials // n + 1):
        noise = rng.random(similarity.shape)
        for i in range(n):
            order = np.lexsort((noise[i], -similarity[i]))  # by score, then random
            hits += i in order[:k]
    return hits / ((trials // n + 1) * n)


def test_recall_without_ties_matches_sorting():
    rng = np.random.default_rng(0)
    similarity = rng.normal(size=(50, 50)) + 3 * np.eye(50) * rng.random(50)
    got = recall_at_k(similarity, ks=(1, 5, 10))
    for k in (1, 5, 10):
        ranks = [list(np.argsort(-row)).index(i) for i, row in enumerate(similarity)]
        assert got[k] == pytest.approx(np.mean(np.array(ranks) < k))


def test_ties_count_at_their_expected_random_rank():
    rng = np.random.default_rng(1)
    similarity = rng.integers(0, 3, size=(12, 12)).astype(float)  # many ties
    for k in (1, 3):
        assert recall_at_k(similarity, ks=(k,))[k] == pytest.approx(
            _brute_force_recall(similarity, k, trials=20000), abs=0.02)


def test_a_collapsed_model_scores_chance_not_perfect():
    similarity = np.ones((100, 100))
    assert recall_at_k(similarity, ks=(1, 10)) == {1: pytest.approx(0.01), 10: pytest.approx(0.1)}

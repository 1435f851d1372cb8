"""CIDEr-D: equal to pycocoevalcap's scorer (the coco-caption code) on random corpora, and
sensible on hand-made ones."""

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider  # the maintained reference (a test extra)

from big_contrast.evaluators.cider import cider_d, tokenize

WORDS = "a the red blue green star circle ring small big on left right of and there is".split()


def _sentence(rng, max_words: int = 9) -> str:
    words = list(rng.choice(WORDS, size=int(rng.integers(1, max_words + 1))))
    if rng.random() < 0.2:  # repeated words
        words += [words[-1]] * int(rng.integers(1, 4))
    return " ".join(words)


def _corpus(rng):
    """Candidates (some empty, some copied from their references) and 1..5 references each."""
    n, max_refs = int(rng.integers(2, 15)), int(rng.choice([1, 1, 5]))
    references = [[_sentence(rng) for _ in range(int(rng.integers(1, max_refs + 1)))]
                  for _ in range(n)]
    candidates = []
    for refs in references:
        u = rng.random()
        candidates.append("" if u < 0.1 else refs[0] if u < 0.3 else _sentence(rng))
    return candidates, references


@pytest.mark.parametrize("seed", range(30))
def test_equals_pycocoevalcap(seed):
    # pycocoevalcap's Cider class is CIDEr-D (sigma 6, clipped weights, factor 10).
    candidates, references = _corpus(np.random.default_rng(seed))
    score, per_item = cider_d(candidates, references)
    ref_score, ref_items = Cider().compute_score(
        dict(enumerate(references)), {i: [c] for i, c in enumerate(candidates)})
    assert per_item.shape == (len(candidates),)
    np.testing.assert_allclose(per_item, ref_items, rtol=0, atol=1e-6)
    assert abs(score - ref_score) <= 1e-6


def test_perfect_candidates_beat_shuffled_ones():
    captions = ["a red star on the left", "two shapes: a blue circle and a ring",
                "there is a small green square", "a big yellow heart at the bottom",
                "a purple cross in the middle", "an orange diamond on a striped background"]
    references = [[c] for c in captions]
    perfect, per_item = cider_d(captions, references)
    assert (per_item > 0).all()
    # Only the length penalty is 1 and every n-gram weight is clipped at itself: 10 x mean over n
    # of the cosine of a vector with itself, except n-grams a sentence is too short to have.
    assert per_item[0] == pytest.approx(10.0)
    shuffled, _ = cider_d(captions[1:] + captions[:1], references)
    assert perfect > shuffled >= 0


def test_tokenisation_and_errors():
    assert tokenize("Two shapes: a Five-pointed star, isn't it?") == [
        "two", "shapes", "a", "five-pointed", "star", "isn't", "it"]
    assert tokenize("a red  star") == ["a", "red", "star"]
    a, _ = cider_d(["A red star!", "a blue ring"], [["a red star"], ["a ring"]])
    b, _ = cider_d(["a red star", "a blue ring"], [["a red star"], ["a ring"]])
    assert a == b
    with pytest.raises(ValueError, match="reference lists"):
        cider_d(["a"], [])
    with pytest.raises(ValueError, match="at least one reference"):
        cider_d(["a", "b"], [["a"], []])

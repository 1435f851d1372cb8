"""CIDEr-D (Vedantam et al., 2015), the captioning metric of the COCO caption evaluation.

Computed as pycocoevalcap's ``Cider`` class computes it (which, despite its name, is CIDEr-D:
clipped n-gram weights and a Gaussian length penalty), in pure Python with no java:

  * n-grams of 1..4 words, weighted by tf-idf; document frequencies count, for each image, whether
    any of its references holds the n-gram, over the images of the corpus being scored, and
    idf = log(number of images) - log(max(1, df));
  * per n, the similarity of a candidate to one reference is the dot product of their weight
    vectors with the candidate's weights clipped at the reference's, over the product of their
    norms, times exp(-(length difference)^2 / (2 * 6^2));
  * an image scores 10 x the mean over n of the mean over its references; the corpus, the mean
    over images.

Tokenisation replaces the PTB tokenizer (java) that coco-caption runs first: text is
lower-cased and split into words, runs of letters and digits that inner hyphens or apostrophes
may join ("five-pointed", "isn't"); all other punctuation is dropped. Text that is already
tokenised (lower-case words separated by spaces) is left as it is.
"""

from __future__ import annotations

import collections
import math
import re

import numpy as np

MAX_N = 4
SIGMA = 6.0
_WORD = re.compile(r"[^\W_]+(?:[-'][^\W_]+)*")


def tokenize(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _ngrams(words: list[str]) -> collections.Counter:
    return collections.Counter(tuple(words[i:i + n]) for n in range(1, MAX_N + 1)
                               for i in range(len(words) - n + 1))


def _weights(counts: collections.Counter, idf) -> list[tuple[dict, float]]:
    """Per n (index n - 1): the tf-idf weight of each n-gram, and the norm of those weights."""
    by_n = [{} for _ in range(MAX_N)]
    for gram, tf in counts.items():
        by_n[len(gram) - 1][gram] = tf * idf(gram)
    return [(w, math.sqrt(sum(v * v for v in w.values()))) for w in by_n]


def _similarity(cand, cand_len: int, ref, ref_len: int) -> float:
    """Mean over n of the clipped cosine similarity, times the length penalty. Lengths are in
    words (pycocoevalcap counts bigrams: the difference is the same unless a side is empty, and
    then the similarity is 0 anyway)."""
    penalty = math.exp(-((cand_len - ref_len) ** 2) / (2 * SIGMA ** 2))
    total = 0.0
    for (c, c_norm), (r, r_norm) in zip(cand, ref):
        if c_norm and r_norm:
            total += sum(min(v, r.get(g, 0.0)) * r.get(g, 0.0) for g, v in c.items()) / (
                c_norm * r_norm)
    return penalty * total / MAX_N


def cider_d(candidates: list[str], references: list[list[str]]) -> tuple[float, np.ndarray]:
    """(corpus CIDEr-D, per-image CIDEr-D as float64 [num_images]) of one candidate caption per
    image against that image's references (one or more)."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("CIDEr-D needs at least one image")
    if any(not refs for refs in references):
        raise ValueError("every image needs at least one reference caption")
    cand_words = [tokenize(c) for c in candidates]
    ref_words = [[tokenize(r) for r in refs] for refs in references]
    ref_counts = [[_ngrams(words) for words in refs] for refs in ref_words]

    df = collections.Counter(gram for refs in ref_counts for gram in set().union(*refs))
    log_images = math.log(len(candidates))

    def idf(gram):
        return log_images - math.log(max(1.0, df[gram]))

    scores = np.zeros(len(candidates))
    for i, (words, refs) in enumerate(zip(cand_words, ref_words)):
        cand = _weights(_ngrams(words), idf)
        sims = [_similarity(cand, len(words), _weights(counts, idf), len(ref))
                for ref, counts in zip(refs, ref_counts[i])]
        scores[i] = 10.0 * sum(sims) / len(sims)
    return float(scores.mean()), scores

"""Reads the shape and colour a synthetic-world caption names, to score generated captions
against the record's labels (a caption can be fluent and still name the wrong shape)."""

from __future__ import annotations

import re

import numpy as np

from big_contrast.data.synthetic import COLOUR_WORDS, SHAPE_WORDS, COLOURS, SHAPES

ATTRIBUTES = ("shape", "colour")
_TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")  # words and punctuation, as the tokenizers split


def _phrases() -> dict[tuple[str, ...], tuple[str, int]]:
    """Every synonym as a token tuple -> (attribute, class index)."""
    table = {}
    for attribute, names, words in (("shape", SHAPES, SHAPE_WORDS),
                                    ("colour", COLOURS, COLOUR_WORDS)):
        for index, name in enumerate(names):
            for synonym in words[name]:
                table[tuple(_TOKEN.findall(synonym))] = (attribute, index)
    return table


_PHRASES = _phrases()
_LONGEST = max(map(len, _PHRASES))


def parse_attributes(caption: str) -> dict[str, int | None]:
    """{'shape': index into SHAPES, 'colour': index into COLOURS}, None where the caption names
    none. Synonyms match as whole phrases, the longest first ("hollow circle" is a ring, not a
    circle). A caption naming two objects gives the first one mentioned, which is the record's
    first object (its 'shape' and 'colour' labels) in the world's two-object captions."""
    tokens = _TOKEN.findall(caption.lower())
    found = dict.fromkeys(ATTRIBUTES)
    i = 0
    while i < len(tokens):
        for n in range(min(_LONGEST, len(tokens) - i), 0, -1):
            match = _PHRASES.get(tuple(tokens[i:i + n]))
            if match:
                attribute, index = match
                if found[attribute] is None:
                    found[attribute] = index
                i += n
                break
        else:
            i += 1
    return found


def attribute_report(captions, labels: dict) -> dict[str, dict[str, float]]:
    """Per attribute in ``labels`` ('shape', 'colour'; other keys are ignored): the fraction of
    captions that name it ('named'), the accuracy of those that do ('right_when_named', NaN if
    none does) and the fraction that name it correctly ('named_and_right')."""
    parsed = [parse_attributes(c) for c in captions]
    report = {}
    for attribute in ATTRIBUTES:
        if attribute not in labels:
            continue
        truth = np.asarray(labels[attribute]).reshape(-1)
        if len(truth) != len(parsed):
            raise ValueError(f"{len(parsed)} captions but {len(truth)} '{attribute}' labels")
        named = np.array([p[attribute] is not None for p in parsed], bool)
        right = np.array([p[attribute] == t for p, t in zip(parsed, truth.tolist())], bool)
        report[attribute] = {
            "named": float(named.mean()) if len(parsed) else float("nan"),
            "right_when_named": float(right[named].mean()) if named.any() else float("nan"),
            "named_and_right": float(right.mean()) if len(parsed) else float("nan"),
        }
    return report

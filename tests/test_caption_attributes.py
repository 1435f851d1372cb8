"""Caption attribute parsing: every synonym, the world's own captions, and the report."""

import math

import numpy as np
import pytest

from big_contrast.data import synthetic
from big_contrast.data.caption_attributes import attribute_report, parse_attributes


@pytest.mark.parametrize("attribute, names, table", [
    ("shape", synthetic.SHAPES, synthetic.SHAPE_WORDS),
    ("colour", synthetic.COLOURS, synthetic.COLOUR_WORDS)])
def test_every_synonym_parses_to_its_class(attribute, names, table):
    for index, name in enumerate(names):
        for synonym in table[name]:
            assert parse_attributes(synonym)[attribute] == index, synonym
            assert parse_attributes(f"There is a {synonym} on the left.")[attribute] == index


def test_phrases_match_whole_and_first_mention_wins():
    ring, circle = synthetic.SHAPES.index("ring"), synthetic.SHAPES.index("circle")
    assert parse_attributes("a hollow circle")["shape"] == ring
    assert parse_attributes("a hollow round dot")["shape"] == circle  # "hollow" alone is no shape
    assert parse_attributes("a three-sided shape")["shape"] == synthetic.SHAPES.index("triangle")
    assert parse_attributes("an orange shape") == {
        "shape": None, "colour": synthetic.COLOURS.index("orange")}
    assert parse_attributes("a red circle above a blue hollow circle") == {
        "shape": circle, "colour": synthetic.COLOURS.index("red")}
    assert parse_attributes("black and white photo: a thing") == {"shape": None, "colour": None}


@pytest.mark.parametrize("split", ["train", "heldout_combos"])
def test_the_worlds_captions_parse_to_their_labels(split):
    world = synthetic.SyntheticWorld(split, image_size=16, seed=1)
    named = {"shape": 0, "colour": 0}
    for i in range(400):
        record = world[i]
        parsed = parse_attributes(record["caption"])
        # Two-object captions mention the record's first object first.
        for attribute in named:
            if parsed[attribute] is not None:
                assert parsed[attribute] == record[attribute], record["caption"]
                named[attribute] += 1
            elif attribute == "shape" and record["num_objects"] == 2:
                pytest.fail(f"two-object captions always name shapes: {record['caption']}")
    assert named["shape"] > 0.8 * 400 and named["colour"] > 0.3 * 400


def test_attribute_report_on_a_small_example():
    red, blue = synthetic.COLOURS.index("red"), synthetic.COLOURS.index("blue")
    star, ring = synthetic.SHAPES.index("star"), synthetic.SHAPES.index("ring")
    captions = ["a red star", "a blue donut", "a scarlet shape", "a ring on the left"]
    labels = {"shape": np.array([star, star, ring, ring]), "colour": [red, blue, blue, red],
              "size": [0, 0, 0, 0]}
    report = attribute_report(captions, labels)
    assert set(report) == {"shape", "colour"}
    assert report["shape"] == pytest.approx(
        {"named": 3 / 4, "right_when_named": 2 / 3, "named_and_right": 2 / 4})
    assert report["colour"] == pytest.approx(
        {"named": 3 / 4, "right_when_named": 2 / 3, "named_and_right": 2 / 4})
    nothing = attribute_report(["a thing"], {"shape": [star]})["shape"]
    assert nothing["named"] == 0 and math.isnan(nothing["right_when_named"])
    with pytest.raises(ValueError, match="2 captions but 1"):
        attribute_report(["a star", "a ring"], {"shape": [star]})

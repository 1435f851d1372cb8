"""The embedded world: deterministic per (seed, split, index), held-out pairings never in
train, captions that vary and agree with the labels, zero-shot prompts worded as captions."""

import re

import numpy as np
import pytest

from big_contrast.data import sources, synthetic
from big_contrast.data.synthetic import SyntheticWorld


def test_world_has_enough_attributes():
    assert len(synthetic.SHAPES) >= 8 and len(synthetic.COLOURS) >= 8
    assert len(synthetic.SIZES) >= 3 and len(synthetic.POSITIONS) == 9
    assert len(synthetic.BACKGROUNDS) >= 4


def test_records_are_deterministic_and_differ_between_indices_seeds_splits():
    a, b = SyntheticWorld("train", seed=3), SyntheticWorld("train", seed=3)
    for i in (0, 17, 123_456):
        ra, rb = a[i], b[i]
        np.testing.assert_array_equal(ra["image"], rb["image"])
        assert ra["caption"] == rb["caption"]
    assert not np.array_equal(a[0]["image"], a[1]["image"])
    assert not np.array_equal(a[5]["image"], SyntheticWorld("train", seed=4)[5]["image"])
    assert not np.array_equal(a[5]["image"], SyntheticWorld("val", seed=3)[5]["image"])


def test_any_length_and_bounds():
    world = SyntheticWorld("val", num_records=10**12)
    assert len(world) == 10**12
    assert world[10**12 - 1]["image"].shape == (32, 32, 3)
    with pytest.raises(IndexError):
        world[10**12]


@pytest.mark.parametrize("size", [16, 32, 64])
def test_image_size_is_configurable(size):
    image = SyntheticWorld("train", image_size=size)[0]["image"]
    assert image.shape == (size, size, 3) and image.dtype == np.uint8


def test_heldout_combinations_never_appear_in_train_or_val():
    heldout = set(synthetic.HELDOUT_COMBOS)
    assert len(heldout) == len(synthetic.SHAPES)
    assert len({s for s, _ in heldout}) == len({c for _, c in heldout}) == 8  # one per shape/colour
    for split in ("train", "val"):
        world = SyntheticWorld(split)
        for i in range(1500):
            r = world[i]
            assert (int(r["shape"]), int(r["colour"])) not in heldout
            if r["num_objects"] == 2:
                assert (int(r["shape_2"]), int(r["colour_2"])) not in heldout


def test_heldout_split_shows_only_heldout_combinations_in_colour():
    heldout = set(synthetic.HELDOUT_COMBOS)
    world = SyntheticWorld("heldout_combos")
    records = [world[i] for i in range(300)]
    assert all((int(r["shape"]), int(r["colour"])) in heldout for r in records)
    assert all(r["num_objects"] == 1 and r["grey"] == 0 for r in records)
    assert {int(r["shape"]) for r in records} == set(range(8))


def _words(options):
    return {w for phrase in options for w in phrase.split()}


def test_captions_agree_with_labels():
    world = SyntheticWorld("train")
    for i in range(400):
        r = world[i]
        words = set(re.findall(r"[a-z-]+", r["caption"]))
        shape_words = _words(synthetic.SHAPE_WORDS[synthetic.SHAPES[r["shape"]]])
        other_shapes = set().union(*(_words(synthetic.SHAPE_WORDS[s]) for s in synthetic.SHAPES
                                     if s not in (synthetic.SHAPES[r["shape"]],
                                                  synthetic.SHAPES[r["shape_2"]])))
        colour_words = {w for c in synthetic.COLOURS for w in synthetic.COLOUR_WORDS[c]}
        mentioned_colours = words & colour_words
        true_colours = _words(synthetic.COLOUR_WORDS[synthetic.COLOURS[r["colour"]]])
        if r["colour_2"] >= 0:
            true_colours |= _words(synthetic.COLOUR_WORDS[synthetic.COLOURS[r["colour_2"]]])
        assert mentioned_colours <= true_colours, (r["caption"], r["colour"])
        assert not (words & other_shapes - shape_words - {"circle", "shape"}), r["caption"]
        if r["grey"]:
            assert not mentioned_colours and np.ptp(r["image"].astype(int), axis=-1).max() == 0


def test_captions_vary():
    world = SyntheticWorld("train")
    captions = [world[i]["caption"] for i in range(1000)]
    assert len(set(captions)) > 900
    openings = {" ".join(c.split()[:2]) for c in captions}
    assert len(openings) > 20  # several templates and word orders
    lengths = [len(c.split()) for c in captions]
    assert min(lengths) <= 3 and max(lengths) >= 12


def test_two_object_images_and_backgrounds_occur():
    world = SyntheticWorld("train")
    records = [world[i] for i in range(600)]
    two = np.mean([r["num_objects"] == 2 for r in records])
    assert 0.2 < two < 0.4
    assert {int(r["background"]) for r in records} == set(range(len(synthetic.BACKGROUNDS)))
    # Textured backgrounds really are textured: the plain ones are the flattest.
    std = {b: [] for b in range(len(synthetic.BACKGROUNDS))}
    for r in records:
        std[int(r["background"])].append(r["image"][:4, :4].std())
    plain = synthetic.BACKGROUNDS.index("plain")
    assert np.median(std[plain]) < min(np.median(v) for b, v in std.items() if b != plain)


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="heldout_combos"):
        SyntheticWorld("test")


def _alternatives(word_table: dict) -> str:
    phrases = {w for words in word_table.values() for w in words}
    return "(?:" + "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True)) + ")"


def _single_object_caption_regex() -> re.Pattern:
    """The captions _single_caption can write for one coloured object, without the optional
    background suffix: its five templates over the world's word tables."""
    size, colour = _alternatives(synthetic._SIZE_WORDS), _alternatives(synthetic.COLOUR_WORDS)
    shape, pos = _alternatives(synthetic.SHAPE_WORDS), _alternatives(synthetic._POSITION_WORDS)
    # A noun phrase names the shape, or else says shape/object/thing after a colour.
    noun_phrase = f"an? (?:{size} )?(?:(?:{colour} )?{shape}|{colour} (?:shape|object|thing))"
    templates = [f"{noun_phrase}(?: {pos})?", f"there is {noun_phrase}(?: {pos})?",
                 f"(?:{pos}, )?{noun_phrase}", f"a picture of {noun_phrase}(?: {pos})?",
                 f"an? (?:{size} )?{shape} coloured {colour}(?: {pos})?"]
    return re.compile("|".join(f"(?:{t})" for t in templates))


def _articles_agree(text: str) -> bool:
    words = text.replace(",", "").split()
    return all((words[i + 1][0] in "aeiou") == (w == "an")
               for i, w in enumerate(words[:-1]) if w in ("a", "an"))


def test_the_caption_regex_reads_every_single_object_caption():
    pattern = _single_object_caption_regex()
    world = SyntheticWorld("train")
    checked = 0
    for i in range(600):
        r = world[i]
        if r["num_objects"] == 1 and not r["grey"]:
            caption = re.sub(r" on an? [a-z]+ background$", "", r["caption"])
            assert pattern.fullmatch(caption) and _articles_agree(caption), r["caption"]
            checked += 1
    assert checked > 250
    for never_said in ("a shape in the top left", "a small thing", "a orange shape"):
        assert not (pattern.fullmatch(never_said) and _articles_agree(never_said)), never_said


_LABELS = {"shape": (synthetic.SHAPES, synthetic.SHAPE_WORDS),
           "colour": (synthetic.COLOURS, synthetic.COLOUR_WORDS),
           "size": (synthetic.SIZES, synthetic._SIZE_WORDS),
           "position": (synthetic.POSITIONS, synthetic._POSITION_WORDS)}


@pytest.mark.parametrize("label", list(_LABELS))
def test_zero_shot_prompts_are_captions_the_world_can_write(label):
    world = SyntheticWorld("val")
    names = sources.class_names(world, label)
    templates = sources.prompt_templates(world, label)
    values, words = _LABELS[label]
    assert len(names) == len(values) and len(templates) >= 3
    pattern = _single_object_caption_regex()

    def says(prompt, value):
        return any(re.search(rf"\b{re.escape(w)}\b", prompt) for w in words[value])

    for value, name in zip(values, names):
        for template in templates:
            prompt = template.format(name)
            assert pattern.fullmatch(prompt) and _articles_agree(prompt), prompt
            # It names this class, in a word captions use for it, and no other class.
            assert says(prompt, value), prompt
            assert not any(says(prompt, other) for other in values if other != value), prompt


def test_shape_prompts_are_unchanged():
    # The demo's published zero-shot figures were measured with exactly these prompts.
    world = SyntheticWorld("val")
    assert sources.class_names(world, "shape") == synthetic.SHAPES
    assert sources.prompt_templates(world, "shape") == (
        "a {}", "there is a {}", "a picture of a {}")


def test_a_world_of_chosen_backgrounds_and_positions_draws_only_those():
    world = SyntheticWorld("val", backgrounds=("plain", "noisy"), positions=("centre",),
                           two_object_prob=0.0)
    records = [world[i] for i in range(60)]
    assert {int(r["background"]) for r in records} == {0, 1}
    assert {int(r["position"]) for r in records} == {synthetic.POSITIONS.index("centre")}
    with pytest.raises(ValueError, match="backgrounds must be a non-empty list"):
        SyntheticWorld("val", backgrounds=("plaid",))
    with pytest.raises(ValueError, match="positions must be a non-empty list"):
        SyntheticWorld("val", positions=())

"""Mixed training data: class labels rendered as captions through templates, a weighted mixture
of sources whose proportions hold in every process's slice, exact resume and determinism of
mixture batches, and config errors that name the entry key at fault."""

import csv
import os

import jax
import numpy as np
import pytest

from big_contrast import sharding, validation
from big_contrast.config import ConfigError
from big_contrast.data import mixture, pipeline, sources, synthetic, tokenizers
from big_contrast.data.spec import BatchSpec, ImageView
from tests.helpers import tiny_clip_config, write_png_manifest
from tests.labelled_data import write_labelled_set

TEMPLATES = ("a photo of a {}.", "a {} square", "{}")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 4-class image folder (3 images a class) and a 24-pair manifest whose last 3 images
    are corrupt."""
    root = tmp_path_factory.mktemp("mixture")
    labelled = write_labelled_set(root / "labelled", per_class=3, size=16)
    return {"folder": labelled["folder"], "classes": labelled["classes"],
            "pairs": write_png_manifest(root / "pairs", 24, corrupt=3, size=16), "root": root}


def _long_manifest(path, rows: int, folder: str, label: bool) -> str:
    """A manifest of ``rows`` rows cycling over a folder's images (never decoded here): large
    enough for fast index shuffles, cheap to write."""
    images = sorted(os.path.relpath(os.path.join(parent, f), os.path.dirname(path))
                    for parent, _, names in os.walk(folder) for f in names if f.endswith(".png"))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label" if label else "caption"])
        for i in range(rows):
            image = images[i % len(images)]
            name = os.path.basename(os.path.dirname(image))
            writer.writerow([image, name if label else "a red square"])
    return str(path)


def _config(mix, **overrides):
    config = tiny_clip_config(**overrides)
    config.data.mixture = mix
    return config


def _labelled_entry(files, weight):
    return {"source": "image_folder", "path": files["folder"], "label_key": "label",
            "templates": list(TEMPLATES), "weight": weight}


# ----------------------------------------------------------------------------- labels as captions


def test_labels_become_captions_naming_the_class_through_the_templates(files):
    folder = sources.ImageFolderSource(files["folder"])
    names = sources.class_names(folder, "label")
    captioned = sources.LabelledAsCaptions(folder, names, TEMPLATES, seed=0)
    used = set()
    for i in range(len(captioned)):
        record = captioned[i]
        name = names[int(record["label"])]
        assert record["image_path"] == folder[i]["image_path"]
        assert name in record["caption"]
        used |= {t for t in TEMPLATES if t.format(name) == record["caption"]}
    assert used == set(TEMPLATES)  # 12 records draw all 3 templates
    again = sources.LabelledAsCaptions(folder, names, TEMPLATES, seed=0)
    reseeded = sources.LabelledAsCaptions(folder, names, TEMPLATES, seed=1)
    captions = [captioned[i]["caption"] for i in range(12)]
    assert captions == [again[i]["caption"] for i in range(12)]
    assert captions != [reseeded[i]["caption"] for i in range(12)]
    with pytest.raises(ValueError, match=r"exactly one '\{\}' each; got \['a photo'\]"):
        sources.LabelledAsCaptions(folder, names, ["a photo", "a {}"])
    with pytest.raises(ValueError, match="3 class names for label 'label', but the source has 4"):
        sources.LabelledAsCaptions(folder, names[:3], TEMPLATES)


def test_corrupt_rows_pass_through_and_parts_caption_manifests_and_the_synthetic_world(files):
    root = files["root"]
    labels = _long_manifest(root / "labels.csv", 8, files["folder"], label=True)
    with open(labels, "a", encoding="utf-8") as f:
        f.write("red/000.png\n")  # a row without its label
    names_file = root / "names.txt"
    names_file.write_text("yellow\nred\n\ngreen\nblue\n")
    config = _config({
        "labels": {"source": "manifest", "path": labels, "label_key": "label",
                   "class_names_file": str(names_file), "templates": ["{} thing"], "weight": 1.0},
        "world": {"source": "synthetic", "label_key": "shape", "synthetic": {"seed": 7},
                  "weight": 1.0}})
    parts = mixture.build_train_source(config.data, seed=0).parts
    manifest = parts["labels"]
    # Rows cycle over the images in class order, three a class.
    assert [manifest[i]["caption"] for i in (0, 3, 6)] == ["blue thing", "green thing",
                                                          "red thing"]
    assert int(manifest[0]["label"]) == 3  # indices follow the class-name file
    assert manifest[8] == {"corrupt": "bad_row: line 10 has no 'label'"}
    world, prompts = parts["world"], synthetic.PROMPT_TEMPLATES["shape"]
    assert world.source.seed == 7
    for i in range(20):
        record = world[i]
        assert record["caption"] in {t.format(synthetic.SHAPES[record["shape"]]) for t in prompts}


# ----------------------------------------------------------------------------- proportions


@pytest.mark.parametrize("weights", [(3.0, 1.0), (1.0, 1.0)])
def test_mixture_proportions_follow_the_weights_in_every_process_slice(files, weights):
    root = files["root"]
    pairs = _long_manifest(root / "many_pairs.csv", 2000, files["folder"], label=False)
    labels = _long_manifest(root / "many_labels.csv", 1000, files["folder"], label=True)
    config = _config({
        "pairs": {"source": "manifest", "path": pairs, "weight": weights[0]},
        "labels": {"source": "manifest", "path": labels, "label_key": "label",
                   "templates": list(TEMPLATES), "weight": weights[1]}})
    stream = mixture.records(mixture.build_train_source(config.data, seed=0), seed=0)
    labelled = np.array(["label" in stream[i] for i in range(2000)])
    p = weights[1] / sum(weights)
    # The whole stream, and each slice that one of two processes would read (grain's interleave
    # alone would give each process one part when the weights are equal).
    for taken in (labelled, labelled[0::2], labelled[1::2]):
        n = len(taken)
        assert abs(taken.sum() - n * p) < 4 * np.sqrt(n * p * (1 - p)), (taken.sum(), n, p)


# ----------------------------------------------------------------------------- resume, determinism


SPEC = BatchSpec(views=(ImageView(16),), text=True)


def _batches(config, seed=0):
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1}, jax.devices()[:1])
    return pipeline.TrainBatches(config.data, SPEC, tokenizers.get_tokenizer("words", 12, 256), 8,
                                 seed, mesh)


def _take(batches, n):
    try:
        return [{k: np.asarray(v) for k, v in next(batches).items()} for _ in range(n)]
    finally:
        batches.close()


def _equal(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def _mixed(files):
    return _config({"pairs": {"source": "manifest", "path": files["pairs"], "weight": 2.0},
                    "labels": _labelled_entry(files, 1.0)},
                   **{"data.max_corrupt_fraction": "0.5"})


def test_mixture_batches_resume_exactly_and_repeat_for_the_same_seed(files):
    config = _mixed(files)
    data = _batches(config)
    first = [{k: np.asarray(v) for k, v in next(data).items()} for _ in range(3)]
    state, read, skipped = data.get_state(), data.read, dict(data.skipped)
    rest = _take(data, 3)
    # Corrupt pairs are skipped and counted; the labelled images' captions are tokenized.
    assert skipped == {"undecodable_image": 2} and read == 24 + 2
    resumed = _batches(config)
    resumed.set_state(state)
    assert _equal(_take(resumed, 3), rest)
    assert _equal(_take(_batches(config), 6), first + rest)
    assert not _equal(_take(_batches(config, seed=1), 6), first + rest)


def test_mixture_batches_are_the_same_from_worker_processes(files):
    config = _mixed(files)
    in_process = _take(_batches(config), 2)
    config.data.num_workers = 1
    assert _equal(_take(_batches(config), 2), in_process)


# ----------------------------------------------------------------------------- config errors


def _error(config) -> str:
    with pytest.raises(ConfigError) as caught:
        validation.validate(config)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_misspelt_mixture_key_is_named_with_the_closest_key(files):
    entry = {"source": "manifest", "path": files["pairs"], "wieght": 1.0}
    message = _error(_config({"pairs": entry}))
    assert message.startswith("unknown key 'data.mixture.pairs.wieght'; did you mean 'weight'?")
    entry = {"source": "synthetic", "synthetic": {"num_record": 10}, "weight": 1.0}
    assert _error(_config({"world": entry})).startswith(
        "unknown key 'data.mixture.world.synthetic.num_record'; did you mean 'num_records'?")


@pytest.mark.parametrize("weight", [0.0, -1.0, "2", None])
def test_a_weight_that_is_not_a_positive_number_is_refused(files, weight):
    entry = {"source": "manifest", "path": files["pairs"], "weight": weight}
    if weight is None:
        del entry["weight"]
    assert _error(_config({"pairs": entry})).startswith(
        f"data.mixture.pairs.weight must be a number > 0 (the part's share of the records, "
        f"relative to the other parts'), got {weight!r}")


def test_other_mixture_settings_are_checked_before_anything_is_read(files):
    folder = _labelled_entry(files, 1.0)
    assert _error(_config({"a": {**folder, "templates": ["a photo"]}})).startswith(
        "data.mixture.a.templates must be a list of strings with exactly one '{}' each")
    unlabelled = {k: v for k, v in folder.items() if k not in ("label_key", "templates")}
    assert _error(_config({"a": unlabelled})).startswith(
        "data.mixture.a is an image folder, with labels but no captions")
    assert _error(_config({"a": {**unlabelled, "templates": ["{}"]}})) == (
        "data.mixture.a.templates needs data.mixture.a.label_key, the record field whose class "
        "names the captions give")
    assert _error(_config({"a": {**folder, "class_names": "red"}})) == (
        "data.mixture.a.class_names must be a list of names, got 'red'")
    assert _error(_config({"a": {**folder, "source": "manifset"}})).startswith(
        "data.mixture.a.source is 'manifset'; did you mean 'manifest'?")
    epochs = _config({"a": folder})
    epochs.total_steps, epochs.total_epochs = None, 1.0
    assert _error(epochs).startswith("total_epochs is set, but a data.mixture has no epochs")
    validation.validate(_config({"a": folder}))


def test_an_empty_mixture_means_data_source_and_a_missing_part_names_its_entry(files):
    config = _config({})
    assert isinstance(mixture.build_train_source(config.data), synthetic.SyntheticWorld)
    missing = _labelled_entry(files, 1.0) | {"path": str(files["root"] / "nowhere")}
    with pytest.raises(ConfigError, match=r"^data \(training split 'train'\): "
                                          r"data.mixture.a: image folder '.*nowhere' does not"):
        _batches(_config({"a": missing}))

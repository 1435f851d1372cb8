"""Evaluation metrics against brute-force re-derivations, retrieval with duplicate captions end to
end, zero-shot on a user's labelled images (manifest and image folder), and evaluator
configuration errors."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from big_contrast import config as bc, evaluators, sharding
from big_contrast.data import tokenizers
from big_contrast.evaluators.retrieval import caption_groups, recall_at_k
from tests.helpers import write_png_manifest
from tests.labelled_data import COLOURS, write_labelled_set


def _brute_force_recall(similarity, k, groups=None, trials=4000, seed=0):
    """Monte-Carlo R@k: rank items by score with random tie-breaking, many times; a query is a
    hit when any item of its group is among the first k."""
    rng = np.random.default_rng(seed)
    n = len(similarity)
    groups = np.arange(n) if groups is None else np.asarray(groups)
    hits, rounds = 0.0, trials // n + 1
    for _ in range(rounds):
        noise = rng.random(similarity.shape)
        for i in range(n):
            order = np.lexsort((noise[i], -similarity[i]))  # by score, then random
            hits += bool((groups[order[:k]] == groups[i]).any())
    return hits / (rounds * n)


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


def test_identical_captions_all_count_as_matches_with_ties_at_random():
    rng = np.random.default_rng(2)
    similarity = rng.integers(0, 4, size=(15, 15)).astype(float)  # ties within and across groups
    groups = rng.integers(0, 6, size=15)  # ~2.5 identical captions per group
    for k in (1, 2, 5):
        assert recall_at_k(similarity, ks=(k,), groups=groups)[k] == pytest.approx(
            _brute_force_recall(similarity, k, groups, trials=30000), abs=0.015)


def test_a_collapsed_model_scores_chance_not_perfect():
    similarity = np.ones((100, 100))
    assert recall_at_k(similarity, ks=(1, 10)) == {1: pytest.approx(0.01), 10: pytest.approx(0.1)}
    # Unique captions as groups change nothing; 4 captions x 25 copies: chance of any of the
    # 25 correct items in a random top k.
    assert recall_at_k(similarity, ks=(1, 10), groups=np.arange(100)) == {
        1: pytest.approx(0.01), 10: pytest.approx(0.1)}
    got = recall_at_k(similarity, ks=(1, 10), groups=np.arange(100) % 4)
    assert got[1] == pytest.approx(0.25)
    assert got[10] == pytest.approx(1 - math.comb(75, 10) / math.comb(100, 10))


def test_a_duplicate_scoring_an_ulp_above_the_own_caption_is_still_a_hit():
    # Query 0's own caption (item 0) scores an ulp below its duplicate (item 1): per-item
    # matching misses at R@1, group matching does not.
    eps = np.finfo(np.float32).eps
    similarity = np.array([[1.0, 1.0 + eps, 0.5], [1.0 + eps, 1.0, 0.5], [0.1, 0.2, 0.9]],
                          np.float32)
    assert recall_at_k(similarity, ks=(1,))[1] == pytest.approx(1 / 3)
    assert recall_at_k(similarity, ks=(1,), groups=[7, 7, 3])[1] == 1.0


def test_caption_groups_are_equal_exactly_for_identical_token_rows():
    tokens = np.array([[5, 6, 0], [5, 7, 0], [5, 6, 0], [1, 0, 0], [5, 7, 0]], np.int32)
    groups = caption_groups(tokens)
    assert groups.shape == (5,)
    same = groups[:, None] == groups[None, :]
    np.testing.assert_array_equal(same, (tokens[:, None] == tokens[None, :]).all(-1))


class _OracleObjective:
    """Embeds a PNG by its nearest colour and a caption by which of the known captions it is,
    plus a per-chunk offset of a few ulps (as real models' chunked float results differ)."""

    def embed_images(self, params, model_state, images):
        means = images.astype(jnp.float32).mean(axis=(1, 2))
        nearest = jnp.argmin(((means[:, None] - params["colours"][None]) ** 2).sum(-1), axis=1)
        return self._normalise(jax.nn.one_hot(nearest, len(params["colours"])), images)

    def embed_texts(self, params, model_state, tokens):
        which = (tokens[:, None] == params["captions"][None]).all(-1).astype(jnp.float32)
        return self._normalise(which, tokens)

    @staticmethod
    def _normalise(x, batch):
        x = x + 1e-6 * (jnp.sum(batch.astype(jnp.float32)) % 7)  # differs between chunks
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class _CollapsedObjective:
    def embed_images(self, params, model_state, images):
        return jnp.ones((images.shape[0], 4)) / 2

    def embed_texts(self, params, model_state, tokens):
        return jnp.ones((tokens.shape[0], 4)) / 2


def _data_config(**values):
    data = bc.base_config().data
    data.update(values)
    return data


def _evaluators(objective, evals: dict, data_config, tokenizer=None, batch_size=8):
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1}, jax.devices()[:1])
    tokenizer = tokenizer or tokenizers.get_tokenizer("words", 12, 256)
    return evaluators.build_evaluators(ml_collections.ConfigDict(evals), objective, mesh,
                                       data_config, tokenizer, batch_size), mesh


def test_retrieval_counts_duplicate_captions_in_different_chunks_as_matches(tmp_path):
    # 24 PNGs with 4 distinct captions ("a red square", ...), embedded in chunks of 8: each
    # caption's 6 copies fall into 3 chunks, whose scores differ by a few ulps.
    manifest = write_png_manifest(tmp_path, 24)
    tokenizer = tokenizers.get_tokenizer("words", 12, 256)
    data = _data_config(source="manifest", path=manifest, image_size=16)
    evals = {"ret": {"type": "retrieval", "split": "val", "num_examples": 24, "ks": (1, 5)}}
    params = {"colours": jnp.array(list(COLOURS.values()), jnp.float32),
              "captions": jnp.asarray(tokenizer.encode_batch([f"a {c} square" for c in COLOURS]))}
    built, mesh = _evaluators(_OracleObjective(), evals, data, tokenizer)
    retrieval = built[0].evaluator
    assert sorted(np.bincount(retrieval.groups)) == [6, 6, 6, 6]
    with jax.set_mesh(mesh):
        perfect = evaluators.run_all(built, params, {}, print)
        # Per-item matching would score this perfect model far below 1: the own caption is
        # one of 6 near-equal candidates, ordered by float noise.
        images = retrieval.embedder.images(params, {}, retrieval.data["image"])
        texts = retrieval.embedder.texts(params, {}, retrieval.data["text"])
    assert perfect == {"ret/i2t_R1": 1.0, "ret/i2t_R5": 1.0, "ret/t2i_R1": 1.0, "ret/t2i_R5": 1.0}
    assert recall_at_k(images @ texts.T, ks=(1,))[1] < 0.5

    collapsed, mesh = _evaluators(_CollapsedObjective(), evals, data, tokenizer)
    with jax.set_mesh(mesh):
        chance = evaluators.run_all(collapsed, {}, {}, print)
    # Any of a caption's 6 copies among 24 is a hit: 6/24 at R@1, 1 - C(18,5)/C(24,5) at R@5.
    r5 = 1 - math.comb(18, 5) / math.comb(24, 5)
    assert chance == pytest.approx({"ret/i2t_R1": 0.25, "ret/i2t_R5": r5,
                                    "ret/t2i_R1": 0.25, "ret/t2i_R5": r5})


def test_zero_shot_reads_label_names_from_a_manifest_and_an_image_folder(tmp_path):
    labelled = write_labelled_set(tmp_path / "pets", per_class=3)
    data = _data_config(source="synthetic", image_size=16)  # training data: not these images
    params = {"colours": jnp.array([COLOURS[c] for c in labelled["classes"]], jnp.float32)}
    evals = {"manifest": {"type": "zero_shot", "split": "val", "source": "manifest",
                          "path": labelled["manifest"]},
             "folder": {"type": "zero_shot", "split": "val", "source": "image_folder",
                        "path": labelled["folder"], "num_examples": 8}}
    built = {b.name: b.evaluator for b in _evaluators(_OracleObjective(), evals, data)[0]}
    manifest, folder = built["manifest"], built["folder"]
    assert manifest.class_names == folder.class_names == ("blue", "green", "red", "yellow")
    assert manifest.templates == folder.templates == evaluators.zero_shot.DEFAULT_TEMPLATES
    # The manifest's rows alternate red, green, blue, yellow: labels are sorted-name indices.
    np.testing.assert_array_equal(manifest.labels, [2, 1, 0, 3] * 3)
    # 8 of 12 folder images: a seeded random subset, not the first two classes' images.
    assert len(folder.labels) == 8 and len(set(folder.labels.tolist())) >= 3
    images = manifest.data["image"].astype(float).mean(axis=(1, 2))
    nearest = np.argmin(((images[:, None] - params["colours"][None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(nearest, manifest.labels)  # the images are what they say


def test_zero_shot_class_names_from_config_or_file_fix_the_label_order(tmp_path):
    labelled = write_labelled_set(tmp_path / "pets", per_class=2)
    names = ["yellow", "red", "green", "blue"]
    names_file = tmp_path / "classes.txt"
    names_file.write_text("\n".join(names) + "\n\n")
    data = _data_config(source="manifest", path=labelled["manifest"], image_size=16)
    evals = {"listed": {"type": "zero_shot", "split": "val", "class_names": names,
                        "templates": ["a {} square"]},
             "from_file": {"type": "zero_shot", "split": "val", "class_names_file": str(names_file),
                           "source": "image_folder", "path": labelled["folder"]}}
    built = {b.name: b.evaluator for b in _evaluators(_OracleObjective(), evals, data)[0]}
    listed, from_file = built["listed"], built["from_file"]
    assert listed.class_names == from_file.class_names == tuple(names)
    assert listed.templates == ("a {} square",)
    np.testing.assert_array_equal(listed.labels, [1, 2, 3, 0] * 2)
    assert sorted(from_file.labels.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_zero_shot_accepts_integer_labels_with_names_from_the_config(tmp_path):
    write_labelled_set(tmp_path / "pets", per_class=2)
    path = tmp_path / "pets" / "ints.jsonl"
    path.write_text("".join(f'{{"file": "red/00{i}.png", "y": {i % 2}}}\n' for i in range(2)))
    data = _data_config(source="manifest", path=str(path), image_key="file", image_size=16)
    evals = {"zs": {"type": "zero_shot", "split": "val", "label_key": "y",
                    "class_names": ["cat", "dog"]}}
    zs = _evaluators(_OracleObjective(), evals, data)[0][0].evaluator
    np.testing.assert_array_equal(zs.labels, [0, 1])
    with pytest.raises(bc.ConfigError, match=r"evals\.zs: .* names no classes for 'y'"):
        _evaluators(_OracleObjective(), {"zs": {"type": "zero_shot", "split": "val",
                                                "label_key": "y"}}, data)


@pytest.mark.parametrize("options, message", [
    ({"class_name": ["a"]},
     r"unknown option 'evals\.pets\.class_name'.*did you mean 'class_names'"),
    ({"souce": "manifest"}, r"unknown option 'evals\.pets\.souce'.*did you mean 'source'"),
    ({"source": "imagefolder"},
     r"evals\.pets\.source is 'imagefolder'; did you mean 'image_folder'"),
    ({"source": "image_folder"}, r"evals\.pets\.path is not set: a 'image_folder' source"),
    ({"class_names_file": "/nonexistent/names.txt"},
     r"evals\.pets\.class_names_file: no class-names file '/nonexistent/names\.txt'"),
    ({"templates": ["a photo of a"]}, r"evals\.pets\.templates: each needs exactly one"),
    ({"label_key": "labels"},
     r"evals\.pets \(zero_shot\): manifest .* has no column\(s\) \['labels'\]; "
     r"its columns are \['image', 'label'\]"),
    ({"class_names": ["red", "green", "blue"]},
     r"label 'yellow' on line 5 of manifest .* is not one of the 3 class names"),
    ({"source": "image_folder", "path": "{folder}",
      "class_names": ["red", "green", "blue", "pink"]},
     r"folders without a class name: \['yellow'\]; class names without a folder: \['pink'\]"),
])
def test_zero_shot_configuration_errors_name_the_key(tmp_path, options, message):
    labelled = write_labelled_set(tmp_path / "pets", per_class=1)
    options = {k: v.format(**labelled) if isinstance(v, str) else v for k, v in options.items()}
    data = _data_config(source="manifest", path=labelled["manifest"], image_size=16)
    evals = {"pets": {"type": "zero_shot", "split": "val", **options}}
    with pytest.raises(bc.ConfigError, match=message):
        _evaluators(_OracleObjective(), evals, data)


def test_retrieval_on_images_without_captions_says_so(tmp_path):
    labelled = write_labelled_set(tmp_path / "pets", per_class=1)
    data = _data_config(source="synthetic", image_size=16)
    evals = {"ret": {"type": "retrieval", "source": "image_folder", "path": labelled["folder"]}}
    with pytest.raises(bc.ConfigError, match=r"evals\.ret \(retrieval\): an image folder .* "
                                             r"has class labels but no captions"):
        _evaluators(_OracleObjective(), evals, data)


def test_zero_shot_on_own_labelled_images_after_training_on_captioned_ones(tmp_path):
    """Train a tiny CLIP on PNGs captioned "a red square" etc., then classify differently
    sized PNGs of the same colours from a labelled manifest and an image folder, with the
    generic prompts ("a photo of a {}." ...)."""
    from big_contrast import train as train_lib
    from tests.helpers import tiny_clip_config

    manifest = write_png_manifest(tmp_path / "train", 64)
    labelled = write_labelled_set(tmp_path / "pets", per_class=16)
    config = tiny_clip_config(total_steps=16, checkpoint_every=16, log_every=8,
                              **{"data.source": "manifest", "data.path": manifest,
                                 "optim.lr": "3e-3"})
    with config.unlocked():
        config.evals.zs_manifest = {"type": "zero_shot", "split": "val", "source": "manifest",
                                    "path": labelled["manifest"]}
        config.evals.zs_folder = {"type": "zero_shot", "split": "val", "source": "image_folder",
                                  "path": labelled["folder"]}
    summary = train_lib.train(config, str(tmp_path / "run"), jax.devices()[:1])
    chance = 1 / len(labelled["classes"])
    assert summary["zs_manifest/top1"] >= 3 * chance
    assert summary["zs_folder/top1"] >= 3 * chance

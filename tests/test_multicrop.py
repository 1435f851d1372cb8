"""Multi-crop views with SimCLR / BYOL / SwAV photometric augmentation: each operation's effect,
stacking views by resolution, and a stream that does not depend on the number of workers."""

import itertools
import pickle

import jax
import numpy as np
import pytest

from big_contrast import experiment, sharding
from big_contrast.data import augment, pipeline, sources, synthetic, transforms
from big_contrast.data.spec import BatchSpec, ImageGroup, ImageView
from tests.helpers import tiny_clip_config

_PHOTOMETRIC = dict(flip=True, colour_jitter=1.0, grayscale_prob=0.2, blur_prob=0.5,
                    solarize_prob=0.2)
# SwAV-style: 2 large crops then 3 small ones. The large crops blur visibly at 16 pixels
# (blur_sigma is given at 224 pixels: (10, 30) -> 0.7 to 2.1 pixels).
MULTI_CROP = BatchSpec(
    views=(ImageView(16, (0.3, 1.0), blur_sigma=(10.0, 30.0), **_PHOTOMETRIC),) * 2
    + (ImageView(8, (0.05, 0.3), **_PHOTOMETRIC),) * 3,
    labels=("shape",))
ALL_ON = ImageView(16, (0.3, 1.0), True, colour_jitter=1.0, jitter_prob=1.0, grayscale_prob=0.0,
                   blur_prob=1.0, blur_sigma=(10.0, 30.0), solarize_prob=1.0)


def _image(index=0):
    return synthetic.SyntheticWorld("train")[index]["image"]


def _noise(seed=0, size=32):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _stream(config, spec=MULTI_CROP, n=16):
    stream = pipeline.example_stream(sources.build_source(config.data, "train"), config.data,
                                     spec, None, seed=0)
    it = iter(stream)
    try:
        return list(itertools.islice(it, n))
    finally:
        if hasattr(it, "close"):
            it.close()


# ------------------------------------------------------------------ the spec

def test_views_are_grouped_by_size_in_order_of_first_appearance():
    spec = BatchSpec(views=(ImageView(16), ImageView(8), ImageView(16), ImageView(8),
                            ImageView(8), ImageView(12)))
    assert spec.image_groups() == (ImageGroup("crops_16", 16, 2), ImageGroup("crops_8", 8, 3),
                                   ImageGroup("crops_12", 12, 1))
    assert [g.example_shape for g in spec.image_groups()] == [(2, 16, 16, 3), (3, 8, 8, 3),
                                                             (1, 12, 12, 3)]
    single = BatchSpec(views=(ImageView(24),))
    assert single.image_groups() == (("image", 24, 1),)
    assert single.image_groups()[0].example_shape == (24, 24, 3)
    assert BatchSpec(views=()).image_groups() == ()


def test_example_batch_has_one_key_per_resolution():
    batch = experiment.example_batch(BatchSpec(views=MULTI_CROP.views, text=True), max_len=12)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "crops_16": ((1, 2, 16, 16, 3), np.uint8), "crops_8": ((1, 3, 8, 8, 3), np.uint8),
        "text": ((1, 12), np.int32)}
    batch = experiment.example_batch(BatchSpec(views=(ImageView(16),)), max_len=12)
    assert {k: v.shape for k, v in batch.items()} == {"image": (1, 16, 16, 3)}


def test_image_view_defaults_and_checks():
    view = ImageView(16)
    assert (view.crop_scale, view.flip, view.colour_jitter, view.jitter_prob,
            view.grayscale_prob, view.blur_prob, view.blur_sigma, view.solarize_prob) == (
        (1.0, 1.0), False, 0.0, 0.8, 0.0, 0.0, (0.1, 2.0), 0.0)
    assert ImageView(16, blur_sigma=[1, 2]).blur_sigma == (1.0, 2.0)
    for bad in ({"grayscale_prob": 1.5}, {"jitter_prob": -0.1}, {"colour_jitter": -1.0},
                {"colour_jitter": 3.0}, {"blur_sigma": (2.0, 1.0)}, {"blur_sigma": (0.0, 1.0)}):
        with pytest.raises(ValueError, match="ImageView"):
            ImageView(16, **bad)


# ------------------------------------------------------------------ each operation

def test_grayscale_gives_the_luma_in_every_channel():
    image = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 200, 30]]], np.uint8)
    grey = augment.grayscale(image)
    assert grey.dtype == np.uint8 and grey.shape == (2, 2, 3)
    assert (grey == grey[..., :1]).all()
    # 0.299 R + 0.587 G + 0.114 B, rounded: 76.2, 149.7, 29.1, 123.8
    np.testing.assert_array_equal(grey[..., 0], [[76, 150], [29, 124]])
    view = ImageView(16, (0.3, 1.0), grayscale_prob=1.0)
    out = transforms.augment_view(_image(), view, np.random.default_rng(0))
    assert (out == out[..., :1]).all() and out[..., 0].std() > 10


def test_solarize_inverts_exactly_the_pixels_from_128_up():
    image = _noise(1)
    out = augment.solarize(image)
    high = image >= 128
    assert 0.4 < high.mean() < 0.6
    np.testing.assert_array_equal(out[high], 255 - image[high])
    np.testing.assert_array_equal(out[~high], image[~high])
    edges = np.array([[[0, 127, 128], [129, 254, 255]]], np.uint8)
    np.testing.assert_array_equal(augment.solarize(edges), [[[0, 127, 127], [126, 1, 0]]])


def test_blur_smooths_noise_and_keeps_constant_images():
    image = _noise(2)
    blurred = augment.gaussian_blur(image, 2.0)
    assert blurred.dtype == np.uint8 and blurred.shape == image.shape
    assert blurred.astype(float).var() < 0.1 * image.astype(float).var()
    assert abs(blurred.astype(float).mean() - image.astype(float).mean()) < 2.0
    constant = np.full((16, 16, 3), (7, 128, 250), np.uint8)
    for sigma in (0.3, 2.0, 40.0):  # 40 pixels reflects off both borders many times
        np.testing.assert_array_equal(augment.gaussian_blur(constant, sigma), constant)
    np.testing.assert_array_equal(augment.gaussian_blur(image, 0.05), image)  # negligible sigma
    # The view's sigma is scaled by size / 224: the default (0.1, 2.0) is at most 0.14 pixels
    # at 16 px, too little to change a uint8 pixel; (10, 30) blurs.
    resized = transforms.resize(image, 16)
    weak = transforms.augment_view(image, ImageView(16, blur_prob=1.0), np.random.default_rng(0))
    np.testing.assert_array_equal(weak, resized)
    strong = transforms.augment_view(image, ImageView(16, blur_prob=1.0, blur_sigma=(10, 30)),
                                     np.random.default_rng(0))
    assert strong.astype(float).var() < 0.5 * resized.astype(float).var()


def test_colour_jitter_of_strength_or_probability_zero_is_the_identity():
    image = _image(3)
    crop_flip = ImageView(16, (0.3, 1.0), True)
    for off in (ImageView(16, (0.3, 1.0), True, colour_jitter=0.0, jitter_prob=1.0),
                ImageView(16, (0.3, 1.0), True, colour_jitter=1.0, jitter_prob=0.0)):
        for seed in range(4):
            np.testing.assert_array_equal(
                transforms.augment_view(image, off, np.random.default_rng(seed)),
                transforms.augment_view(image, crop_flip, np.random.default_rng(seed)))
    np.testing.assert_array_equal(augment.colour_jitter(image, np.random.default_rng(0)), image)


def test_colour_jitter_factors_follow_torchvision():
    image = _noise(4, 8)
    # Brightness alone: pixels times a factor from [1 - 0.5, 1 + 0.5], rounded and clipped.
    rng, replay = np.random.default_rng(7), np.random.default_rng(7)
    out = augment.colour_jitter(image, rng, brightness=0.5)
    replay.permutation(4)
    factor = 1 + 0.5 * (2 * replay.random(4)[0] - 1)
    assert 0.5 <= factor <= 1.5
    np.testing.assert_array_equal(out, np.clip(np.floor(image * np.float32(factor) + 0.5),
                                               0, 255))
    # Saturation alone keeps each pixel's luma (up to rounding).
    out = augment.colour_jitter(image, np.random.default_rng(8), saturation=0.8)
    luma = lambda x: x.astype(float) @ [0.299, 0.587, 0.114]  # noqa: E731
    assert not np.array_equal(out, image)
    assert np.abs(luma(out) - luma(image)).max() < 60  # clipping moves the luma of some pixels
    assert np.abs(luma(out) - luma(image)).mean() < 5
    # A hue shift rotates the colour wheel: a third of a turn maps red to green to blue.
    primaries = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [90, 90, 90]]], np.uint8)
    np.testing.assert_array_equal(augment.shift_hue(primaries, 1 / 3),
                                  [[[0, 255, 0], [0, 0, 255], [255, 0, 0], [90, 90, 90]]])
    np.testing.assert_array_equal(augment.shift_hue(primaries[:, :1], -1 / 6), [[[255, 0, 255]]])
    np.testing.assert_array_equal(augment.shift_hue(_noise(5), 0.0), _noise(5))
    # (200, 100, 50) has hue 20 degrees; 0.1 turns (36 degrees) later it is (200, 190, 50).
    np.testing.assert_array_equal(augment.shift_hue(np.array([[[200, 100, 50]]], np.uint8), 0.1),
                                  [[[200, 190, 50]]])


def test_the_same_seed_gives_the_same_view_and_other_seeds_differ():
    image = _image(5)
    views = [transforms.augment_view(image, ALL_ON, np.random.default_rng(seed))
             for seed in (11, 11, 12, 13)]
    assert all(v.shape == (16, 16, 3) and v.dtype == np.uint8 for v in views)
    np.testing.assert_array_equal(views[0], views[1])
    assert not np.array_equal(views[0], views[2]) and not np.array_equal(views[2], views[3])


def test_single_view_output_is_the_plain_crop_and_flip():
    spec = BatchSpec(views=(ImageView(16, (0.3, 1.0), True),), labels=("shape",))
    preprocess = transforms.TrainPreprocess(spec)
    world = synthetic.SyntheticWorld("train")
    flips = 0
    for index in range(8):
        record = world[index]
        out = preprocess.random_map(record, np.random.default_rng(100 + index))
        assert sorted(out) == ["image", "shape"]
        rng = np.random.default_rng(100 + index)
        expected = transforms.random_resized_crop(record["image"], 16, (0.3, 1.0), rng)
        if rng.random() < 0.5:
            expected = expected[:, ::-1]
            flips += 1
        assert out["image"].shape == (16, 16, 3) and out["image"].flags.c_contiguous
        np.testing.assert_array_equal(out["image"], expected)
    assert 0 < flips < 8


def test_views_are_drawn_in_spec_order_and_stacked_by_size():
    views = (ImageView(16, (0.3, 1.0), True, colour_jitter=0.5),
             ImageView(8, (0.05, 0.3), True, solarize_prob=0.5),
             ImageView(16, (0.3, 1.0), True, grayscale_prob=0.5))
    preprocess = transforms.TrainPreprocess(BatchSpec(views=views))
    preprocess = pickle.loads(pickle.dumps(preprocess))  # grain ships it to worker processes
    record = synthetic.SyntheticWorld("train")[9]
    out = preprocess.random_map(record, np.random.default_rng(3))
    assert {k: v.shape for k, v in out.items()} == {"crops_16": (2, 16, 16, 3),
                                                    "crops_8": (1, 8, 8, 3)}
    rng = np.random.default_rng(3)
    first, small, second = (transforms.augment_view(record["image"], v, rng) for v in views)
    np.testing.assert_array_equal(out["crops_16"][0], first)
    np.testing.assert_array_equal(out["crops_16"][1], second)
    np.testing.assert_array_equal(out["crops_8"][0], small)


# ------------------------------------------------------------------ through the pipeline

def test_multi_crop_stream_is_identical_with_and_without_workers():
    config = tiny_clip_config()
    in_process = _stream(config)
    config.data.num_workers = 2
    in_workers = _stream(config)
    assert len(in_process) == len(in_workers) == 16
    for a, b in zip(in_process, in_workers, strict=True):
        assert sorted(a) == sorted(b) == ["crops_16", "crops_8", "shape"]
        assert a["crops_16"].shape == (2, 16, 16, 3) and a["crops_16"].dtype == np.uint8
        assert a["crops_8"].shape == (3, 8, 8, 3) and a["crops_8"].dtype == np.uint8
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    crops = np.stack([e["crops_16"] for e in in_process])
    small = np.stack([e["crops_8"] for e in in_process])
    # The views of one example differ, and so do different examples.
    assert all(not np.array_equal(c[0], c[1]) for c in crops)
    assert len({c.tobytes() for c in small.reshape(-1, 8, 8, 3)}) == 16 * 3
    # Grayscale (p = 0.2) hit some but not all of the 80 crops.
    grey = [bool((c == c[..., :1]).all()) for c in
            list(crops.reshape(-1, 16, 16, 3)) + list(small.reshape(-1, 8, 8, 3))]
    assert 0 < sum(grey) < 40


def test_multi_crop_training_batches_are_global_arrays():
    config = tiny_clip_config()
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1}, jax.devices()[:2])
    batches = pipeline.TrainBatches(config.data, MULTI_CROP, None, 4, 0, mesh)
    try:
        batch = next(batches)
    finally:
        batches.close()
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "crops_16": ((4, 2, 16, 16, 3), np.uint8), "crops_8": ((4, 3, 8, 8, 3), np.uint8),
        "shape": ((4,), np.int32)}
    assert batch["crops_16"].addressable_shards[0].data.shape == (2, 2, 16, 16, 3)

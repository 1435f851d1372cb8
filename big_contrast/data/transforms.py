"""Per-example preprocessing on host workers: decode, crops, flips, colour augmentation (the
photometric operations live in augment.py), tokenization.

Everything here is numpy/PIL and picklable, so grain can run it in worker processes. The
grain transforms at the bottom turn a raw record into exactly the fields a BatchSpec asks for.
A record that cannot be used (missing or undecodable image, an image too large to decode
safely, an empty or non-UTF-8 caption) becomes a marker ``{CORRUPT_KEY: reason, DETAIL_KEY:
message}`` in training, so the pipeline can skip it and count it by reason, and None in
evaluation.
"""

from __future__ import annotations

import io
import logging
import warnings

import grain
import numpy as np
from PIL import Image

from big_contrast.data import augment
from big_contrast.data.spec import BatchSpec, ImageView

log = logging.getLogger(__name__)

CORRUPT_KEY = "_corrupt"  # marks an element that stands for a skipped record
DETAIL_KEY = "_corrupt_detail"

# PIL's default limit: larger images are refused before decoding, so a header that claims
# 50,000 x 50,000 pixels costs nothing.
DEFAULT_MAX_PIXELS = 89_478_485


class CorruptRecordError(ValueError):
    """A record that cannot be used. ``reason`` (the pipeline counts each separately):
    missing_file, undecodable_image, image_too_large, empty_caption, caption_not_utf8 or
    bad_row."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _open_checked(file, max_pixels: int) -> np.ndarray:
    """Decodes an encoded image after checking its header's pixel count against max_pixels
    (PIL's own bomb check is set to the same limit, so max_pixels may also exceed PIL's)."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(file) as pil:
            width, height = pil.size
            if width * height > max_pixels:
                raise CorruptRecordError("image_too_large", f"{width} x {height} pixels exceed "
                                         f"data.max_image_pixels={max_pixels:,}")
            return np.asarray(pil.convert("RGB"))


def decode_image(record: dict, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The record's image as uint8 RGB [H, W, 3], from 'image' (array or encoded bytes) or
    'image_path'; raises CorruptRecordError with the reason when it cannot."""
    if "corrupt" in record:  # a source-level problem, e.g. a manifest row that does not parse
        raise CorruptRecordError("bad_row", str(record["corrupt"]))
    where = record.get("image_path", "<bytes>")
    try:
        if "image" in record and isinstance(record["image"], np.ndarray) and record["image"].ndim == 3:
            image = record["image"]
        elif "image" in record:  # encoded bytes (TFDS / ArrayRecord)
            image = _open_checked(io.BytesIO(record["image"]), max_pixels)
        elif "image_path" in record:
            image = _open_checked(record["image_path"], max_pixels)
        else:
            raise CorruptRecordError("bad_row", f"record has no 'image' or 'image_path' field: "
                                     f"{sorted(record)}")
    except CorruptRecordError:
        raise
    except FileNotFoundError as e:
        raise CorruptRecordError("missing_file", f"image file {where} does not exist") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise CorruptRecordError("image_too_large", f"image {where}: {e}") from e
    except Exception as e:  # PIL raises many types for truncated or foreign files
        raise CorruptRecordError("undecodable_image",
                                 f"cannot decode image {where}: {type(e).__name__}: {e}") from e
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise CorruptRecordError("undecodable_image", f"image has shape {image.shape} and dtype "
                                 f"{image.dtype}, expected uint8 [H, W, 3]")
    return image


def clean_caption(caption) -> str:
    """The caption as non-empty UTF-8 text; raises CorruptRecordError otherwise."""
    try:
        if isinstance(caption, bytes):
            caption = caption.decode("utf-8")
        caption.encode("utf-8")  # lone surrogates: bytes that were not UTF-8 in the file
    except UnicodeError as e:
        raise CorruptRecordError("caption_not_utf8", f"caption is not UTF-8 text: {e}") from e
    if not caption.strip():
        raise CorruptRecordError("empty_caption", "caption is empty")
    return caption


def corrupt_marker(error: CorruptRecordError) -> dict:
    """The element that stands for a skipped record in the training stream."""
    return {CORRUPT_KEY: error.reason, DETAIL_KEY: str(error)}


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Square resize with bicubic filtering (no-op when already size x size)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to ``size``, then take the central square (evaluation view)."""
    h, w = image.shape[:2]
    if h != w:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        image = image[top:top + side, left:left + side]
    return resize(image, size)


def random_resized_crop(image: np.ndarray, size: int, scale: tuple[float, float],
                        rng: np.random.Generator, ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """Crop a random area fraction in ``scale`` with aspect ratio in ``ratio``, resize to size."""
    h, w = image.shape[:2]
    if scale[0] >= 1.0:
        return center_crop(image, size)
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
            return resize(image[top:top + ch, left:left + cw], size)
    return center_crop(image, size)


def augment_view(image: np.ndarray, view: ImageView, rng: np.random.Generator) -> np.ndarray:
    """One view of ``image`` (uint8 [size, size, 3]): random resized crop -> flip -> colour
    jitter -> grayscale -> blur -> solarize, per ``view``. An operation that is off draws
    nothing from ``rng``, so a view with only crop and flip gives the same pixels as before
    the photometric operations existed."""
    crop = random_resized_crop(image, view.size, view.crop_scale, rng)
    if view.flip and rng.random() < 0.5:
        crop = crop[:, ::-1]
    if view.colour_jitter > 0 and rng.random() < view.jitter_prob:
        s = view.colour_jitter
        hue = 0.2 * s if view.hue_jitter is None else view.hue_jitter
        crop = augment.colour_jitter(crop, rng, brightness=0.8 * s, contrast=0.8 * s,
                                     saturation=0.8 * s, hue=hue)
    if view.grayscale_prob > 0 and rng.random() < view.grayscale_prob:
        crop = augment.grayscale(crop)
    if view.blur_prob > 0 and rng.random() < view.blur_prob:
        sigma = rng.uniform(*view.blur_sigma) * view.size / 224  # blur_sigma is at 224 pixels
        crop = augment.gaussian_blur(crop, sigma)
    if view.solarize_prob > 0 and rng.random() < view.solarize_prob:
        crop = augment.solarize(crop)
    return np.ascontiguousarray(crop)


class TrainPreprocess(grain.transforms.RandomMap):
    """Raw record -> {image views ('image' or 'crops_{size}' groups), 'text', labels} per the
    BatchSpec, or a corrupt marker. All randomness comes from grain's per-example rng."""

    def __init__(self, spec: BatchSpec, tokenizer=None, max_pixels: int = DEFAULT_MAX_PIXELS):
        if spec.text and tokenizer is None:
            raise ValueError("the batch spec asks for text but no tokenizer was given")
        self.spec = spec
        self.tokenizer = tokenizer
        self.max_pixels = max_pixels

    def random_map(self, record: dict, rng: np.random.Generator):
        try:
            image = decode_image(record, self.max_pixels)
            caption = clean_caption(record.get("caption", "")) if self.spec.text else None
        except CorruptRecordError as e:
            return corrupt_marker(e)
        out = {}
        # Views are drawn in the spec's order, then stacked by size (BatchSpec.image_groups).
        crops = [augment_view(image, view, rng) for view in self.spec.views]
        for group in self.spec.image_groups():
            if group.key == "image":
                out["image"] = crops[0]
            else:
                out[group.key] = np.stack([crop for crop, view in zip(crops, self.spec.views)
                                           if view.size == group.size])
        if self.spec.text:
            out["text"] = self.tokenizer.encode(caption)
        for label in self.spec.labels:
            out[label] = np.int32(record[label])
        return out


class EvalPreprocess(grain.transforms.Map):
    """Raw record -> {'image' (central view), 'text', 'caption' (the cleaned string, with
    ``keep_caption``), requested labels}, or None if corrupt."""

    def __init__(self, image_size: int, tokenizer=None, labels: tuple[str, ...] = (),
                 max_pixels: int = DEFAULT_MAX_PIXELS, keep_caption: bool = False):
        self.image_size = image_size
        self.tokenizer = tokenizer
        self.labels = labels
        self.max_pixels = max_pixels
        self.keep_caption = keep_caption

    def map(self, record: dict):
        try:
            image = decode_image(record, self.max_pixels)
            caption = clean_caption(record.get("caption", "")) if self.tokenizer else None
        except CorruptRecordError as e:
            log.warning("skipping record in evaluation: %s", e)
            return None
        out = {"image": center_crop(image, self.image_size)}
        if self.tokenizer is not None:
            out["text"] = self.tokenizer.encode(caption)
            if self.keep_caption:
                out["caption"] = caption
        for label in self.labels:
            out[label] = np.int32(record[label])
        return out

"""Per-example preprocessing on host workers: decode, crops, flips, tokenization.

Everything here is numpy/PIL and picklable, so grain can run it in worker processes. The
grain transforms at the bottom turn a raw record into exactly the fields a BatchSpec asks for;
a record whose image cannot be decoded becomes None, which the pipeline skips and counts.
"""

from __future__ import annotations

import io
import logging

import grain
import numpy as np
from PIL import Image

from big_contrast.data.spec import BatchSpec

log = logging.getLogger(__name__)


class CorruptRecordError(ValueError):
    """A record whose image is missing or cannot be decoded."""


def decode_image(record: dict) -> np.ndarray:
    """The record's image as uint8 RGB [H, W, 3], from 'image' (array or encoded bytes) or
    'image_path'."""
    try:
        if "image" in record and isinstance(record["image"], np.ndarray) and record["image"].ndim == 3:
            image = record["image"]
        elif "image" in record:  # encoded bytes (TFDS / ArrayRecord)
            with Image.open(io.BytesIO(record["image"])) as pil:
                image = np.asarray(pil.convert("RGB"))
        elif "image_path" in record:
            with Image.open(record["image_path"]) as pil:
                image = np.asarray(pil.convert("RGB"))
        else:
            raise CorruptRecordError(f"record has no 'image' or 'image_path' field: {sorted(record)}")
    except CorruptRecordError:
        raise
    except Exception as e:  # PIL raises many types for truncated or foreign files
        where = record.get("image_path", "<bytes>")
        raise CorruptRecordError(f"cannot decode image {where}: {type(e).__name__}: {e}") from e
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise CorruptRecordError(f"image has shape {image.shape} and dtype {image.dtype}, "
                                 "expected uint8 [H, W, 3]")
    return image


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


class TrainPreprocess(grain.transforms.RandomMap):
    """Raw record -> {image views, 'text', labels} per the BatchSpec, or None if corrupt."""

    def __init__(self, spec: BatchSpec, tokenizer=None):
        if spec.text and tokenizer is None:
            raise ValueError("the batch spec asks for text but no tokenizer was given")
        self.spec = spec
        self.tokenizer = tokenizer

    def random_map(self, record: dict, rng: np.random.Generator):
        try:
            image = decode_image(record)
        except CorruptRecordError as e:
            log.warning("skipping corrupt record: %s", e)
            return None
        out = {}
        for key, view in zip(self.spec.image_keys(), self.spec.views):
            crop = random_resized_crop(image, view.size, view.crop_scale, rng)
            if view.flip and rng.random() < 0.5:
                crop = crop[:, ::-1]
            out[key] = np.ascontiguousarray(crop)
        if self.spec.text:
            out["text"] = self.tokenizer.encode(record["caption"])
        for label in self.spec.labels:
            out[label] = np.int32(record[label])
        return out


class EvalPreprocess(grain.transforms.Map):
    """Raw record -> {'image' (central view), 'text', requested labels}, or None if corrupt."""

    def __init__(self, image_size: int, tokenizer=None, labels: tuple[str, ...] = ()):
        self.image_size = image_size
        self.tokenizer = tokenizer
        self.labels = labels

    def map(self, record: dict):
        try:
            image = decode_image(record)
        except CorruptRecordError as e:
            log.warning("skipping corrupt record: %s", e)
            return None
        out = {"image": center_crop(image, self.image_size)}
        if self.tokenizer is not None:
            out["text"] = self.tokenizer.encode(record["caption"])
        for label in self.labels:
            out[label] = np.int32(record[label])
        return out

"""Shared test fixtures' building blocks: a tiny CLIP config and a folder of PNG files."""

import csv
import os

import numpy as np
from PIL import Image

from big_contrast import config as bc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


TINY_CLIP = "tests/tiny_clip.py"  # relative to REPO, as the command-line tests pass it


def tiny_clip_config(arg: str = "", **overrides):
    """tests/tiny_clip.py's config with dotted-key overrides (values as strings or numbers)."""
    config = bc.load_config_file(os.path.join(REPO, f"{TINY_CLIP}:{arg}"))
    return bc.apply_overrides(config, {k: str(v) for k, v in overrides.items()})


def write_png_manifest(folder, n: int, *, corrupt: int = 0, size: int = 20) -> str:
    """n PNGs with captions naming their colour in a CSV manifest, the last ``corrupt`` of them
    replaced by bytes that are not an image. Returns the manifest path."""
    os.makedirs(folder, exist_ok=True)
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220),
               "yellow": (230, 220, 40)}
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        name = list(colours)[i % len(colours)]
        image = np.full((size, size, 3), colours[name], np.uint8)
        image = np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)
        path = os.path.join(folder, f"img_{i:04d}.png")
        if i >= n - corrupt:
            with open(path, "wb") as f:
                f.write(b"not a png at all")
        else:
            Image.fromarray(image).save(path)
        rows.append({"image": os.path.basename(path), "caption": f"a {name} square"})
    manifest = os.path.join(folder, "manifest.csv")
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest

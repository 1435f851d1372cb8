"""Small labelled image sets for evaluator tests: one folder of coloured PNGs, described both
as a CSV manifest with a label column of class names and as an ImageFolder layout."""

import csv
import os

import numpy as np
from PIL import Image

# The colours tests/helpers.py::write_png_manifest captions ("a red square"), with their RGB.
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220),
           "yellow": (230, 220, 40)}


def noisy_square(rgb, size: int, rng: np.random.Generator) -> np.ndarray:
    image = np.full((size, size, 3), rgb, np.int64) + rng.integers(-20, 20, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_labelled_set(root, per_class: int, *, size: int = 24, seed: int = 1) -> dict:
    """``per_class`` PNGs of each colour under root/<colour>/ (the ImageFolder layout) and
    root/labels.csv with columns image,label (label = the colour's name), rows interleaved by
    class. Returns {'manifest': path, 'folder': root, 'classes': sorted class names}."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(per_class):
        for name, rgb in COLOURS.items():
            os.makedirs(os.path.join(root, name), exist_ok=True)
            relative = os.path.join(name, f"{i:03d}.png")
            Image.fromarray(noisy_square(rgb, size, rng)).save(os.path.join(root, relative))
            rows.append({"image": relative, "label": name})
    manifest = os.path.join(root, "labels.csv")
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return {"manifest": manifest, "folder": str(root), "classes": sorted(COLOURS)}

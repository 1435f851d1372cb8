"""Shared test fixtures' building blocks: a tiny CLIP config and a folder of PNG files."""

import csv
import os

import jax
import jax.numpy as jnp
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


def read_tensorboard_scalars(folder) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in the TensorBoard event files under ``folder``
    (TFRecord framing: length, its CRC, the Event proto, its CRC)."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars = []
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as f:
                data = f.read()
            offset = 0
            while offset + 12 <= len(data):
                (length,) = struct.unpack("<Q", data[offset:offset + 8])
                event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
                offset += 12 + length + 4
                scalars += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return scalars


def png_bytes(size: int = 20, colour=(200, 40, 40)) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), colour, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no pixel data: a
    decompression bomb as a decoder first sees it."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


# One bad record of each kind the pipeline must skip and count, by the reason it counts it under.
BAD_RECORDS = {
    "missing_file": ("missing.png", b"a red square"),
    "undecodable_image": ("truncated.png", b"a red square"),
    "image_too_large": ("bomb.png", b"a red square"),
    "empty_caption": ("empty_caption.png", b""),
    "caption_not_utf8": ("latin1_caption.png", b"a red caf\xe9 square"),
}


def write_bad_manifest(folder, good: int, bad_each: int = 1) -> str:
    """A CSV manifest of ``good`` decodable PNGs with captions, plus ``bad_each`` records of
    every BAD_RECORDS kind (plus one non-image file among the undecodable ones), shuffled
    in. Written as bytes so that a caption can be invalid UTF-8. Returns the manifest path."""
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i in range(good):
        name = f"good_{i:04d}.png"
        with open(os.path.join(folder, name), "wb") as f:
            f.write(png_bytes(colour=(200, 40, 40) if i % 2 else (40, 40, 200)))
        rows.append((name.encode(), b"a red square" if i % 2 else b"a blue square"))
    payloads = {"truncated.png": png_bytes()[:60], "bomb.png": png_header_claiming(50_000, 50_000),
                "empty_caption.png": png_bytes(), "latin1_caption.png": png_bytes(),
                "not_an_image.png": b"these bytes are not an image"}
    for name, payload in payloads.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(payload)
    for _ in range(bad_each):
        rows += [(name.encode(), caption) for name, caption in BAD_RECORDS.values()]
        rows.append((b"not_an_image.png", b"a blue square"))
    order = np.random.default_rng(0).permutation(len(rows))
    manifest = os.path.join(folder, "manifest.csv")
    with open(manifest, "wb") as f:
        f.write(b"image,caption\n")
        for i in order:
            f.write(rows[i][0] + b"," + rows[i][1] + b"\n")
    return manifest


def parameter_count(tree) -> int:
    """Total number of entries over a tree's leaves (arrays or ShapeDtypeStructs)."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def random_images(batch: int, seed: int = 0, size: int = 32):
    """[batch, size, size, 3] uint8 noise images as a jax array."""
    return jnp.asarray(np.random.RandomState(seed).randint(0, 256, (batch, size, size, 3),
                                                           np.uint8))

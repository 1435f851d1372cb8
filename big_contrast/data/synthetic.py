"""The embedded default dataset: a procedurally generated world of shapes with captions.

Every record is a pure function of (seed, split, index), so a source of any length needs no
download and no storage, and any two runs (or hosts) see exactly the same examples. Images show
one or two objects (8 shapes x 8 colours, 3 sizes, 9 positions) over textured or noisy
backgrounds; captions are sampled from several templates with synonyms and varying word order,
and each record also carries the attribute labels it was drawn from.

Splits:
  train           the full world minus HELDOUT_COMBOS (no object ever has a held-out pairing);
  val             the same distribution as train, drawn from disjoint seeds;
  heldout_combos  single objects whose colour-shape pairing never occurs in train: zero-shot
                  shape accuracy here measures compositional generalisation.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "heart")
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
SIZES = ("small", "medium", "large")
POSITIONS = ("top left", "top", "top right", "left", "centre", "right",
             "bottom left", "bottom", "bottom right")
BACKGROUNDS = ("plain", "noisy", "striped", "checkered", "shaded", "mottled")

# One held-out colour per shape and one held-out shape per colour (a Latin-square diagonal),
# so every shape and every colour is still seen in train with seven partners.
HELDOUT_COMBOS = tuple((s, (3 * s + 1) % len(COLOURS)) for s in range(len(SHAPES)))

SPLITS = {"train": 0, "val": 1, "heldout_combos": 2}

_RGB = np.array([
    (220, 40, 40),    # red
    (245, 140, 20),   # orange
    (240, 220, 40),   # yellow
    (40, 180, 60),    # green
    (40, 210, 220),   # cyan
    (40, 70, 230),    # blue
    (150, 50, 200),   # purple
    (250, 130, 190),  # pink
], dtype=np.float32)

_LUMA = np.array([[0.299], [0.587], [0.114]], np.float32)  # RGB -> grey (ITU-R 601)
_SIZE_RADIUS = ((0.15, 0.18), (0.21, 0.24), (0.27, 0.31))  # fraction of the image side

SHAPE_WORDS = {
    "circle": ("circle", "circle", "circle", "disc", "round dot"),
    "square": ("square", "square", "square", "box"),
    "triangle": ("triangle", "triangle", "triangle", "three-sided shape"),
    "diamond": ("diamond", "diamond", "diamond", "rhombus"),
    "star": ("star", "star", "star", "five-pointed star"),
    "cross": ("cross", "cross", "cross", "plus sign"),
    "ring": ("ring", "ring", "ring", "hollow circle", "donut"),
    "heart": ("heart", "heart", "heart", "love heart"),
}
COLOUR_WORDS = {
    "red": ("red", "red", "scarlet"), "orange": ("orange",), "yellow": ("yellow", "golden"),
    "green": ("green",), "cyan": ("cyan", "turquoise"), "blue": ("blue", "navy"),
    "purple": ("purple", "violet"), "pink": ("pink",),
}
_SIZE_WORDS = {
    "small": ("small", "little", "tiny"), "medium": ("medium", "medium-sized", "mid-sized"),
    "large": ("large", "big", "huge"),
}
_POSITION_WORDS = {
    "top left": ("in the top left", "in the upper left corner", "at the top left"),
    "top": ("at the top", "near the top edge", "in the top middle"),
    "top right": ("in the top right", "in the upper right corner", "at the top right"),
    "left": ("on the left", "at the left side", "on the left edge"),
    "centre": ("in the centre", "in the middle", "at the center"),
    "right": ("on the right", "at the right side", "on the right edge"),
    "bottom left": ("in the bottom left", "in the lower left corner", "at the bottom left"),
    "bottom": ("at the bottom", "near the bottom edge", "in the bottom middle"),
    "bottom right": ("in the bottom right", "in the lower right corner", "at the bottom right"),
}
_GREY_WORDS = ("black and white photo:", "a grayscale picture:", "in black and white,")
_BACKGROUND_WORDS = {
    "plain": ("a plain", "a flat", "an empty"), "noisy": ("a noisy", "a grainy", "a speckled"),
    "striped": ("a striped", "a lined"), "checkered": ("a checkered", "a chequered", "a tiled"),
    "shaded": ("a shaded", "a gradient"), "mottled": ("a mottled", "a blotchy", "a cloudy"),
}


@dataclasses.dataclass(frozen=True)
class _Object:
    shape: int
    colour: int
    size: int
    position: int
    cx: float
    cy: float
    radius: float


def _choose(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


# ----------------------------------------------------------------------------- rendering


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean coverage of a unit-radius shape at object-local coordinates (u right, v up)."""
    name = SHAPES[shape]
    if name == "circle":
        return u * u + v * v <= 0.85
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.78
    if name == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if name == "triangle":  # upward, circumradius 1
        return (v >= -0.5) & (np.sqrt(3.0) * u + v <= 1.0) & (-np.sqrt(3.0) * u + v <= 1.0)
    if name == "star":  # five points, outer radius 1, inner radius 0.42
        r = np.sqrt(u * u + v * v)
        phi = np.arctan2(u, v)  # 0 at the top point
        sector = 2 * np.pi / 5
        alpha = np.abs((phi % sector) - sector / 2) / (sector / 2)  # 0 mid-notch, 1 at a point
        return r <= 0.42 + 0.58 * alpha ** 2.2
    if name == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))
    if name == "ring":
        rr = u * u + v * v
        return (rr <= 1.0) & (rr >= 0.36)
    if name == "heart":
        x, y = 1.15 * u, 1.15 * v + 0.15
        return (x * x + y * y - 1.0) ** 3 - x * x * y ** 3 <= 0.0
    raise ValueError(f"unknown shape {shape}")


@functools.lru_cache(maxsize=8)
def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1), as (yy, xx) float32 [size, size] (read-only)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


def _background(rng: np.random.Generator, kind: int, size: int,
                brightness: tuple[float, float] = (60, 190)) -> np.ndarray:
    """A low-saturation textured background, float32 [size, size, 3] in 0..255."""
    name = BACKGROUNDS[kind]
    base = (rng.uniform(*brightness) + rng.uniform(-12, 12, size=3)).astype(np.float32)
    yy, xx = _unit_grid(size)
    if name == "plain":
        tex = np.zeros((size, size), np.float32)
    elif name == "noisy":
        tex = 22 * rng.standard_normal((size, size), dtype=np.float32)
    elif name == "striped":
        angle = rng.uniform(0, np.pi)
        freq = rng.uniform(3, 7)
        t = np.cos(angle) * xx + np.sin(angle) * yy
        tex = 28 * np.sign(np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi)))
    elif name == "checkered":
        cells = int(rng.integers(3, 7))
        tex = 24 * (((xx * cells).astype(int) + (yy * cells).astype(int)) % 2 * 2 - 1).astype(np.float32)
    elif name == "shaded":
        angle = rng.uniform(0, 2 * np.pi)
        tex = 45 * (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5))
    else:  # mottled: low-resolution noise, upsampled
        coarse = 26 * rng.standard_normal((5, 5), dtype=np.float32)
        idx = np.minimum((np.arange(size) * 5) // size, 4)
        tex = coarse[idx][:, idx]
    return base[None, None, :] + tex[..., None]


def _render(rng: np.random.Generator, objects, background: int, size: int,
            grey: bool = False) -> np.ndarray:
    if grey:  # keep the objects visible once colour is gone: light on dark or dark on light
        luma = float(np.mean([_RGB[o.colour] @ _LUMA[:, 0] for o in objects]))
        img = _background(rng, background, size, (30, 80) if luma > 120 else (170, 225))
    else:
        img = _background(rng, background, size)
    ss = 2  # supersampling factor for anti-aliased edges
    for obj in objects:
        # Only the object's bounding box is rasterised and composited.
        x0, x1 = max(int(obj.cx - obj.radius) - 1, 0), min(int(obj.cx + obj.radius) + 2, size)
        y0, y1 = max(int(obj.cy - obj.radius) - 1, 0), min(int(obj.cy + obj.radius) + 2, size)
        xs = (np.arange(x0 * ss, x1 * ss, dtype=np.float32) + 0.5) / ss
        ys = (np.arange(y0 * ss, y1 * ss, dtype=np.float32) + 0.5) / ss
        u = (xs[None, :] - obj.cx) / obj.radius
        v = (obj.cy - ys[:, None]) / obj.radius
        cover = _shape_mask(obj.shape, u, v).astype(np.float32)
        alpha = cover.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))[..., None]
        rgb = np.clip(_RGB[obj.colour] + rng.uniform(-18, 18, size=3), 0, 255).astype(np.float32)
        box = img[y0:y1, x0:x1]
        box += alpha * (rgb - box)
    img += 4 * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- captions


def _noun_phrase(rng, obj: _Object, with_size: bool, with_colour: bool = True,
                 with_shape: bool = True) -> str:
    words = []
    if with_size:
        words.append(_choose(rng, _SIZE_WORDS[SIZES[obj.size]]))
    if with_colour:
        words.append(_choose(rng, COLOUR_WORDS[COLOURS[obj.colour]]))
    words.append(_choose(rng, SHAPE_WORDS[SHAPES[obj.shape]]) if with_shape
                 else _choose(rng, ("shape", "object", "thing")))
    phrase = " ".join(words)
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _single_caption(rng, obj: _Object, background: int, grey: bool) -> str:
    # Like people, captions name the object's shape almost always and its colour, size and
    # position only some of the time; this is also what makes "a {shape}" prompts meaningful.
    with_shape = grey or rng.random() < 0.9
    with_colour = not grey and (not with_shape or rng.random() < 0.5)
    with_size = rng.random() < 0.5
    with_pos = rng.random() < 0.6
    np_ = _noun_phrase(rng, obj, with_size, with_colour, with_shape)
    pos = _choose(rng, _POSITION_WORDS[POSITIONS[obj.position]]) if with_pos else ""
    template = int(rng.integers(5 if with_colour and with_shape else 4))
    if template == 0:
        text = f"{np_} {pos}"
    elif template == 1:
        text = f"there is {np_} {pos}"
    elif template == 2:
        text = f"{pos}, {np_}" if pos else np_
    elif template == 3:
        text = f"a picture of {np_} {pos}"
    else:  # colour after the noun
        size_word = _choose(rng, _SIZE_WORDS[SIZES[obj.size]]) + " " if with_size else ""
        noun = _choose(rng, SHAPE_WORDS[SHAPES[obj.shape]])
        colour = _choose(rng, COLOUR_WORDS[COLOURS[obj.colour]])
        article = "an" if (size_word or noun)[0] in "aeiou" else "a"
        text = f"{article} {size_word}{noun} coloured {colour} {pos}"
    if rng.random() < 0.3:
        text = f"{text.strip()} on {_choose(rng, _BACKGROUND_WORDS[BACKGROUNDS[background]])} background"
    return " ".join(text.split())


def _grey_caption(rng, text: str) -> str:
    """Black-and-white photos say so about half of the time."""
    if rng.random() < 0.5:
        return f"{_choose(rng, _GREY_WORDS)} {text}"
    return text


def _pair_caption(rng, a: _Object, b: _Object, grey: bool) -> str:
    with_size, with_colour = rng.random() < 0.4, not grey and rng.random() < 0.7
    pa = _noun_phrase(rng, a, with_size, with_colour)
    pb = _noun_phrase(rng, b, with_size, with_colour)
    template = int(rng.integers(3))
    if template == 0:
        text = f"{pa} and {pb}"
    elif template == 1:
        text = (f"{pa} {_choose(rng, _POSITION_WORDS[POSITIONS[a.position]])} and "
                f"{pb} {_choose(rng, _POSITION_WORDS[POSITIONS[b.position]])}")
    else:
        dx, dy = b.cx - a.cx, b.cy - a.cy
        if abs(dx) >= abs(dy):
            rel = "to the left of" if dx > 0 else "to the right of"
        else:
            rel = "above" if dy > 0 else "below"
        text = f"{pa} {rel} {pb}"
    if rng.random() < 0.5:
        text = "two shapes: " + text
    return " ".join(text.split())


# ----------------------------------------------------------------------------- zero-shot prompts


def _with_article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


# Zero-shot prompts for each label field: class phrases (indexed by the label) and templates,
# worded exactly as single-object captions are, so every prompt is a caption this world can
# produce (a model trained on it has seen no other wording). Captions name a colour-free object
# only by its shape, so size and position prompts are ensembled over the eight shapes; a
# colour comes with its article ("an orange") because captions say "an orange shape".
PROMPTS = {
    "shape": (SHAPES, ("a {}", "there is a {}", "a picture of a {}")),
    "colour": (tuple(_with_article(c) for c in COLOURS),
               tuple(f"{lead}{{}} {noun}" for lead in ("", "there is ", "a picture of ")
                     for noun in ("shape", "object", "thing"))),
    "size": (SIZES, tuple(f"{lead}a {{}} {shape}" for lead in ("", "there is ", "a picture of ")
                          for shape in SHAPES)),
    "position": (tuple(_POSITION_WORDS[p][0] for p in POSITIONS),
                 tuple(t.format(shape=_with_article(shape)) for shape in SHAPES
                       for t in ("{shape} {{}}", "there is {shape} {{}}", "{{}}, {shape}",
                                 "a picture of {shape} {{}}"))),
}
CLASS_NAMES = {label: names for label, (names, _) in PROMPTS.items()}
PROMPT_TEMPLATES = {label: templates for label, (_, templates) in PROMPTS.items()}


# ----------------------------------------------------------------------------- the world


class SyntheticWorld:
    """A grain random-access source of (image, caption, labels) records, deterministic per index.

    Args:
      split: one of SPLITS.
      num_records: the length this source reports (records are generated on demand, so any
        length costs nothing).
      image_size: side of the square RGB image in pixels.
      seed: the world seed; records differ between seeds and between splits.
      two_object_prob: probability that a train/val image shows two objects.
      grey_prob: probability that a train/val image is a black-and-white photo; its caption
        never names colours. Shape is then the only cue, which teaches colour-invariant shape
        features (the held-out colour-shape pairings depend on them).
      backgrounds: the background kinds drawn from (names from BACKGROUNDS); default all. A
        world of plain backgrounds leaves the objects as the only content of an image.
      positions: the positions a single object is placed at (names from POSITIONS); default
        all nine.
    """

    class_names = CLASS_NAMES
    prompt_templates = PROMPT_TEMPLATES

    def __init__(self, split: str = "train", num_records: int = 10_000_000, image_size: int = 32,
                 seed: int = 0, two_object_prob: float = 0.3, grey_prob: float = 0.15,
                 backgrounds=BACKGROUNDS, positions=POSITIONS):
        if split not in SPLITS:
            raise ValueError(f"unknown synthetic split {split!r}; choose one of {sorted(SPLITS)}")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
        self.split = split
        self.num_records = int(num_records)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.two_object_prob = float(two_object_prob)
        self.grey_prob = float(grey_prob)
        unknown = [b for b in backgrounds if b not in BACKGROUNDS]
        if unknown or not backgrounds:
            raise ValueError(f"backgrounds must be a non-empty list of {list(BACKGROUNDS)}, got "
                             f"{list(backgrounds)}")
        self._backgrounds = [BACKGROUNDS.index(b) for b in backgrounds]
        unknown = [p for p in positions if p not in POSITIONS]
        if unknown or not positions:
            raise ValueError(f"positions must be a non-empty list of {list(POSITIONS)}, got "
                             f"{list(positions)}")
        self._positions = [POSITIONS.index(p) for p in positions]
        heldout = set(HELDOUT_COMBOS)
        all_combos = [(s, c) for s in range(len(SHAPES)) for c in range(len(COLOURS))]
        self._combos = (list(HELDOUT_COMBOS) if split == "heldout_combos"
                        else [sc for sc in all_combos if sc not in heldout])

    def __len__(self) -> int:
        return self.num_records

    def __repr__(self) -> str:
        return (f"SyntheticWorld(split={self.split!r}, num_records={self.num_records}, "
                f"image_size={self.image_size}, seed={self.seed})")

    def _place(self, rng, size: int, position: int) -> _Object:
        n = self.image_size
        radius = n * rng.uniform(*_SIZE_RADIUS[size])
        row, col = divmod(position, 3)
        jitter = n / 12
        cx = np.clip((col + 0.5) * n / 3 + rng.uniform(-jitter, jitter), radius, n - radius)
        cy = np.clip((row + 0.5) * n / 3 + rng.uniform(-jitter, jitter), radius, n - radius)
        return _Object(0, 0, size, position, float(cx), float(cy), float(radius))

    def _sample_object(self, rng, exclude_position: int | None = None,
                       max_size: int = 2) -> _Object:
        shape, colour = self._combos[int(rng.integers(len(self._combos)))]
        positions = ([p for p in range(9) if p != exclude_position]
                     if exclude_position is not None else self._positions)
        position = positions[int(rng.integers(len(positions)))]
        obj = self._place(rng, int(rng.integers(max_size + 1)), position)
        return dataclasses.replace(obj, shape=shape, colour=colour)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_records:
            raise IndexError(f"index {index} out of range for {self!r}")
        rng = np.random.default_rng((self.seed, SPLITS[self.split], int(index)))
        background = self._backgrounds[int(rng.integers(len(self._backgrounds)))]
        heldout = self.split == "heldout_combos"
        two = not heldout and rng.random() < self.two_object_prob
        grey = not heldout and rng.random() < self.grey_prob
        if not two:
            objects = [self._sample_object(rng)]
            caption = _single_caption(rng, objects[0], background, grey)
        else:
            a = self._sample_object(rng, max_size=1)
            for _ in range(20):  # rejection-sample a second object that does not overlap
                b = self._sample_object(rng, exclude_position=a.position, max_size=1)
                if np.hypot(a.cx - b.cx, a.cy - b.cy) > a.radius + b.radius + 1:
                    break
            objects = [a, b]
            caption = _pair_caption(rng, a, b, grey)
        image = _render(rng, objects, background, self.image_size, grey)
        if grey:
            image = np.repeat(image @ _LUMA, 3, axis=-1).astype(np.uint8)
            caption = _grey_caption(rng, caption)
        first = objects[0]
        second = objects[1] if two else None
        return {
            "image": image,
            "caption": caption,
            "shape": np.int32(first.shape),
            "colour": np.int32(first.colour),
            "size": np.int32(first.size),
            "position": np.int32(first.position),
            "background": np.int32(background),
            "num_objects": np.int32(len(objects)),
            "grey": np.int32(grey),
            "shape_2": np.int32(second.shape if second else -1),
            "colour_2": np.int32(second.colour if second else -1),
        }

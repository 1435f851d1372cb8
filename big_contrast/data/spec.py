"""What an objective asks the input pipeline for: image views, captions, labels."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple


@dataclasses.dataclass(frozen=True)
class ImageView:
    """One augmented view (crop) of the record's image.

    Per crop, in this order (the SimCLR / BYOL / SwAV recipe):
      random resized crop -> horizontal flip -> colour jitter -> grayscale -> blur -> solarize.
    Every operation is off by default, so ``ImageView(size)`` is the whole image resized.

    size: the crop's side in pixels.
    crop_scale: area fraction range of a random-resized crop; (1, 1) keeps the whole image.
    flip: random horizontal flips (leave off when captions name left and right).
    colour_jitter: strength s of torchvision-style ColorJitter: brightness, contrast and
      saturation factors drawn from [max(0, 1 - 0.8s), 1 + 0.8s], a hue shift from
      [-0.2s, 0.2s] turns, the four applied in a random order; 0 turns it off (SimCLR: s=1 on
      ImageNet, 0.5 on CIFAR).
    hue_jitter: the largest hue shift in turns (at most 0.5: any hue), instead of 0.2 s; e.g. to
      take colour away from the features of a world whose objects differ mostly by hue.
    jitter_prob: probability of applying the colour jitter (when colour_jitter > 0).
    grayscale_prob: probability of replacing the crop by its luma (ITU-R 601) in all channels.
    blur_prob: probability of a Gaussian blur.
    blur_sigma: range of the blur's standard deviation in pixels *of a 224-pixel crop*; it is
      scaled by size / 224, so a 96-pixel crop blurs with sigma * 96 / 224 pixels and a 32-pixel
      crop with at most 0.29 pixels at the default (0.1, 2.0).
    solarize_prob: probability of inverting every pixel value >= 128 (v -> 255 - v).
    """

    size: int
    crop_scale: tuple[float, float] = (1.0, 1.0)
    flip: bool = False
    colour_jitter: float = 0.0
    hue_jitter: float | None = None
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.0
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.0

    def __post_init__(self):
        for name in ("jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"ImageView.{name} must be a probability in [0, 1], got {p}")
        if not 0.0 <= self.colour_jitter <= 2.5:  # the hue shift 0.2 s must stay <= 0.5 turns
            raise ValueError(f"ImageView.colour_jitter must be in [0, 2.5], got "
                             f"{self.colour_jitter}")
        if self.hue_jitter is not None and not 0.0 <= self.hue_jitter <= 0.5:
            raise ValueError(f"ImageView.hue_jitter must be in [0, 0.5] turns, got "
                             f"{self.hue_jitter}")
        sigma = tuple(float(s) for s in self.blur_sigma)
        if len(sigma) != 2 or not 0.0 < sigma[0] <= sigma[1]:
            raise ValueError(f"ImageView.blur_sigma must be (low, high) with 0 < low <= high, "
                             f"got {self.blur_sigma}")
        object.__setattr__(self, "blur_sigma", sigma)


class ImageGroup(NamedTuple):
    """The views of one resolution, stored under one batch key.

    key: 'image' for a single-view spec, else f'crops_{size}'.
    size: the side of every view in the group.
    num_views: how many of the spec's views have this size (spec order within the group).
    """

    key: str
    size: int
    num_views: int

    @property
    def example_shape(self) -> tuple[int, ...]:
        """One example's array shape (uint8): [size, size, 3] under 'image', else
        [num_views, size, size, 3]."""
        if self.key == "image":
            return (self.size, self.size, 3)
        return (self.num_views, self.size, self.size, 3)


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """The fields a training batch must carry.

    views: image views. One view is stored under 'image' (uint8 [B, H, W, 3]). Several views
      are grouped by size, in order of first appearance; each group is one key
      f'crops_{size}' holding uint8 [B, num_views_of_that_size, size, size, 3] (views in spec
      order), so a multi-crop objective (SwAV: 2 x 224 + 6 x 96) runs each resolution through
      its backbone once. ``image_groups()`` lists the keys.
    text: tokenized captions under 'text' (int32 [B, max_len]).
    labels: integer label fields copied from the record (e.g. ('shape',)).
    """

    views: tuple[ImageView, ...]
    text: bool = False
    labels: tuple[str, ...] = ()

    def image_groups(self) -> tuple[ImageGroup, ...]:
        """(key, size, num_views) per batch key holding images, in order of first appearance."""
        if len(self.views) == 1:
            return (ImageGroup("image", self.views[0].size, 1),)
        counts: dict[int, int] = {}
        for view in self.views:
            counts[view.size] = counts.get(view.size, 0) + 1
        return tuple(ImageGroup(f"crops_{size}", size, n) for size, n in counts.items())

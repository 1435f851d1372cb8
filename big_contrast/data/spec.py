"""What an objective asks the input pipeline for: image views, captions, labels."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ImageView:
    """One augmented view of the record's image.

    crop_scale: area fraction range of a random-resized crop; (1, 1) keeps the whole image.
    flip: random horizontal flips (leave off when captions name left and right).
    """

    size: int
    crop_scale: tuple[float, float] = (1.0, 1.0)
    flip: bool = False


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """The fields a training batch must carry.

    views: image views; one view is stored under 'image', several under 'image_0', 'image_1', ...
      (multi-crop objectives such as SwAV ask for several sizes).
    text: tokenized captions under 'text' (int32 [B, max_len]).
    labels: integer label fields copied from the record (e.g. ('shape',)).
    """

    views: tuple[ImageView, ...]
    text: bool = False
    labels: tuple[str, ...] = ()

    def image_keys(self) -> tuple[str, ...]:
        if len(self.views) == 1:
            return ("image",)
        return tuple(f"image_{i}" for i in range(len(self.views)))

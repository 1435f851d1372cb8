"""Photometric augmentations of SimCLR / BYOL / SwAV on uint8 RGB crops [H, W, 3].

Pure numpy functions (picklable, no state) that each take and return a uint8 array; the random
ones take a np.random.Generator and draw only from it. They are vectorised for small crops: a
multi-crop recipe runs them for every crop of every image on the host CPUs.
"""

from __future__ import annotations

import math

import numpy as np

# ITU-R 601 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
# HSV -> RGB: channel c = v - (max - min) * clip(min(k, 4 - k), 0, 1), k = (n_c + hue*6) mod 6.
_HUE_OFFSETS = np.array([[5.0], [3.0], [1.0]], np.float32)

# The colour jitter works on planar float32 pixels [3, H*W]: on crops this small numpy's cost
# is per call, and reductions and broadcasts over a last axis of 3 are several times slower
# than over contiguous planes (measured: the HSV hue shift takes 37 instead of 53 us at 32 px).


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """Rounds float pixel values to the nearest uint8, clipping to [0, 255]."""
    x = x + np.float32(0.5)
    np.minimum(x, np.float32(255.0), out=x)
    np.maximum(x, np.float32(0.0), out=x)
    return x.astype(np.uint8)


def _luma(planes: np.ndarray) -> np.ndarray:
    """The ITU-R 601 luma of planar RGB [3, ...], elementwise: a matrix product would start
    BLAS threads in every grain worker."""
    return _LUMA[0] * planes[0] + _LUMA[1] * planes[1] + _LUMA[2] * planes[2]


def _clip(x: np.ndarray) -> np.ndarray:
    """Clips float pixel values to [0, 255] in place (np.clip is slower on small arrays)."""
    np.minimum(x, np.float32(255.0), out=x)
    return np.maximum(x, np.float32(0.0), out=x)


def _shift_hue(planes: np.ndarray, shift: float) -> np.ndarray:
    """Rotates the hue of planar float RGB pixels [3, N] by ``shift`` turns, keeping the HSV
    value (max) and the max - min spread, so saturation too."""
    r, g, b = planes
    maxc = np.maximum(np.maximum(r, g), b)
    delta = maxc - np.minimum(np.minimum(r, g), b)
    inv = np.float32(1.0) / np.maximum(delta, np.float32(1e-6))  # any hue will do for greys
    # The hue in sextants (units of 60 degrees), in [-1, 5).
    hue = np.where(maxc == r, (g - b) * inv,
                   np.where(maxc == g, (b - r) * inv + np.float32(2.0),
                            (r - g) * inv + np.float32(4.0)))
    k = hue + (_HUE_OFFSETS + np.float32(6.0 * shift))
    k -= np.float32(6.0) * np.floor(k * np.float32(1.0 / 6.0))  # k mod 6 (np.mod is slower)
    ramp = np.minimum(k, np.float32(4.0) - k)
    np.minimum(ramp, np.float32(1.0), out=ramp)
    np.maximum(ramp, np.float32(0.0), out=ramp)
    ramp *= delta
    return np.subtract(maxc, ramp, out=ramp)


def shift_hue(image: np.ndarray, shift: float) -> np.ndarray:
    """``image`` (uint8 [H, W, 3]) with its HSV hue rotated by ``shift`` turns."""
    planes = np.ascontiguousarray(image.reshape(-1, 3).T, dtype=np.float32)
    return np.ascontiguousarray(_to_uint8(_shift_hue(planes, shift)).T).reshape(image.shape)


def colour_jitter(image: np.ndarray, rng: np.random.Generator, brightness: float = 0.0,
                  contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0) -> np.ndarray:
    """torchvision's ColorJitter: factors for brightness, contrast and saturation drawn from
    [max(0, 1 - x), 1 + x], a hue shift from [-hue, hue] turns (hue <= 0.5), applied in a
    random order. Brightness scales the pixels, contrast blends with the mean luma, saturation
    with each pixel's luma, hue rotates in HSV; each step clips to [0, 255] in float32, rounded
    to uint8 once at the end. Always draws a permutation and four uniforms; a zero amount
    leaves its step out.
    """
    order = rng.permutation(4).tolist()
    u = rng.random(4).tolist()  # python floats keep the arithmetic in float32
    amounts = (brightness, contrast, saturation)
    factors = [max(1.0 + a * (2.0 * ui - 1.0), 0.0) if a > 0 else 1.0
               for a, ui in zip(amounts, u)]
    hue_shift = hue * (2.0 * u[3] - 1.0)
    if all(f == 1.0 for f in factors) and hue_shift == 0.0:
        return image
    x = np.ascontiguousarray(image.reshape(-1, 3).T, dtype=np.float32)  # [3, H*W]
    for op in order:
        if op == 3:
            if hue_shift != 0.0:
                x = _shift_hue(x, hue_shift)  # stays within [0, 255]
            continue
        f = factors[op]
        if f == 1.0:
            continue
        if op == 0:  # brightness: blend with black
            x *= np.float32(f)
        elif op == 1:  # contrast: blend with the mean grey level
            mean = np.float32(float(_luma(x.sum(axis=1))) / x.shape[1])
            x -= mean
            x *= np.float32(f)
            x += mean
        else:  # saturation: blend with each pixel's grey level
            grey = _luma(x)
            x -= grey
            x *= np.float32(f)
            x += grey
        _clip(x)
    return np.ascontiguousarray(_to_uint8(x).T).reshape(image.shape)


def grayscale(image: np.ndarray) -> np.ndarray:
    """The luma (ITU-R 601) repeated in all three channels."""
    planes = np.moveaxis(image, -1, 0).astype(np.float32)
    grey = _to_uint8(_luma(planes))
    return np.repeat(grey[..., None], 3, axis=-1)


def _gaussian_taps(sigma: float) -> np.ndarray:
    """The normalised Gaussian of std ``sigma`` sampled at integer offsets, truncated at
    3 sigma: [2 * radius + 1] float32."""
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    return (weights / weights.sum()).astype(np.float32)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with standard deviation ``sigma`` pixels (reflected borders,
    edge pixel not repeated); a constant image stays constant. Elementwise sums over the
    taps, not matrix products: no BLAS threads, which in every grain worker of a busy host
    made the blur ten times slower."""
    h, w = image.shape[:2]
    if sigma <= 0 or h < 2 or w < 2:
        return image
    taps = _gaussian_taps(sigma)
    radius = len(taps) // 2
    x = np.pad(image.astype(np.float32), ((radius, radius), (0, 0), (0, 0)), mode="reflect")
    x = sum(weight * x[k:k + h] for k, weight in enumerate(taps))
    x = np.pad(x, ((0, 0), (radius, radius), (0, 0)), mode="reflect")
    x = sum(weight * x[:, k:k + w] for k, weight in enumerate(taps))
    return _to_uint8(x)


def solarize(image: np.ndarray, threshold: int = 128) -> np.ndarray:
    """Inverts (v -> 255 - v) every pixel value >= threshold."""
    return np.where(image >= threshold, 255 - image, image)

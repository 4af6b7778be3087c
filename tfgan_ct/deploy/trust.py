"""Figures that let a radiologist judge a derived (x4 super-resolved) CT image.

- LR consistency: the derived image [4h, 4w] in HU, downscaled x4 with the
  project's MATLAB bicubic (`tfgan_ct.data.resize.downscale`, the same operator
  that made the training inputs), against the source [h, w] in HU, inside the
  brain mask. A model that only adds plausible detail keeps this small (a few
  HU); one that invents structures does not, since they survive the downscale.
- Flip spread: the per-pixel standard deviation of the outputs over the eight
  flips/rotations of the input (the dihedral group D4). The network is not
  equivariant by construction, so where it disagrees with itself it is unsure.
- A one-line summary for a standard DICOM text attribute (see `summary_text`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from tfgan_ct.config import Window
from tfgan_ct.data import resize

SUMMARY_MAX_CHARS = 64   # LO value length; the text goes in ImageComments (LT), see `summary_text`


@dataclass(frozen=True)
class LrConsistency:
    """Absolute difference, in HU, between the downscaled derived image and its source.

    `pixels` is the number of source pixels compared; when it is 0 (an empty
    mask, e.g. a slice above the brain) `mean_hu` and `max_hu` are NaN.
    """

    mean_hu: float
    max_hu: float
    pixels: int

    @property
    def empty(self) -> bool:
        """Whether no pixel was compared (the figures are NaN then)."""
        return self.pixels == 0

    def as_dict(self) -> dict:
        """{"mean_hu", "max_hu", "pixels"} for a JSON report; NaN figures become None."""
        def value(x: float) -> float | None:
            return None if math.isnan(x) else round(float(x), 3)

        return {"mean_hu": value(self.mean_hu), "max_hu": value(self.max_hu), "pixels": self.pixels}


def lr_consistency(sr_hu: np.ndarray, source_hu: np.ndarray, mask: np.ndarray | None = None,
                   scale: int = 4, window: Window | None = None) -> LrConsistency:
    """Compare the derived image, downscaled by `scale`, with its source inside `mask`.

    Args:
        sr_hu: derived image float [scale*h, scale*w] in HU.
        source_hu: source image float [h, w] in HU.
        mask: bool [h, w], the pixels to compare (the brain); None compares all of them.
        scale: the super-resolution factor.
        window: when given, both images are clipped to it first: the model only
            knows its HU window, so saturation outside it is not counted.

    Returns:
        LrConsistency; NaN figures and 0 pixels when the mask is empty.
    """
    sr_hu = np.asarray(sr_hu, dtype=np.float64)
    source_hu = np.asarray(source_hu, dtype=np.float64)
    expected = (source_hu.shape[0] * scale, source_hu.shape[1] * scale)
    if source_hu.ndim != 2 or sr_hu.shape != expected:
        raise ValueError(f"derived image of shape {sr_hu.shape} is not x{scale} of the source {source_hu.shape}")
    if mask is None:
        mask = np.ones(source_hu.shape, bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != source_hu.shape:
        raise ValueError(f"mask of shape {mask.shape} does not match the source {source_hu.shape}")
    if window is not None:
        low, high = window.floor, window.floor + window.width
        sr_hu, source_hu = np.clip(sr_hu, low, high), np.clip(source_hu, low, high)
    count = int(mask.sum())
    if count == 0:
        return LrConsistency(math.nan, math.nan, 0)
    diff = np.abs(resize.downscale(sr_hu, scale) - source_hu)[mask]
    return LrConsistency(float(diff.mean()), float(diff.max()), count)


def combine(parts: Iterable[LrConsistency]) -> LrConsistency:
    """One figure for several slices: the pixel-weighted mean and the largest maximum.

    Empty slices are left out; all empty (or none) gives NaN figures and 0 pixels.
    """
    parts = [p for p in parts if not p.empty]
    count = sum(p.pixels for p in parts)
    if not count:
        return LrConsistency(math.nan, math.nan, 0)
    return LrConsistency(sum(p.mean_hu * p.pixels for p in parts) / count, max(p.max_hu for p in parts), count)


def _dihedral(k: int, flip: bool) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]:
    """(forward, inverse) of one of the eight flips/rotations of a 2-D image: rotate by k*90 degrees
    after an optional left-right flip."""
    def forward(x: np.ndarray) -> np.ndarray:
        return np.rot90(np.fliplr(x) if flip else x, k)

    def inverse(y: np.ndarray) -> np.ndarray:
        y = np.rot90(y, -k)
        return np.fliplr(y) if flip else y

    return forward, inverse


TRANSFORMS = tuple(_dihedral(k, flip) for flip in (False, True) for k in range(4))


def flip_spread(predict: Callable[[np.ndarray], np.ndarray], unit_lr: np.ndarray,
                identity: np.ndarray | None = None) -> np.ndarray:
    """Per-pixel standard deviation of `predict` over the eight flips/rotations of its input.

    Args:
        predict: LR float32 [h, w] in [0, 1] -> SR float32 [s*h, s*w] in [0, 1] (any
            image shape: rotations swap h and w), e.g.
            ``lambda x: inference.upscale_image(method, x, tile, pad)``.
        unit_lr: the LR image, float32 [h, w] in [0, 1].
        identity: `predict(unit_lr)` when the caller has it already (the upscaled image
            itself); it is then not computed again, and 7 predictions are made, not 8.

    Returns:
        float32 [s*h, s*w], in the units of `predict`'s output ([0, 1]); 0 where
        the model is equivariant. `spread_hu` turns it into HU.
    """
    unit_lr = np.asarray(unit_lr, dtype=np.float32)
    if unit_lr.ndim != 2:
        raise ValueError(f"expected one [h, w] image, got shape {unit_lr.shape}")
    outputs = [inverse(np.asarray(identity if n == 0 and identity is not None
                                  else predict(np.ascontiguousarray(forward(unit_lr))), dtype=np.float64))
               for n, (forward, inverse) in enumerate(TRANSFORMS)]  # TRANSFORMS[0] is the identity
    shapes = {o.shape for o in outputs}
    if len(shapes) != 1:
        raise ValueError(f"the outputs of the flipped inputs do not align (shapes {sorted(shapes)})")
    return np.std(np.stack(outputs), axis=0).astype(np.float32)


def spread_hu(spread: np.ndarray, window: Window) -> np.ndarray:
    """A spread in [0, 1] units of `window` (from `flip_spread`) in HU: float32, same shape."""
    return (np.asarray(spread, dtype=np.float32) * np.float32(window.width)).astype(np.float32)


def _figure(x: float) -> str:
    """A HU figure short enough for one line: one decimal below 100, none above."""
    return f"{x:.1f}" if abs(x) < 100 else f"{x:.0f}"


def summary_text(consistency: LrConsistency, region: str = "brain") -> str:
    """One line for a standard text attribute, e.g. "LR consistency mean 1.2 HU, max 9.8 HU (brain)".

    Meant for ImageComments (0020,4000), VR LT; kept within 64 characters
    (SUMMARY_MAX_CHARS, the LO limit) so it also fits an LO such as
    SeriesDescription and shows whole in a viewer's one-line fields. An empty
    region gives "LR consistency: no brain pixels".
    """
    if consistency.empty:
        text = f"LR consistency: no {region} pixels"
    else:
        text = (f"LR consistency mean {_figure(consistency.mean_hu)} HU, "
                f"max {_figure(consistency.max_hu)} HU ({region})")
    if len(text) > SUMMARY_MAX_CHARS:
        raise ValueError(f"summary {text!r} is longer than {SUMMARY_MAX_CHARS} characters (shorter region name?)")
    return text

"""Brain mask of one axial slice: HU threshold, then morphology.

threshold in the modality's brain HU range -> opening (cuts thin bridges
through the skull base) -> largest connected component -> fill holes (takes
ventricles and contrast-filled vessels back in) -> a small dilation.
"""
from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

from tfgan_ct.config import MaskSettings

REFERENCE_SIZE = 512  # the morphology radii are given for 512-pixel slices


@functools.lru_cache(maxsize=16)
def disk(radius: int) -> np.ndarray:
    """Boolean disk structuring element of `radius` pixels (radius 0: a single pixel)."""
    r = max(int(radius), 0)
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    return (x * x + y * y) <= r * r


def scaled_radius(radius: int, size: int) -> int:
    """`radius` (given for 512-pixel slices) scaled to a slice of `size` pixels."""
    return int(round(radius * size / REFERENCE_SIZE))


def brain_mask(hu: np.ndarray, hu_range: tuple[float, float], settings: MaskSettings) -> np.ndarray:
    """Mask (bool, H x W) of the brain in slice `hu` (HU, H x W).

    Returns all-False when nothing in the slice falls in `hu_range`.
    """
    low, high = hu_range
    mask = (hu >= low) & (hu <= high)
    size = max(hu.shape)
    opening = scaled_radius(settings.opening_radius, size)
    if opening > 0:
        mask = ndimage.binary_opening(mask, structure=disk(opening))
    mask = largest_component(mask)
    if settings.fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    dilation = scaled_radius(settings.dilation_radius, size)
    if dilation > 0 and mask.any():
        mask = ndimage.binary_dilation(mask, structure=disk(dilation))
    return mask


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (empty stays empty)."""
    labels, count = ndimage.label(mask)
    if count <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def apply_mask(hu: np.ndarray, mask: np.ndarray, floor_hu: float) -> np.ndarray:
    """Copy of `hu` with pixels outside `mask` set to the window floor `floor_hu` (HU)."""
    out = np.where(mask, hu, np.float32(floor_hu))
    return out.astype(np.float32, copy=False)

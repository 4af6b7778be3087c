"""Brain mask of one axial slice: HU threshold, then morphology.

threshold in the modality's brain HU range -> opening (cuts thin bridges
through the skull base) -> largest connected component -> fill holes (takes
ventricles and contrast-filled vessels back in) -> a small dilation.

Structuring elements are diamonds (city-block balls) of the given radius,
applied as repeated 3x3-cross steps with array shifts; for radius 1 and 2
these are exactly the digital disks. Connectivity is 4-neighbour throughout.
The work is done on the bounding box of the thresholded pixels, and after the
largest component is found, on that component's bounding box (timings in
docs/benchmarks.md).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from tfgan_ct.config import MaskSettings

REFERENCE_SIZE = 512  # the morphology radii are given for 512-pixel slices


def scaled_radius(radius: int, size: int) -> int:
    """`radius` (given for 512-pixel slices) scaled to a slice of `size` pixels."""
    return int(round(radius * size / REFERENCE_SIZE))


def brain_mask(hu: np.ndarray, hu_range: tuple[float, float], settings: MaskSettings) -> np.ndarray:
    """Mask (bool, H x W) of the brain in slice `hu` (HU, H x W).

    Returns all-False when nothing in the slice falls in `hu_range`.
    """
    low, high = hu_range
    full = (hu >= low) & (hu <= high)
    out = np.zeros_like(full)
    box = _bounding_box(full)
    if box is None:
        return out
    size = max(hu.shape)
    opening = scaled_radius(settings.opening_radius, size)
    dilation = scaled_radius(settings.dilation_radius, size)
    # Work on the bounding box of the thresholded pixels, with room for the final
    # dilation (the opening never grows the mask).
    crop = _grow(box, dilation + 1, hu.shape)
    mask = full[crop]
    if opening > 0:
        mask = dilate(erode(mask, opening), opening)
    labels, count = ndimage.label(mask)
    if count == 0:
        return out
    # The largest component, and from here on only its bounding box: its holes lie
    # inside the box, and the dilation reaches `dilation` pixels beyond it. Both give
    # the same result as on the whole crop, on far fewer pixels.
    biggest = 1 if count == 1 else int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    component = labels == biggest
    inner = _bounding_box(component)  # (ndimage.find_objects is slower than this)
    component = component[inner]
    if settings.fill_holes:
        component = fill_holes(component)
    y0, x0 = crop[0].start + inner[0].start, crop[1].start + inner[1].start
    out[y0:y0 + component.shape[0], x0:x0 + component.shape[1]] = component
    if dilation > 0:
        box = (slice(y0, y0 + component.shape[0]), slice(x0, x0 + component.shape[1]))
        region = _grow(box, dilation, hu.shape)
        out[region] = dilate(out[region], dilation)
    return out


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice] | None:
    """Smallest (rows, columns) slices holding every True pixel; None if there is none."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _grow(box: tuple[slice, slice], margin: int, shape: tuple[int, int]) -> tuple[slice, slice]:
    """`box` grown by `margin` pixels on every side, within an array of `shape`."""
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, shape))


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion by a diamond of `radius`; pixels beyond the border count as False."""
    for _ in range(radius):
        m = mask
        mask = m.copy()
        mask[1:] &= m[:-1]
        mask[:-1] &= m[1:]
        mask[:, 1:] &= m[:, :-1]
        mask[:, :-1] &= m[:, 1:]
        mask[0] = mask[-1] = False
        mask[:, 0] = mask[:, -1] = False
    return mask


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a diamond of `radius` (within the array)."""
    for _ in range(radius):
        m = mask
        mask = m.copy()
        mask[1:] |= m[:-1]
        mask[:-1] |= m[1:]
        mask[:, 1:] |= m[:, :-1]
        mask[:, :-1] |= m[:, 1:]
    return mask


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (empty stays empty)."""
    labels, count = ndimage.label(mask)
    if count <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions not 4-connected to the border (as scipy's binary_fill_holes).

    The mask is framed by a ring of background, so everything connected to the
    border is one background component, the one holding the corner: label 1.
    """
    framed = np.ones((mask.shape[0] + 2, mask.shape[1] + 2), bool)
    framed[1:-1, 1:-1] = ~mask
    labels, _ = ndimage.label(framed)
    return labels[1:-1, 1:-1] != 1


def apply_mask(hu: np.ndarray, mask: np.ndarray, floor_hu: float) -> np.ndarray:
    """Copy of `hu` with pixels outside `mask` set to the window floor `floor_hu` (HU)."""
    out = np.where(mask, hu, np.float32(floor_hu))
    return out.astype(np.float32, copy=False)

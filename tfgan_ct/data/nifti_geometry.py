"""How slices come out of a NIfTI volume: acquisition plane, DICOM orientation, slice order.

A NIfTI affine maps storage indices (i, j, k) to RAS+ millimetres; DICOM images are
[row, column] in LPS. `orientation` finds, from the affine alone (so any storage
order, flip or obliquity gives the same slices):

- the slice axis: the storage axis whose voxel size differs from the other two (CT
  pixels are square; this also holds for overlapping reconstructions whose slices
  are closer than the pixels), else the coarsest when all three differ, else (cubic
  voxels) the one nearest the head-foot axis; a one-voxel axis is always the slice axis;
- the plane: axial, coronal or sagittal by the largest component of the slice normal,
  and from it the image directions a DICOM series of that plane has (axial: columns
  toward the patient's left, rows toward posterior, as ImageOrientationPatient
  1\\0\\0\\0\\1\\0; coronal: columns left, rows inferior; sagittal: columns posterior,
  rows inferior);
- which in-plane axis becomes the rows and which the columns (the pairing closest to
  those directions; a tilted or rotated plane is followed, never rejected), and
  whether each is flipped;
- each slice's position along the normal cross(column direction, row direction), as
  DICOM slices are ordered.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tfgan_ct.data.dicom_files import Unusable

LPS = np.diag([-1.0, -1.0, 1.0])  # RAS+ <-> LPS (its own inverse)

# Plane (index of the slice normal's largest LPS component) -> (column, row) directions, LPS.
_TARGETS = {
    2: ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),    # axial
    1: ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),   # coronal
    0: ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),   # sagittal
}
_SAME = 0.01  # voxel sizes within 1 % of each other count as equal


@dataclass(frozen=True)
class Orientation:
    """Where the slices of a volume lie in its storage axes (0, 1, 2)."""

    slice_axis: int
    row_axis: int           # storage axis along the image rows (down the image)
    col_axis: int           # storage axis along the image columns (across the image)
    flip_rows: bool         # the image's first row is the last storage index
    flip_cols: bool
    row_spacing: float      # mm between rows (DICOM PixelSpacing[0])
    col_spacing: float      # mm between columns (PixelSpacing[1])
    slice_spacing: float    # mm between slices along the normal
    first: float            # position (mm along the normal) of storage slice 0
    step: float             # position change per storage slice (negative: stored top down)

    def to_image(self, plane: np.ndarray) -> np.ndarray:
        """A storage plane (its two axes in storage order) as the image [rows, columns] (a view)."""
        image = plane if self.row_axis < self.col_axis else plane.T
        return image[::-1 if self.flip_rows else 1, ::-1 if self.flip_cols else 1]

    def to_storage(self, image: np.ndarray) -> np.ndarray:
        """The inverse of `to_image`: an image [rows, columns] as a storage plane (a view)."""
        plane = image[::-1 if self.flip_rows else 1, ::-1 if self.flip_cols else 1]
        return plane if self.row_axis < self.col_axis else plane.T


def orientation(affine, shape: tuple[int, int, int]) -> Orientation:
    """The Orientation of a volume of spatial `shape` with RAS+ `affine` (4x4); Unusable
    ("bad-header") when the affine is not finite, singular, or has its slice axis in the plane."""
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise Unusable("bad-header", "the affine (qform/sform) is not finite")
    lps = LPS @ affine[:3, :3]  # columns: the storage axes' steps in LPS mm
    spacing = np.linalg.norm(lps, axis=0)
    if spacing.min() <= 1e-6 or abs(np.linalg.det(lps)) <= 1e-9 * float(np.prod(spacing)):
        raise Unusable("bad-header", f"the affine is singular (voxel size {', '.join(f'{v:g}' for v in spacing)})")
    dirs = lps / spacing
    s = _slice_axis(spacing, dirs, shape)
    a, b = (i for i in range(3) if i != s)
    normal = np.cross(dirs[:, a], dirs[:, b])
    plane = max((2, 1, 0), key=lambda i: abs(normal[i]))  # ties: axial first
    col_t, row_t = (np.array(v) for v in _TARGETS[plane])
    keep = abs(dirs[:, a] @ col_t) + abs(dirs[:, b] @ row_t)
    swap = abs(dirs[:, b] @ col_t) + abs(dirs[:, a] @ row_t)
    col, row = (a, b) if keep >= swap else (b, a)
    flip_cols, flip_rows = bool(dirs[:, col] @ col_t < 0), bool(dirs[:, row] @ row_t < 0)
    along_col = dirs[:, col] * (-1 if flip_cols else 1)
    along_row = dirs[:, row] * (-1 if flip_rows else 1)
    unit_normal = np.cross(along_col, along_row)
    unit_normal /= np.linalg.norm(unit_normal)
    step = float(lps[:, s] @ unit_normal)
    if abs(step) <= 1e-6 * spacing[s]:
        raise Unusable("bad-header", "the affine puts the slice axis in the image plane")
    corner = np.zeros(3)
    corner[row] = shape[row] - 1 if flip_rows else 0
    corner[col] = shape[col] - 1 if flip_cols else 0
    first = float((LPS @ affine[:3, 3] + lps @ corner) @ unit_normal)
    return Orientation(s, row, col, flip_rows, flip_cols, float(spacing[row]), float(spacing[col]),
                       abs(step), first, step)


def _slice_axis(spacing: np.ndarray, dirs: np.ndarray, shape: tuple[int, int, int]) -> int:
    """The storage axis across the acquisition plane (see the module docstring)."""
    single = [i for i in range(3) if shape[i] == 1]
    if len(single) == 1:
        return single[0]
    if len(single) > 1:
        raise Unusable("bad-dimensions", f"a {'x'.join(map(str, shape))} volume has no image plane")

    def same(i: int, j: int) -> bool:
        return abs(spacing[i] - spacing[j]) <= _SAME * max(spacing[i], spacing[j])

    odd = [i for i in range(3) if all(not same(i, j) for j in range(3) if j != i)
           and same(*(j for j in range(3) if j != i))]
    if len(odd) == 1:
        return odd[0]
    if same(0, 1) and same(1, 2):
        return int(np.argmax(np.abs(dirs[2])))  # cubic voxels: the axis nearest head-foot
    return int(np.argmax(spacing))


def affine_lps(affine) -> np.ndarray:
    """`affine` (RAS+) as LPS (the frame DICOM positions are in)."""
    out = np.asarray(affine, dtype=float).copy()
    out[:3] = LPS @ out[:3]
    return out


def upscaled_affine(affine, orient: Orientation, scale: int) -> np.ndarray:
    """The affine of a volume upscaled `scale` times in the plane of `orient`: in-plane voxel
    size / scale, the first voxel's centre moved to where the new first pixel's centre lies
    (by 0.5 / scale - 0.5 of an input voxel along each in-plane axis: -3/8 for x4)."""
    out = np.asarray(affine, dtype=float).copy()
    shift = 0.5 / scale - 0.5
    for axis in (orient.row_axis, orient.col_axis):
        out[:3, 3] += shift * out[:3, axis]
        out[:3, axis] /= scale
    return out

"""MATLAB-compatible bicubic resizing.

This module reproduces MATLAB's ``imresize(x, scale, 'bicubic')`` (with its
default antialiasing) so that low-resolution inputs and bicubic baselines
match the numbers published in the super-resolution literature.

Algorithm (per image dimension, following MATLAB's ``contributions``):

* Keys cubic kernel with ``a = -0.5`` and support 4 (``|x| < 2``).
* When shrinking (``scale < 1``) the kernel is widened by ``1/scale`` and
  scaled by ``scale``, i.e. ``h(x) = scale * cubic(scale * x)`` with
  support ``4 / scale`` (antialiasing).
* Output pixel ``x`` (1-based) maps to input coordinate
  ``u = x / scale + 0.5 * (1 - 1 / scale)``; the taps are
  ``left + 0 .. left + P - 1`` with ``left = floor(u - kernel_width / 2)``
  and ``P = ceil(kernel_width) + 2``.
* Weights are normalised to sum to 1 per output pixel, then out-of-range
  indices are mirrored with symmetric padding (``aux = [1:n, n:-1:1]``).
* MATLAB resizes the dimension with the smaller scale first (height first
  for equal scales); this module does the same.

Each dimension is one ``(out_len, in_len)`` weight matrix (cached), so a resize is
``W_h @ image @ W_w.T``; :func:`downscale` by an integer factor, the conversion's
hot path, applies the one kernel row over a strided view of the symmetrically
padded image instead, with the same weights.

Values are processed in float64 with no rounding or clipping, so the
functions work on Hounsfield units or ``[0, 1]`` intensities alike. Callers
that want MATLAB's behaviour on ``uint8`` images round and clip the result
themselves, e.g. with :func:`imresize_uint8` (see its note on how MATLAB
rounds ``uint8`` images between passes).
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import numpy as np
from numpy.lib.stride_tricks import as_strided

if TYPE_CHECKING:
    import scipy.sparse

_CUBIC_SUPPORT = 4.0


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic convolution kernel with ``a = -0.5`` (MATLAB's ``cubic``).

    Args:
        x: distances in input pixels, any shape.

    Returns:
        Kernel values, same shape as ``x`` (float64); zero for ``|x| > 2``.
    """
    ax = np.abs(np.asarray(x, dtype=np.float64))
    ax2, ax3 = ax * ax, ax * ax * ax
    inner = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    outer = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return inner + outer


def contributions(in_len: int, out_len: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Tap weights and 0-based source indices for one dimension, as MATLAB.

    Args:
        in_len: input length in pixels.
        out_len: output length in pixels.
        scale: output/input scale factor (``< 1`` shrinks, with antialiasing).

    Returns:
        ``(weights, indices)``, both of shape ``(out_len, taps)``; each weight
        row sums to 1, indices are mirrored into ``[0, in_len)`` and columns
        whose weights are zero for every output pixel are removed.
    """
    weights, indices = _taps(in_len, out_len, scale)
    aux = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])
    indices = aux[np.mod(indices, aux.size)]
    keep = np.any(weights != 0, axis=0)
    return weights[:, keep], indices[:, keep]


def _taps(in_len: int, out_len: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """MATLAB's normalised tap weights and 0-based source indices, before mirroring
    (indices may lie outside ``[0, in_len)``), both ``(out_len, taps)``."""
    width = _CUBIC_SUPPORT
    if scale < 1:
        width = _CUBIC_SUPPORT / scale
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - width / 2)
    taps = int(math.ceil(width)) + 2
    indices = left[:, None] + np.arange(taps)[None, :]
    dist = u[:, None] - indices
    weights = scale * cubic(scale * dist) if scale < 1 else cubic(dist)
    weights /= weights.sum(axis=1, keepdims=True)
    return weights, indices.astype(np.int64) - 1


@functools.lru_cache(maxsize=64)
def weight_matrix(in_len: int, out_len: int, scale: float) -> "scipy.sparse.csr_matrix":
    """Sparse resampling matrix ``W`` of shape ``(out_len, in_len)``.

    ``W @ v`` resizes a length-``in_len`` signal ``v`` to ``out_len`` samples.
    Mirrored taps that land on the same source pixel are summed. Cached on
    ``(in_len, out_len, scale)``; treat the result as read-only.
    """
    import scipy.sparse  # here, not at the top: conversion workers never need it

    weights, indices = contributions(in_len, out_len, scale)
    rows = np.repeat(np.arange(out_len), weights.shape[1])
    matrix = scipy.sparse.csr_matrix(
        (weights.ravel(), (rows, indices.ravel())), shape=(out_len, in_len)
    )
    matrix.sum_duplicates()
    return matrix


@functools.lru_cache(maxsize=16)
def _dense_transposed(in_len: int, out_len: int, scale: float) -> np.ndarray:
    """``weight_matrix(...).T`` as a read-only dense ``(in_len, out_len)`` array."""
    dense = np.ascontiguousarray(weight_matrix(in_len, out_len, scale).toarray().T)
    dense.flags.writeable = False
    return dense


def _apply_left(matrix: "scipy.sparse.csr_matrix", image: np.ndarray) -> np.ndarray:
    """``matrix @ image`` along axis 0: (H, W, C) -> (out_len, W, C), all channels at once."""
    height, width, channels = image.shape
    flat = np.asarray(matrix @ image.reshape(height, width * channels))
    return flat.reshape(-1, width, channels)


def _apply_right(image: np.ndarray, matrix_t: np.ndarray) -> np.ndarray:
    """``image @ matrix_t`` along axis 1: (H, W, C) -> (H, out_len, C), per channel."""
    out = np.empty((image.shape[0], matrix_t.shape[1], image.shape[2]))
    for c in range(image.shape[2]):
        np.matmul(image[:, :, c], matrix_t, out=out[:, :, c])
    return out


def _target(shape: tuple[int, int], scale, output_shape) -> tuple[tuple, tuple]:
    """``((scale_h, scale_w), (out_h, out_w))`` following MATLAB's rules."""
    if (scale is None) == (output_shape is None):
        raise ValueError("give exactly one of scale or output_shape")
    if scale is not None:
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        scales = (float(scale), float(scale))
        size = tuple(int(math.ceil(n * scale)) for n in shape)
    else:
        size = tuple(int(n) for n in output_shape)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"output_shape must be two positive ints, got {output_shape}")
        scales = tuple(o / i for o, i in zip(size, shape))
    return scales, size


def _as_image(image: np.ndarray) -> np.ndarray:
    """float64 view of a (H, W) or (H, W, C) array; ValueError otherwise."""
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim not in (2, 3):
        raise ValueError(f"expected a (H, W) or (H, W, C) array, got shape {arr.shape}")
    return arr


def _resize(arr: np.ndarray, scales: tuple[float, float], size: tuple[int, int]) -> np.ndarray:
    """``W_h @ arr @ W_w.T`` per channel for a float64 (H, W) or (H, W, C) ``arr``.

    ``W_h`` is applied as a sparse matrix and ``W_w.T`` as a dense one, so
    no transposed copies are made and the result is C-contiguous. The
    dimension with the smaller scale is resized first, as in MATLAB (height
    first on ties); in float64 the order only changes rounding at 1e-16.
    """
    image = arr if arr.ndim == 3 else arr[:, :, None]
    w_h = weight_matrix(image.shape[0], size[0], scales[0])
    w_w_t = _dense_transposed(image.shape[1], size[1], scales[1])
    if scales[1] < scales[0]:
        out = _apply_left(w_h, _apply_right(image, w_w_t))
    else:
        out = _apply_right(_apply_left(w_h, image), w_w_t)
    return out if arr.ndim == 3 else out[:, :, 0]


def imresize(
    image: np.ndarray,
    scale: float | None = None,
    output_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Bicubic resize equal to MATLAB ``imresize(image, scale, 'bicubic')``.

    Args:
        image: ``(H, W)`` or ``(H, W, C)`` array of any numeric dtype, in any
            intensity units (HU, ``[0, 1]``, ``[0, 255]``...).
        scale: output/input size ratio, e.g. ``0.25`` or ``4``. The output
            size is ``ceil(H * scale), ceil(W * scale)`` as in MATLAB.
        output_shape: ``(out_h, out_w)`` instead of ``scale``; the
            per-dimension scales are then ``out / in``.

    Returns:
        float64 array of shape ``(out_h, out_w)`` or ``(out_h, out_w, C)`` in
        the input's units, neither rounded nor clipped (bicubic overshoot is
        kept). Use :func:`imresize_uint8` to get MATLAB's ``uint8`` output.
    """
    arr = _as_image(image)
    scales, size = _target(arr.shape[:2], scale, output_shape)
    return _resize(arr, scales, size)


def imresize_uint8(image: np.ndarray) -> np.ndarray:
    """Round and clip like MATLAB's ``uint8`` conversion.

    Args:
        image: float array in the ``[0, 255]`` range (e.g. an
            :func:`imresize` result of a ``uint8`` image), any shape.

    Returns:
        ``uint8`` array of the same shape: values clipped to ``[0, 255]`` and
        rounded half away from zero (MATLAB ``round``, not NumPy's
        half-to-even).

    Note:
        ``imresize_uint8(imresize(img, s))`` rounds once, at the end. MATLAB
        given a ``uint8`` image keeps ``uint8`` between its two 1-D passes,
        so it rounds after each pass; the two differ by 1-2 grey levels on
        about 10% of pixels of a x1/4 reduction. Rounding once is what the
        Python ports (e.g. BasicSR) do, and both reproduce the published
        Set5 bicubic x4 figures (see ``tools/set5_bicubic.py``).
    """
    clipped = np.clip(np.asarray(image, dtype=np.float64), 0.0, 255.0)
    return np.floor(clipped + 0.5).astype(np.uint8)


def _check_factor(factor: int) -> int:
    if int(factor) != factor or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor}")
    return int(factor)


def downscale(image: np.ndarray, factor: int = 4) -> np.ndarray:
    """MATLAB bicubic downscaling by an integer ``factor`` (with antialiasing).

    Args:
        image: ``(H, W)`` or ``(H, W, C)`` array; ``H`` and ``W`` must be
            multiples of ``factor`` (crop first, e.g. a "modcrop").
        factor: integer reduction factor.

    Returns:
        float64 array of shape ``(H / factor, W / factor[, C])``, same units.
    """
    factor = _check_factor(factor)
    height, width = np.shape(image)[:2]
    if height % factor or width % factor:
        raise ValueError(
            f"downscale by {factor} needs height and width that are multiples of "
            f"{factor}, got {height}x{width}; crop the image first"
        )
    scales = (1.0 / factor, 1.0 / factor)
    rows, cols = _band(height, factor), _band(width, factor)
    if rows is None or cols is None:
        return _resize(_as_image(image), scales, (height // factor, width // factor))
    arr = np.asarray(image)
    if arr.ndim == 3:
        return np.stack([_downscale_2d(arr[:, :, c], rows, cols, factor) for c in range(arr.shape[2])],
                        axis=2)
    return _downscale_2d(arr, rows, cols, factor)


@functools.lru_cache(maxsize=16)
def _band(in_len: int, factor: int) -> tuple[np.ndarray, int, int] | None:
    """``(kernel, before, after)`` when every output sample of a 1/factor resize of
    ``in_len`` samples uses the same weights on taps shifted by ``factor`` (true when
    ``1/factor`` is exact, e.g. 2 and 4); None otherwise.

    With the signal mirror-padded by ``before`` and ``after`` samples (MATLAB's
    symmetric indices), output ``i`` is
    ``kernel @ padded[i * factor : i * factor + kernel.size]``, with exactly the
    weights of ``contributions``. The kernel is zero-padded to a multiple of ``factor``.
    """
    weights, indices = _taps(in_len, in_len // factor, 1.0 / factor)
    keep = np.any(weights != 0, axis=0)
    weights, indices = weights[:, keep], indices[:, keep]
    first, taps = int(indices[0, 0]), indices.shape[1]
    expected = first + factor * np.arange(len(indices))[:, None] + np.arange(taps)
    before, after = -first, int(indices[-1, -1]) - (in_len - 1)
    if np.any(weights != weights[0]) or np.any(indices != expected) \
            or not (0 <= before <= in_len and 0 <= after <= in_len):
        return None
    extra = -taps % factor
    kernel = np.concatenate([weights[0], np.zeros(extra)])
    kernel.flags.writeable = False
    return kernel, before, after + extra


def _downscale_2d(image: np.ndarray, rows, cols, factor: int) -> np.ndarray:
    """Banded 1/factor resize of a (H, W) array: height first, then width, in float64.

    Heights: for each output row a (taps,) @ (taps, W) product over a strided view
    of the padded rows (no copies). Widths: the padded columns are grouped by the
    factor, one small product per group position, then shifted sums.
    """
    kernel, before, after = rows
    padded = _mirror_pad(image, before, after, axis=0)
    out_len, taps = image.shape[0] // factor, kernel.size
    view = as_strided(padded, shape=(out_len, taps, padded.shape[1]),
                      strides=(factor * padded.strides[0], *padded.strides), writeable=False)
    tall = np.matmul(kernel, view)                                   # (H / f, W)

    kernel, before, after = cols
    padded = _mirror_pad(tall, before, after, axis=1)
    out_len, groups = image.shape[1] // factor, kernel.size // factor
    # parts[i, m, q] = sum_r padded[i, m * f + r] * kernel[q * f + r]
    parts = padded.reshape(len(tall), -1, factor) @ kernel.reshape(groups, factor).T
    out = parts[:, :out_len, 0].copy()
    for q in range(1, groups):
        out += parts[:, q:q + out_len, q]
    return out


def _mirror_pad(image: np.ndarray, before: int, after: int, axis: int) -> np.ndarray:
    """float64 copy of a (H, W) `image` with `before`/`after` samples mirrored along
    `axis` as MATLAB's symmetric indices (``... 1 0 | 0 1 ... n-1 | n-1 n-2 ...``)."""
    n = image.shape[axis]
    shape = list(image.shape)
    shape[axis] = n + before + after
    padded = np.empty(shape)
    ahead = (slice(None),) * axis
    padded[ahead + (slice(before, before + n),)] = image
    if before:
        padded[ahead + (slice(0, before),)] = image[ahead + (slice(before - 1, None, -1) if before < n
                                                              else slice(None, None, -1),)]
    if after:
        padded[ahead + (slice(before + n, None),)] = image[ahead + (slice(n - 1, n - 1 - after, -1) if after < n
                                                                   else slice(None, None, -1),)]
    return padded


def upscale(image: np.ndarray, factor: int = 4) -> np.ndarray:
    """MATLAB bicubic upscaling by an integer ``factor``.

    Args:
        image: ``(H, W)`` or ``(H, W, C)`` array, any units.
        factor: integer enlargement factor.

    Returns:
        float64 array of shape ``(H * factor, W * factor[, C])``, same units.
    """
    factor = _check_factor(factor)
    return imresize(image, scale=factor)

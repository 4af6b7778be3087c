"""Image-quality metrics used throughout the project: PSNR and SSIM.

Both metrics take the intensity scale explicitly through ``data_range``
(``1.0`` for ``[0, 1]`` images, ``255`` for 8-bit scales, the window width
in HU for CT), and compute in float64.

SSIM follows Wang et al. (2004) exactly as the reference MATLAB
``ssim_index`` and BasicSR's ``calculate_ssim``: an 11x11 Gaussian window
with sigma 1.5, ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``, and the mean of the
SSIM map over the 'valid' region (pixels whose window lies entirely inside
the image).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

_SSIM_SIGMA = 1.5
_SSIM_RADIUS = 5  # 11x11 window
_K1, _K2 = 0.01, 0.03

# ITU-R BT.601 luma coefficients for RGB in [0, 255] (MATLAB rgb2ycbcr).
_BT601_Y = np.array([65.481, 128.553, 24.966]) / 255.0
_BT601_Y_OFFSET = 16.0


def _as_2d(image: np.ndarray, name: str) -> np.ndarray:
    """float64 (H, W) array from a (H, W) or (H, W, 1) input."""
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be (H, W) or (H, W, 1), got shape {arr.shape}")
    return arr


def _pair(pred, target) -> tuple[np.ndarray, np.ndarray]:
    pred, target = _as_2d(pred, "pred"), _as_2d(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch: pred {pred.shape} vs target {target.shape}")
    return pred, target


def _as_mask(mask, shape: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W) mask with at least one True pixel."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[:, :, 0]
    if mask.shape != shape:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {shape}")
    if not mask.any():
        raise ValueError("mask selects no pixels")
    return mask


def psnr(pred: np.ndarray, target: np.ndarray, data_range: float = 1.0, mask=None) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(data_range^2 / MSE)``.

    Args:
        pred, target: ``(H, W)`` or ``(H, W, 1)`` arrays in the same units.
        data_range: peak-to-peak range of the signal in those units
            (1 for ``[0, 1]``, 255 for 8-bit, window width for HU).
        mask: optional boolean ``(H, W)`` array; the MSE is then taken over
            ``mask == True`` pixels only.

    Returns:
        PSNR in dB; ``float('inf')`` when the images are identical.
    """
    pred, target = _pair(pred, target)
    err = (pred - target) ** 2
    mse = err[_as_mask(mask, err.shape)].mean() if mask is not None else err.mean()
    if mse == 0:
        return float("inf")
    return float(10.0 * math.log10(data_range**2 / mse))


def _gaussian_window_1d() -> np.ndarray:
    """Normalised 1-D Gaussian of length 11, sigma 1.5.

    Its outer product is MATLAB's ``fspecial('gaussian', 11, 1.5)``.
    """
    x = np.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=np.float64)
    g = np.exp(-(x**2) / (2 * _SSIM_SIGMA**2))
    return g / g.sum()


def _filter(image: np.ndarray) -> np.ndarray:
    """Same-size separable Gaussian filtering with 'reflect' borders.

    'reflect' is half-sample symmetric padding (``d c b a | a b c d``), i.e.
    MATLAB's ``'symmetric'``. Pixels at least 5 from every border only see
    real data, so there the result equals MATLAB's ``filter2(w, x, 'valid')``.
    """
    g = _gaussian_window_1d()
    out = ndimage.correlate1d(image, g, axis=0, mode="reflect")
    return ndimage.correlate1d(out, g, axis=1, mode="reflect")


def ssim_map(pred: np.ndarray, target: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Per-pixel SSIM map, same size as the inputs.

    Args:
        pred, target: ``(H, W)`` or ``(H, W, 1)`` arrays in the same units.
        data_range: dynamic range ``L`` of the signal in those units.

    Returns:
        float64 ``(H, W)`` map. Border pixels (within 5 of an edge) use
        'reflect'-padded windows; the interior ``[5:-5, 5:-5]`` is MATLAB's
        'valid' SSIM map.
    """
    x, y = _pair(pred, target)
    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    mu_x, mu_y = _filter(x), _filter(y)
    var_x = _filter(x * x) - mu_x**2
    var_y = _filter(y * y) - mu_y**2
    cov = _filter(x * y) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return num / den


def ssim(pred: np.ndarray, target: np.ndarray, data_range: float = 1.0, mask=None) -> float:
    """Structural similarity (Wang et al. 2004), MATLAB ``ssim_index`` style.

    Args:
        pred, target: ``(H, W)`` or ``(H, W, 1)`` arrays in the same units,
            at least 11x11 when no mask is given.
        data_range: dynamic range ``L`` of the signal in those units.
        mask: optional boolean ``(H, W)`` array.

    Returns:
        Mean SSIM. Without a mask: the mean over the 'valid' region (the
        ``(H-10, W-10)`` pixels whose 11x11 window fits in the image), as
        MATLAB ``ssim_index`` and BasicSR. With a mask: the mean of the
        same-size map (borders filtered with 'reflect' padding, see
        :func:`ssim_map`) over ``mask == True`` pixels, so masks may reach
        the image edge.
    """
    smap = ssim_map(pred, target, data_range)
    if mask is not None:
        return float(smap[_as_mask(mask, smap.shape)].mean())
    r = _SSIM_RADIUS
    if min(smap.shape) <= 2 * r:
        raise ValueError(f"images must be at least 11x11 for SSIM, got {smap.shape}")
    return float(smap[r:-r, r:-r].mean())


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an RGB image, as MATLAB ``rgb2ycbcr`` (Y plane).

    Args:
        image: ``(H, W, 3)`` RGB array with values in ``[0, 255]`` (uint8 or
            float). Scale ``[0, 1]`` images by 255 first.

    Returns:
        float64 ``(H, W)`` Y in ``[16, 235]`` (studio range, 8-bit scale):
        ``16 + (65.481 R + 128.553 G + 24.966 B) / 255``. Not rounded; MATLAB
        returns it rounded to uint8 for uint8 input (``np.floor(y + 0.5)``).
        This equals BasicSR ``rgb2ycbcr(img / 255, y_only=True)``.
    """
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected a (H, W, 3) RGB array, got shape {arr.shape}")
    return arr @ _BT601_Y + _BT601_Y_OFFSET


def shave(image: np.ndarray, border: int) -> np.ndarray:
    """Crop ``border`` pixels from each side of the two leading axes.

    Args:
        image: ``(H, W, ...)`` array.
        border: pixels to remove on the top, bottom, left and right.

    Returns:
        View of shape ``(H - 2 border, W - 2 border, ...)``.
    """
    if border < 0:
        raise ValueError(f"border must be >= 0, got {border}")
    if border == 0:
        return image
    return image[border:-border, border:-border]

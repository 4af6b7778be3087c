"""Tests for tfgan_ct.evaluation.metrics against scikit-image and hand computation."""
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import correlate2d
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from tfgan_ct.evaluation.metrics import psnr, rgb_to_y, shave, ssim, ssim_map

REPO = Path(__file__).resolve().parents[1]
SET5 = Path(__file__).resolve().parents[2] / "shared/data/natural/Set5"


def _pair(shape=(48, 40), noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    target = rng.random(shape)
    pred = np.clip(target + noise * rng.normal(size=shape), 0, 1)
    return pred, target


def _skimage_ssim(pred, target, data_range, **kwargs):
    # truncate=3.5, sigma=1.5 gives an 11x11 window; skimage then averages the
    # map over [5:-5, 5:-5], which is exactly the 'valid' region.
    return structural_similarity(
        target, pred, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=data_range, **kwargs,
    )


@pytest.mark.parametrize("data_range", [1.0, 255.0])
def test_psnr_matches_skimage(data_range):
    pred, target = _pair()
    pred, target = pred * data_range, target * data_range
    expected = peak_signal_noise_ratio(target, pred, data_range=data_range)
    assert psnr(pred, target, data_range) == pytest.approx(expected, abs=1e-10)


def test_psnr_hand_value_and_identical_images():
    target = np.zeros((4, 4))
    assert psnr(target + 0.1, target) == pytest.approx(20.0, abs=1e-12)  # MSE 0.01
    assert psnr(target, target) == float("inf")
    assert ssim(np.ones((16, 16)), np.ones((16, 16))) == pytest.approx(1.0)


def test_psnr_with_mask():
    target = np.zeros((6, 6))
    pred = target.copy()
    pred[:2] = 0.1  # error only in the first two rows
    pred[5, 5] = 5.0  # large error outside the mask
    mask = np.zeros((6, 6), bool)
    mask[:4] = True  # 24 pixels, 12 with squared error 0.01
    expected = 10 * math.log10(1.0 / (12 * 0.01 / 24))
    assert psnr(pred, target, mask=mask) == pytest.approx(expected, abs=1e-12)
    assert psnr(pred, target, mask=~mask) < 10


@pytest.mark.parametrize("data_range", [1.0, 255.0])
def test_ssim_matches_skimage(data_range):
    pred, target = _pair(shape=(37, 45))
    pred, target = pred * data_range, target * data_range
    expected = _skimage_ssim(pred, target, data_range)
    assert ssim(pred, target, data_range) == pytest.approx(expected, abs=1e-10)


def test_ssim_matches_matlab_valid_filtering():
    # MATLAB ssim_index: filter2(fspecial('gaussian', 11, 1.5), x, 'valid').
    pred, target = _pair(shape=(30, 26), noise=0.2, seed=3)
    x = np.arange(-5, 6)
    window = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * 1.5**2))
    window /= window.sum()

    def filt(img):
        return correlate2d(img, window, mode="valid")

    c1, c2 = 0.01**2, 0.03**2
    mx, my = filt(pred), filt(target)
    sxx, syy = filt(pred * pred) - mx**2, filt(target * target) - my**2
    sxy = filt(pred * target) - mx * my
    smap = (2 * mx * my + c1) * (2 * sxy + c2) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    assert ssim(pred, target) == pytest.approx(smap.mean(), abs=1e-12)


def test_ssim_with_mask_averages_reflect_padded_map():
    pred, target = _pair(shape=(32, 32), seed=5)
    mask = np.zeros((32, 32), bool)
    mask[:12, 3:20] = True  # touches the top border
    _, full = _skimage_ssim(pred, target, 1.0, full=True)  # 'reflect' borders
    assert ssim(pred, target, mask=mask) == pytest.approx(full[mask].mean(), abs=1e-10)
    np.testing.assert_allclose(ssim_map(pred, target), full, atol=1e-10)


def test_ssim_with_interior_mask_equals_unmasked():
    pred, target = _pair(shape=(32, 32), seed=6)
    mask = np.zeros((32, 32), bool)
    mask[5:-5, 5:-5] = True
    assert ssim(pred, target, mask=mask) == pytest.approx(ssim(pred, target), abs=1e-12)


def test_ssim_accepts_trailing_channel_and_rejects_bad_input():
    pred, target = _pair(shape=(20, 20))
    assert ssim(pred[..., None], target[..., None]) == pytest.approx(ssim(pred, target))
    with pytest.raises(ValueError):
        ssim(np.zeros((20, 20, 3)), np.zeros((20, 20, 3)))
    with pytest.raises(ValueError):
        ssim(np.zeros((8, 8)), np.zeros((8, 8)))
    with pytest.raises(ValueError):
        psnr(pred, target, mask=np.zeros((20, 20), bool))


def test_rgb_to_y_bt601():
    rgb = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [10, 20, 30]]], dtype=np.uint8)
    y = rgb_to_y(rgb)
    expected = [16.0, 235.0, 16 + 65.481, 16 + (65.481 * 10 + 128.553 * 20 + 24.966 * 30) / 255]
    np.testing.assert_allclose(y[0], expected, atol=1e-12)


def test_shave():
    image = np.arange(10 * 12 * 3).reshape(10, 12, 3)
    assert shave(image, 4).shape == (2, 4, 3)
    np.testing.assert_array_equal(shave(image, 1), image[1:-1, 1:-1])
    assert shave(image, 0) is image


def _load_set5_tool():
    path = REPO / "tools" / "set5_bicubic.py"
    spec = importlib.util.spec_from_file_location("set5_bicubic", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_set5_bicubic_reproduces_published_figures():
    if not SET5.is_dir():
        pytest.skip(f"Set5 not found at {SET5}")
    result = _load_set5_tool().evaluate_set5(SET5)
    assert len(result["images"]) == 5
    assert result["psnr"] == pytest.approx(28.42, abs=0.02)
    assert result["ssim"] == pytest.approx(0.8104, abs=0.001)

"""Trust figures of a derived image: LR consistency, flip spread, the one-line summary."""
from __future__ import annotations

import math

import numpy as np
import pytest

from tfgan_ct.config import Window
from tfgan_ct.data import dicom_io, resize
from tfgan_ct.data.masking import MaskSettings, brain_mask
from tfgan_ct.deploy import trust

WINDOW = Window(40.0, 80.0)


@pytest.fixture(scope="module")
def slice_hu(phantom_dir) -> np.ndarray:
    """One NCCT phantom slice in HU, float32 [128, 128]."""
    path = sorted((phantom_dir / "patient00" / "01_ncct").glob("*.dcm"))[1]
    return dicom_io.read_hu(str(path), [0], -1500.0)[0].astype(np.float32)


@pytest.fixture(scope="module")
def lr_and_mask(slice_hu):
    """The slice as the LR source (HU [128, 128]) and its brain mask."""
    mask = brain_mask(slice_hu, (-15.0, 100.0), MaskSettings())
    assert mask.sum() > 1000
    return slice_hu, mask


def bicubic_model(unit: np.ndarray) -> np.ndarray:
    return resize.upscale(unit, 4).astype(np.float32)


def derived_hu(model, lr_hu: np.ndarray) -> np.ndarray:
    """What upscale does: HU -> [0, 1] of the window -> model -> HU."""
    return WINDOW.from_unit(np.clip(model(WINDOW.to_unit(lr_hu)), 0, 1))


def test_bicubic_is_consistent_with_its_source(lr_and_mask):
    lr, mask = lr_and_mask
    result = trust.lr_consistency(derived_hu(bicubic_model, lr), lr, mask, window=WINDOW)
    assert result.pixels == int(mask.sum())
    assert result.mean_hu < 2 and result.max_hu < 25


def test_a_hallucinating_model_is_not(lr_and_mask):
    lr, mask = lr_and_mask
    rows, cols = np.nonzero(mask)
    centre = (4 * rows.mean(), 4 * cols.mean())

    def hallucinating(unit):
        yy, xx = np.mgrid[: 4 * unit.shape[0], : 4 * unit.shape[1]]
        blob = 0.5 * np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * 12.0 ** 2))
        return bicubic_model(unit) + blob

    honest = trust.lr_consistency(derived_hu(bicubic_model, lr), lr, mask, window=WINDOW)
    result = trust.lr_consistency(derived_hu(hallucinating, lr), lr, mask, window=WINDOW)
    assert result.max_hu > 25 and result.max_hu > 2 * honest.max_hu
    assert result.mean_hu > honest.mean_hu          # a local blob moves the mean less than the max


def test_empty_mask_and_whole_image(lr_and_mask):
    lr, _ = lr_and_mask
    sr = resize.upscale(lr, 4)
    empty = trust.lr_consistency(sr, lr, np.zeros(lr.shape, bool))
    assert empty.empty and empty.pixels == 0 and math.isnan(empty.mean_hu) and math.isnan(empty.max_hu)
    assert empty.as_dict() == {"mean_hu": None, "max_hu": None, "pixels": 0}
    assert trust.lr_consistency(sr, lr).pixels == lr.size
    with pytest.raises(ValueError, match="not x4"):
        trust.lr_consistency(sr[:-4], lr)


def test_combine_weights_by_pixels():
    parts = [trust.LrConsistency(1.0, 5.0, 100), trust.LrConsistency(4.0, 9.0, 300),
             trust.LrConsistency(math.nan, math.nan, 0)]
    total = trust.combine(parts)
    assert total == trust.LrConsistency(3.25, 9.0, 400)
    assert trust.combine([]).empty


def test_flip_spread_of_an_equivariant_model_is_zero(lr_and_mask):
    unit = WINDOW.to_unit(lr_and_mask[0])
    spread = trust.flip_spread(bicubic_model, unit)
    assert spread.shape == (512, 512) and spread.dtype == np.float32
    assert float(spread.max()) < 1e-5


def test_flip_spread_of_a_biased_model_is_not(lr_and_mask):
    unit = WINDOW.to_unit(lr_and_mask[0])[:, :96]          # not square: rotations swap h and w

    def gradient(x):
        return bicubic_model(x) + np.linspace(0, 0.2, 4 * x.shape[1], dtype=np.float32)[None, :]

    spread = trust.flip_spread(gradient, unit)
    assert spread.shape == (512, 384)
    assert float(spread.mean()) > 0.02
    hu = trust.spread_hu(spread, WINDOW)
    assert hu.dtype == np.float32
    np.testing.assert_allclose(hu, spread * 80.0, rtol=1e-6)


def test_flip_spread_reuses_the_upscaled_image(lr_and_mask):
    """With the untransformed input's output given, the other seven are predicted, and the
    spread is the one of eight predictions."""
    unit = WINDOW.to_unit(lr_and_mask[0])[:64, :96]
    calls = []

    def gradient(x):
        calls.append(x.shape)
        return bicubic_model(x) + np.linspace(0, 0.2, 4 * x.shape[1], dtype=np.float32)[None, :]

    full = trust.flip_spread(gradient, unit)
    assert len(calls) == 8
    calls.clear()
    reused = trust.flip_spread(gradient, unit, identity=gradient(unit))
    assert len(calls) == 1 + 7
    np.testing.assert_array_equal(reused, full)


def test_summary_text_is_short_and_holds_the_figures():
    text = trust.summary_text(trust.LrConsistency(1.234, 9.81, 500))
    assert text == "LR consistency mean 1.2 HU, max 9.8 HU (brain)"
    assert len(trust.summary_text(trust.LrConsistency(1234.5, 98765.4, 5))) <= trust.SUMMARY_MAX_CHARS
    assert trust.summary_text(trust.LrConsistency(math.nan, math.nan, 0)) == "LR consistency: no brain pixels"
    assert all(ord(c) < 128 and c != "\\" for c in text)

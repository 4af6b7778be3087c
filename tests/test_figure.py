"""The Fig. 2 style comparison figure."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tfgan_ct import figure
from tfgan_ct.cli import main
from tfgan_ct.evaluate import Slice
from conftest import SMALL_CONFIG


def synthetic_slices(n=3, size=64):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        hr = rng.random((size, size)).astype(np.float32)
        mask = np.zeros((size, size), bool)
        mask[8:8 + 16 * (i + 1) // 2 + 20, 8:50] = True
        lr = hr.reshape(size // 4, 4, size // 4, 4).mean(axis=(1, 3))
        out.append(Slice(lr, hr, mask, "p", "s", i))
    return out


def test_auto_roi_finds_where_methods_differ():
    mask = np.ones((64, 64), bool)
    a = np.zeros((64, 64))
    b = a.copy()
    b[40:52, 10:22] = 1.0
    y, x = figure.auto_roi([a, b], mask, 16)
    assert y <= 40 and y + 16 >= 52 and x <= 10 and x + 16 >= 22


def test_figure_layout_and_picks():
    slices = synthetic_slices()
    assert figure.pick_slices(slices, 2) == [1, 2]  # most brain, in order
    image = figure.compare(slices, [], count=2, panel=96)
    columns = 2  # bicubic (added) and ground truth
    assert image.mode == "RGB" and image.width == columns * 96 + (columns + 1) * figure.MARGIN
    pixels = np.asarray(image)
    assert (pixels == figure.BOX_COLOUR).all(axis=-1).any()  # the region box is drawn
    with pytest.raises(ValueError, match="slice 7 does not exist"):
        figure.compare(slices, [], indices=[7], panel=96)
    with pytest.raises(ValueError, match="outside"):
        figure.compare(slices, [], indices=[0], roi=(60, 60, 16), panel=96)


def test_compare_cli(converted, tiny_export, tmp_path):
    data, _ = converted
    out = tmp_path / "fig.png"
    result = CliRunner().invoke(main, ["compare", "ncct", "--data", str(data), "--modality", "ncct",
                                       "--models-dir", str(tiny_export), "--out", str(out),
                                       "--slices", "0", "--panel", "128", "--config", str(SMALL_CONFIG)])
    assert result.exit_code == 0, result.output
    image = Image.open(out)
    assert image.width == 3 * 128 + 4 * figure.MARGIN  # bicubic, ncct, ground truth

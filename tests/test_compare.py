"""The Fig. 2 style comparison figure."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tfgan_ct.cli import main
from tfgan_ct.evaluation import compare
from tfgan_ct.evaluation.evaluate import Slice

from helpers import SMALL_CONFIG


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
    y, x = compare.auto_roi([a, b], mask, 16)
    assert y <= 40 and y + 16 >= 52 and x <= 10 and x + 16 >= 22


def test_figure_layout_and_picks():
    slices = synthetic_slices()
    assert compare.pick_slices(slices, 2) == [1, 2]  # most brain, in order
    image = compare.compare(slices, [], count=2, panel=96)
    columns = 2  # bicubic (added) and ground truth
    assert image.mode == "RGB" and image.width == columns * 96 + (columns + 1) * compare.MARGIN
    pixels = np.asarray(image)
    assert (pixels == compare.BOX_COLOUR).all(axis=-1).any()  # the region box is drawn
    with pytest.raises(ValueError, match="slice 7 does not exist"):
        compare.compare(slices, [], indices=[7], panel=96)
    with pytest.raises(ValueError, match="outside"):
        compare.compare(slices, [], indices=[0], roi=(60, 60, 16), panel=96)


def test_compare_cli(converted, tiny_export, tmp_path):
    data, _ = converted
    out = tmp_path / "fig.png"
    result = CliRunner().invoke(main, ["compare", "ncct", "--data", str(data), "--modality", "ncct",
                                       "--models-dir", str(tiny_export), "--out", str(out),
                                       "--slices", "0", "--panel", "128", "--config", str(SMALL_CONFIG)])
    assert result.exit_code == 0, result.output
    image = Image.open(out)
    assert image.width == 3 * 128 + 4 * compare.MARGIN  # bicubic, ncct, ground truth


def _wide_slice():
    """A 64 x 128 (H x W) slice: black with a white 32 x 32 square at rows 16:48, cols 8:40."""
    hr = np.zeros((64, 128), np.float32)
    hr[16:48, 8:40] = 1.0
    lr = hr.reshape(16, 4, 32, 4).mean(axis=(1, 3))
    return Slice(lr, hr, np.ones(hr.shape, bool), "p", "s", 0)


def test_non_square_slice_keeps_aspect_and_box_lands_on_the_roi():
    panel = 96  # 64 x 128 -> 48 x 96 at scale 0.75, centred: 24 rows of background above and below
    full_row, zoom_row, _ = compare._slice_rows(_wide_slice(), [compare.inference.bicubic()],
                                               (16, 80, 16), panel, 0, 16)
    truth = np.asarray(full_row[-1])
    assert truth.shape == (panel, panel, 3)
    assert (truth[:24] == compare.BACKGROUND).all() and (truth[72:] == compare.BACKGROUND).all()
    # HR rows 16:32, cols 80:96 -> panel rows 36..47, cols 60..71 (outline drawn inwards)
    box = (truth == compare.BOX_COLOUR).all(axis=-1)
    for yy, xx in [(36, 66), (47, 66), (42, 60), (42, 71), (36, 60), (47, 71)]:
        assert box[yy, xx], (yy, xx)
    assert not box[42, 66]  # the inside of the box is not painted
    rows, cols = np.nonzero(box)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (36, 47, 60, 71)
    # not stretched: the 32 x 32 white square is a 24 x 24 square at rows 36:60, cols 6:30
    bright = truth[..., 0] > 128
    rows, cols = np.nonzero(bright & ~box)
    assert abs(rows.min() - 36) <= 1 and abs(rows.max() - 59) <= 1
    assert abs(cols.min() - 6) <= 1 and abs(cols.max() - 29) <= 1
    assert all(np.asarray(z).shape == (panel, panel, 3) for z in zoom_row)  # the square ROI fills its panel


def test_set5_woman_box_on_a_tall_image(shared_data):
    path = shared_data / "natural" / "Set5" / "woman.png"
    if not path.is_file():
        pytest.skip("Set5 woman.png not found")
    from tfgan_ct.data import resize
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255
    hr = rgb @ np.array([0.299, 0.587, 0.114])
    hr = hr[: hr.shape[0] // 4 * 4, : hr.shape[1] // 4 * 4]
    assert hr.shape == (344, 228)
    item = Slice(resize.downscale(hr, 4).astype(np.float32), hr.astype(np.float32),
                 np.ones(hr.shape, bool), "p", "s", 0)
    panel = 172  # scale 0.5: 172 x 114, 29 columns of background on the left
    image = compare.compare([item], [], indices=[0], roi=(200, 100, 40), panel=panel)
    full = compare._slice_rows(item, [compare.inference.bicubic()], (200, 100, 40), panel, 0, 16)[0][-1]
    pixels = np.asarray(full)
    assert (pixels[:, :29] == compare.BACKGROUND).all() and (pixels[:, 29 + 114:] == compare.BACKGROUND).all()
    box = (pixels == compare.BOX_COLOUR).all(axis=-1)
    rows, cols = np.nonzero(box)
    # HR rows 200:240, cols 100:140 -> panel rows 100..119, cols 29 + 50..69
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (100, 119, 79, 98)
    assert image.width == 2 * panel + 3 * compare.MARGIN

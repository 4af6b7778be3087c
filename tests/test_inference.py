"""SR methods (bicubic, SavedModel) and tiled inference."""
from __future__ import annotations

import re

import numpy as np
import pytest

from tfgan_ct.data import resize
from tfgan_ct.deploy import inference
from tfgan_ct.model.generator import build_generator


def keras_method(num_blocks=1):
    """A tiny random generator wrapped as a method (its receptive field is small)."""
    g = build_generator(num_blocks=num_blocks, features=8, growth=4)
    return inference.Method("tiny", lambda lr: g(lr, training=False).numpy())


def test_tile_plan_covers_the_image_once():
    plan = inference.tiles(50, 37, 16, 5)
    covered = np.zeros((50, 37), int)
    for (y0, y1, x0, x1), (cy0, cy1, cx0, cx1) in plan:
        covered[y0:y1, x0:x1] += 1
        assert cy0 == max(y0 - 5, 0) and cy1 == min(y1 + 5, 50)
        assert cx0 == max(x0 - 5, 0) and cx1 == min(x1 + 5, 37)
    assert (covered == 1).all() and len(plan) == 4 * 3


def test_negative_tile_padding_is_refused():
    with pytest.raises(ValueError, match="tile padding must be >= 0"):
        inference.tiles(50, 37, 16, -1)


def test_server_specs_are_checked():
    method = inference.load("ncct@3", server="http://localhost:1")
    assert method.metadata == {"stage": "ncct", "server": "http://localhost:1", "version": 3}
    for bad in ("ncct@latest", "@2"):
        with pytest.raises(inference.InferenceError, match="STAGE or STAGE@N"):
            inference.load(bad, server="http://localhost:1")


def test_tiled_equals_untiled_when_pad_covers_the_receptive_field():
    method = keras_method()
    lr = np.random.default_rng(0).random((45, 38)).astype(np.float32)
    whole = inference.upscale_image(method, lr)
    # 1 RRDB block: 15 3x3 convs at LR plus 5 at LR/HR scales -> a receptive radius under 20 LR pixels.
    tiled = inference.upscale_image(method, lr, tile=16, pad=20, batch=3)
    assert tiled.shape == whole.shape == (180, 152)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)


def test_small_pad_differs_only_near_seams():
    method = keras_method()
    lr = np.random.default_rng(1).random((48, 48)).astype(np.float32)
    whole = inference.upscale_image(method, lr)
    tiled = inference.upscale_image(method, lr, tile=24, pad=2)
    assert not np.allclose(tiled, whole, atol=1e-5)
    # Far from the seam at LR 24 (HR 96) the two agree.
    np.testing.assert_allclose(tiled[:40, :40], whole[:40, :40], atol=1e-5)


def test_bicubic_method_is_the_matlab_resize():
    lr = np.random.default_rng(2).random((2, 9, 7, 1)).astype(np.float32)
    sr = inference.bicubic().predict(lr)
    assert sr.shape == (2, 36, 28, 1) and sr.dtype == np.float32
    np.testing.assert_allclose(sr[1, :, :, 0], resize.upscale(lr[1, :, :, 0], 4), atol=1e-6)
    with pytest.raises(ValueError, match=r"\[batch, h, w, 1\]"):
        inference.bicubic().predict(lr[..., 0])


def test_load_saved_model_and_errors(tiny_export, tmp_path):
    method = inference.load("ncct", tiny_export)
    assert method.name == "ncct" and method.scale == 4 and method.description == "ncct v1"
    out = inference.upscale_image(method, np.full((10, 12), 0.5, np.float32))
    assert out.shape == (40, 48) and np.isfinite(out).all()
    assert inference.load("bicubic").name == "bicubic"
    with pytest.raises(inference.InferenceError, match="tfgan-ct train --stage cta"):
        inference.load("cta", tiny_export)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "saved_model.pb").write_bytes(b"not a model")
    with pytest.raises(inference.InferenceError, match="cannot load"):
        inference.load(str(tmp_path / "broken"), tiny_export)


def test_named_specs(tiny_export):
    assert inference.load("Bicubic=bicubic").name == "Bicubic"
    method = inference.load("TL=ncct@1", tiny_export)
    assert method.name == "TL" and method.metadata["stage"] == "ncct"
    assert inference.load(f"Scratch={tiny_export / 'ncct'}", "elsewhere").description == "ncct v1"


@pytest.mark.parametrize("damage", ["truncated-variables", "binary-metadata", "metadata-array"])
def test_loading_a_damaged_export_names_it(tiny_export, tmp_path, damage):
    from test_export import DAMAGE_MESSAGES, damaged_copy

    bad = damaged_copy(tiny_export / "ncct/1", tmp_path / "ncct-copy", damage)
    for spec in (str(bad), f"TL={bad}"):  # a path, as `--model PATH` and `evaluate` take it
        with pytest.raises(inference.InferenceError, match=re.escape(str(bad)) + ": " + DAMAGE_MESSAGES[damage]):
            inference.load(spec, tiny_export)
    with pytest.raises(inference.InferenceError, match=DAMAGE_MESSAGES[damage]):
        inference.saved_model(bad)


def test_an_export_whose_scale_is_not_a_number_is_refused(tiny_export, tmp_path):
    import json
    import shutil

    bad = tmp_path / "1"
    shutil.copytree(tiny_export / "ncct/1", bad)
    meta = json.loads((bad / "tfgan_ct.json").read_text())
    (bad / "tfgan_ct.json").write_text(json.dumps({**meta, "scale": "four"}))
    with pytest.raises(inference.InferenceError, match=r"'scale' in its tfgan_ct.json is 'four'"):
        inference.load(str(bad))


def test_auto_tile_runs_whole_images_that_fit_and_tiles_the_rest():
    per_pixel = inference.BYTES_PER_LR_PIXEL
    assert inference.auto_tile(512, 512, budget=512 * 512 * per_pixel) == 0
    tile = inference.auto_tile(512, 512, budget=300 * 300 * per_pixel)
    assert tile in inference.AUTO_TILES and (tile + 32) ** 2 * per_pixel <= 300 * 300 * per_pixel
    assert 4 * (tile + 32) ** 2 * per_pixel <= 300 * 300 * per_pixel  # the 4 tiles run together fit
    assert inference.auto_tile(512, 512, budget=300 * 300 * per_pixel, pad=16, batch=1) > tile
    assert inference.auto_tile(4096, 4096, budget=1) == inference.AUTO_TILES[-1]
    assert inference.auto_tile(64, 64) == 0          # a small slice is never tiled on this machine
    lr = np.random.default_rng(1).random((24, 20), np.float32)
    method = inference.bicubic()
    np.testing.assert_array_equal(inference.upscale_image(method, lr, tile=None),
                                  inference.upscale_image(method, lr, tile=0))

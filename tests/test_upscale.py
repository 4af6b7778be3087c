"""`tfgan-ct upscale`: DICOM series in, derived x4 DICOM series (or PNG / npy) out."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner

from tfgan_ct import dicom_io, inference, resize, upscale
from tfgan_ct.cli import main
from tfgan_ct.config import Window, load_config
from conftest import SMALL_CONFIG

WIDE = Window(1000, 6000)  # no clipping of CT values: the bicubic method then gives bicubic HU


@pytest.fixture(scope="module")
def cfg():
    return load_config(SMALL_CONFIG)


def dicoms(folder):
    return sorted(folder.glob("*/*.dcm"))


def test_derived_series_headers_and_hu(phantom_dir, cfg, tmp_path):
    source_dir = phantom_dir / "patient00" / "01_ncct"
    summary = upscale.upscale([source_dir], tmp_path, inference.bicubic(), cfg, window=WIDE, progress=False)
    assert len(summary.series) == 1 and not summary.skipped
    outputs = dicoms(tmp_path)
    sources = {pydicom.dcmread(p).SOPInstanceUID: p for p in source_dir.glob("*.dcm")}
    assert len(outputs) == len(sources) == summary.images
    series_uids = set()
    for path in outputs:
        out = pydicom.dcmread(path)
        src_path = sources[out.SourceImageSequence[0].ReferencedSOPInstanceUID]
        src = pydicom.dcmread(src_path)
        assert out.PatientName == src.PatientName and out.PatientID == src.PatientID
        assert out.StudyInstanceUID == src.StudyInstanceUID
        assert out.SeriesInstanceUID != src.SeriesInstanceUID and out.SOPInstanceUID != src.SOPInstanceUID
        assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
        assert list(out.ImageType[:2]) == ["DERIVED", "SECONDARY"] and "bicubic" in out.SeriesDescription
        assert (out.Rows, out.Columns) == (4 * src.Rows, 4 * src.Columns)
        assert [float(v) for v in out.PixelSpacing] == pytest.approx([float(v) / 4 for v in src.PixelSpacing])
        # Centre of the new first pixel: 3/8 of an old pixel up and left of the old one (axial slices).
        expected = np.array(src.ImagePositionPatient, float) - 0.375 * float(src.PixelSpacing[0]) * np.array([1, 1, 0])
        np.testing.assert_allclose(np.array(out.ImagePositionPatient, float), expected, atol=1e-3)
        assert (out.WindowCenter, out.WindowWidth) == (1000, 6000)
        assert not any(elem.tag.is_private for elem in out)
        hu = dicom_io.read_hu(str(src_path), [0], cfg.convert.out_of_field_hu)[0]
        np.testing.assert_allclose(out.pixel_array, np.rint(resize.upscale(hu, 4)), atol=1)
        series_uids.add(out.SeriesInstanceUID)
    assert len(series_uids) == 1


def test_outside_window_policies():
    hu = np.full((8, 8), 30.0, np.float32)
    hu[:, :4] = 1000.0  # bone: above the 40/80 window
    method = inference.bicubic()
    window = Window(40, 80)
    kept = upscale.super_resolve_hu(method, hu, window, "bicubic")
    clipped = upscale.super_resolve_hu(method, hu, window, "clip")
    assert kept[:, :10].min() > 900 and clipped.max() == pytest.approx(80.0)
    np.testing.assert_allclose(kept[:, 24:], 30.0, atol=1e-3)
    np.testing.assert_allclose(clipped[:, 24:], 30.0, atol=1e-3)


def test_real_files_broken_and_multiframe_reported(shared_data, cfg, tmp_path, caplog):
    summary = upscale.upscale([shared_data / "dicom"], tmp_path, inference.bicubic(), cfg, progress=False)
    reasons = {p.split("/")[-1]: r for p, r in ((s.path, s.reason) for s in summary.skipped)}
    # The truncated files hold the same image as 693_UNCR (same SOP instance): that copy is used.
    assert set(reasons) == {"not_dicom.dcm", "pydicom-data_eCT_Supplemental.dcm"}
    assert "multi-frame" in reasons["pydicom-data_eCT_Supplemental.dcm"]
    assert all(caplog.text.count(name) == 1 for name in reasons)
    written = dicoms(tmp_path)
    assert len(written) == summary.images >= 10
    for path in written:
        ds = pydicom.dcmread(path)
        assert ds.pixel_array.shape == (4 * 512, 4 * 512) or ds.Rows % 4 == 0
    assert not list(tmp_path.glob(".*"))  # no staging folders left behind


def test_cli_with_a_saved_model_npy_png_and_existing_output(phantom_dir, tiny_export, tmp_path):
    source = phantom_dir / "patient01" / "03_cta"
    runner = CliRunner()
    args = ["upscale", str(source), "--models-dir", str(tiny_export), "--model", "ncct", "--no-progress",
            "--config", str(SMALL_CONFIG)]
    result = runner.invoke(main, [*args, "--out", str(tmp_path / "dcm"), "--tile", "16", "--tile-pad", "4"])
    assert result.exit_code == 0, result.output
    out = pydicom.dcmread(dicoms(tmp_path / "dcm")[0])
    assert "ncct v1" in out.SeriesDescription and "ncct v1" in out.DerivationDescription
    assert (out.WindowCenter, out.WindowWidth) == (40, 80)

    npy = runner.invoke(main, [*args, "--out", str(tmp_path / "npy"), "--format", "npy"])
    assert npy.exit_code == 0, npy.output
    array = np.load(next((tmp_path / "npy").glob("*/sr_hu.npy")))
    assert array.shape == (len(list(source.glob("*.dcm"))), 512, 512) and array.dtype == np.float32
    png = runner.invoke(main, [*args, "--out", str(tmp_path / "png"), "--format", "png"])
    assert png.exit_code == 0 and len(list((tmp_path / "png").glob("*/*.png"))) == array.shape[0]

    again = runner.invoke(main, [*args, "--out", str(tmp_path / "dcm")])
    assert again.exit_code != 0 and "--overwrite" in again.output
    assert runner.invoke(main, [*args, "--out", str(tmp_path / "dcm"), "--overwrite"]).exit_code == 0
    bad = runner.invoke(main, [*args, "--out", str(tmp_path / "w"), "--window", "40"])
    assert bad.exit_code != 0 and "CENTER,WIDTH" in bad.output


def test_interrupted_series_leaves_nothing_that_looks_complete(phantom_dir, cfg, tmp_path, monkeypatch):
    calls = []
    original = upscale._write_dicom

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(upscale, "_write_dicom", failing)
    with pytest.raises(KeyboardInterrupt):
        upscale.upscale([phantom_dir / "patient00" / "01_ncct"], tmp_path, inference.bicubic(), cfg,
                        progress=False)
    assert list(tmp_path.iterdir()) == []


def test_nothing_usable(shared_data, cfg, tmp_path):
    with pytest.raises(upscale.UpscaleError, match="no series could be upscaled .3 file"):
        upscale.upscale([shared_data / "dicom" / "bad"], tmp_path, inference.bicubic(), cfg, progress=False)


def test_upscale_through_a_serving_endpoint_matches_the_local_model(phantom_dir, tiny_export, tmp_path):
    """`--server`: the REST client against the loopback stand-in for TensorFlow Serving."""
    from tfgan_ct import serving

    server = serving.start_standin(tiny_export)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    source = phantom_dir / "patient02" / "01_ncct"
    runner = CliRunner()
    try:
        common = ["upscale", str(source), "--format", "npy", "--no-progress", "--config", str(SMALL_CONFIG)]
        remote = runner.invoke(main, [*common, "--server", url, "--model", "ncct", "--window", "40,80",
                                      "--out", str(tmp_path / "remote")])
        assert remote.exit_code == 0, remote.output
        local = runner.invoke(main, [*common, "--models-dir", str(tiny_export), "--out", str(tmp_path / "local")])
        assert local.exit_code == 0, local.output
    finally:
        server.shutdown()
        server.server_close()
    np.testing.assert_allclose(np.load(next((tmp_path / "remote").glob("*/sr_hu.npy"))),
                               np.load(next((tmp_path / "local").glob("*/sr_hu.npy"))), atol=1e-3)
    down = runner.invoke(main, [*common, "--server", url, "--out", str(tmp_path / "down")])
    assert down.exit_code != 0 and url in down.output and "Traceback" not in down.output

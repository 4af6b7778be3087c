"""`tfgan-ct upscale`: DICOM series in, derived x4 DICOM series (or PNG / npy) out."""
from __future__ import annotations

import json

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


def _copy(src, dst, **changes):
    """A copy of real DICOM file `src` at `dst`, with header `changes` (keyword=value)."""
    ds = pydicom.dcmread(src)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst)
    return dst


def test_output_folders_belong_to_their_source_series(shared_data, cfg, tmp_path):
    """Two studies into one --out in two runs: two folders, whatever the run order and --overwrite."""
    src = shared_data / "dicom" / "head-ncct" / "pydicom-data_693_UNCR.dcm"
    a = _copy(src, tmp_path / "a" / "im.dcm")
    b = _copy(src, tmp_path / "b" / "im.dcm", PatientID="OTHER", StudyInstanceUID=pydicom.uid.generate_uid(),
              SeriesInstanceUID=pydicom.uid.generate_uid(), SOPInstanceUID=pydicom.uid.generate_uid())
    out = tmp_path / "out"
    first = upscale.upscale([a.parent], out, inference.bicubic(), cfg, window=WIDE, progress=False)
    second = upscale.upscale([b.parent], out, inference.bicubic(), cfg, window=WIDE, progress=False)
    assert first.series[0] != second.series[0] and first.series[0].parent == second.series[0].parent == out
    upscale.upscale([b.parent], out, inference.bicubic(), cfg, window=WIDE, overwrite=True, progress=False)
    folders = sorted(p for p in out.iterdir())
    assert folders == sorted([first.series[0], second.series[0]])
    for folder, source in ((first.series[0], a), (second.series[0], b)):
        uid = pydicom.dcmread(source).SeriesInstanceUID
        assert uid not in folder.name and folder.name.endswith("_x4")
        derived = pydicom.dcmread(next(folder.glob("*.dcm")))
        assert derived.PatientID == pydicom.dcmread(source).PatientID
    # The same names from another run order: they depend on the source series, not on the run.
    again = upscale.upscale([b.parent, a.parent], tmp_path / "out2", inference.bicubic(), cfg, window=WIDE,
                            progress=False)
    assert sorted(p.name for p in again.series) == [p.name for p in folders]


def test_rerun_without_overwrite_says_the_output_exists(shared_data, cfg, tmp_path):
    source = shared_data / "dicom" / "chest-series" / "dcmqi_ct-3slice_01.dcm"
    upscale.upscale([source], tmp_path, inference.bicubic(), cfg, fmt="png", progress=False)
    with pytest.raises(upscale.UpscaleError, match="already exists.*--overwrite") as info:
        upscale.upscale([source], tmp_path, inference.bicubic(), cfg, fmt="png", progress=False)
    assert "no series could be upscaled" not in str(info.value)


def test_single_valued_image_type(shared_data, cfg, tmp_path):
    src = _copy(shared_data / "dicom" / "head-ncct" / "pydicom-data_693_UNCR.dcm", tmp_path / "in" / "im.dcm",
                ImageType="ORIGINAL")
    assert pydicom.dcmread(src).ImageType == "ORIGINAL"
    upscale.upscale([src], tmp_path / "out", inference.bicubic(), cfg, window=WIDE, progress=False)
    out = pydicom.dcmread(dicoms(tmp_path / "out")[0])
    assert list(out.ImageType) == ["DERIVED", "SECONDARY"]


def test_npy_sidecar_names_each_slice_and_the_ones_left_out(shared_data, cfg, tmp_path):
    series = sorted((shared_data / "dicom" / "chest-series").glob("*.dcm"))
    folder = tmp_path / "in"
    copies = [_copy(p, folder / p.name) for p in series]
    data = copies[1].read_bytes()
    copies[1].write_bytes(data[: len(data) // 2])  # pixel data cut: this slice cannot be read
    summary = upscale.upscale([folder], tmp_path / "out", inference.bicubic(), cfg, fmt="npy", window=WIDE,
                              progress=False)
    assert [s.path.split("/")[-1] for s in summary.skipped] == [copies[1].name]
    array = np.load(summary.series[0] / "sr_hu.npy")
    sidecar = json.loads((summary.series[0] / "slices.json").read_text())
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in series]
    assert array.shape == (2, 2048, 2048) and sidecar["shape"] == list(array.shape)
    by_instance = {int(h.InstanceNumber): h for h in headers}
    assert [s["index"] for s in sidecar["slices"]] == [0, 1]
    for entry in sidecar["slices"]:
        header = by_instance[entry["instance_number"]]
        assert entry["position_mm"] == pytest.approx(float(header.ImagePositionPatient[2]), abs=1e-3)
        hu = dicom_io.read_hu(str(folder / series[headers.index(header)].name), [0], cfg.convert.out_of_field_hu)[0]
        np.testing.assert_allclose(array[entry["index"]], resize.upscale(hu, 4), atol=1e-2)
    [left] = sidecar["left_out"]
    assert left["file"] == copies[1].name and left["instance_number"] == int(headers[1].InstanceNumber)
    assert left["source_index"] not in [s["source_index"] for s in sidecar["slices"]] and left["reason"]


def test_npy_of_a_series_with_two_image_sizes_is_refused_clearly(shared_data, cfg, tmp_path):
    series = sorted((shared_data / "dicom" / "chest-series").glob("*.dcm"))
    folder = tmp_path / "in"
    for p in series[:2]:
        _copy(p, folder / p.name)
    small = pydicom.dcmread(series[2])
    small.PixelData = np.ascontiguousarray(small.pixel_array[::2, ::2]).tobytes()
    small.Rows, small.Columns = 256, 256
    small.save_as(folder / series[2].name)
    with pytest.raises(upscale.UpscaleError, match="different sizes") as info:
        upscale.upscale([folder], tmp_path / "out", inference.bicubic(), cfg, fmt="npy", progress=False)
    assert "256x256: 1" in str(info.value) and "512x512: 2" in str(info.value)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_legacy_acr_nema_geometry_and_uids(shared_data, cfg, tmp_path):
    legacy = shared_data / "dicom" / "legacy" / "DICOMSamples_CT_Implicit_Little_Headless_Retired.dcm"
    src = dicom_io.read_dataset(legacy, pixels=False)
    assert "StudyInstanceUID" not in src and "ImagePositionPatient" not in src and "ImagePosition" in src
    for name in ("one", "two"):  # two series (folders) of one source patient and study
        (tmp_path / name).mkdir()
        (tmp_path / name / legacy.name).write_bytes(legacy.read_bytes())
    summary = upscale.upscale([tmp_path / "one", tmp_path / "two"], tmp_path / "out", inference.bicubic(), cfg,
                              window=WIDE, progress=False)
    assert len(summary.series) == 2 and not summary.skipped
    outs = [pydicom.dcmread(p) for p in dicoms(tmp_path / "out")]
    assert len(outs) == 2
    assert outs[0].StudyInstanceUID == outs[1].StudyInstanceUID and outs[0].StudyInstanceUID
    assert outs[0].SeriesInstanceUID != outs[1].SeriesInstanceUID
    spacing = float(src.PixelSpacing[0])
    expected = np.array(src.ImagePosition, float) - 0.375 * spacing * np.array([1, 1, 0])
    for out in outs:
        assert out.FrameOfReferenceUID
        for keyword in ("ImagePosition", "ImageOrientation", "ImageLocation", "Location"):
            assert keyword not in out
        assert [float(v) for v in out.ImageOrientationPatient] == [float(v) for v in src.ImageOrientation]
        np.testing.assert_allclose(np.array(out.ImagePositionPatient, float), expected, atol=1e-3)
        assert float(out.PixelSpacing[0]) == pytest.approx(spacing / 4)
        assert not any(elem.tag.element == 0 for elem in out)  # no stale ACR-NEMA group lengths

"""`tfgan-ct upscale`: DICOM series in, derived x4 DICOM series (or PNG / npy) out."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner

from tfgan_ct.cli import main
from tfgan_ct.config import Window, load_config
from tfgan_ct.data import dicom_io, resize
from tfgan_ct.deploy import derived_dicom, inference, series_output, upscale

from helpers import SMALL_CONFIG

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
    # The truncated files hold the same image as 693_UNCR (same SOP instance): that copy is used,
    # and they are reported as truncated when the header pass already sees that.
    truncated = {"truncated_header.dcm", "truncated_pixeldata.dcm"}
    assert {"not_dicom.dcm", "pydicom-data_eCT_Supplemental.dcm"} <= set(reasons) \
        <= {"not_dicom.dcm", "pydicom-data_eCT_Supplemental.dcm", *truncated}
    assert all("truncated" in reasons[name] for name in truncated & set(reasons))
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
    original = series_output.write_dicom

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(series_output, "write_dicom", failing)
    with pytest.raises(KeyboardInterrupt):
        upscale.upscale([phantom_dir / "patient00" / "01_ncct"], tmp_path, inference.bicubic(), cfg,
                        progress=False)
    assert list(tmp_path.iterdir()) == []


def test_nothing_usable(shared_data, cfg, tmp_path):
    with pytest.raises(upscale.UpscaleError,
                       match=r"(no series could be upscaled|no usable CT images in the input) .3 file"):
        upscale.upscale([shared_data / "dicom" / "bad"], tmp_path, inference.bicubic(), cfg, progress=False)


def test_upscale_through_a_serving_endpoint_matches_the_local_model(phantom_dir, tiny_export, tmp_path):
    """`--server`: the REST client against the loopback stand-in for TensorFlow Serving."""
    from tfgan_ct.deploy import serving

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
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert folders == sorted([first.series[0], second.series[0]])
    assert sorted(p.name for p in out.iterdir() if not p.is_dir()) == [upscale.TRUST_REPORT]
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
    assert list(out.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]  # the CT Image module needs value 3


def test_npy_sidecar_names_each_slice_and_the_ones_left_out(shared_data, cfg, tmp_path):
    series = sorted((shared_data / "dicom" / "chest-series").glob("*.dcm"))
    folder = tmp_path / "in"
    copies = [_copy(p, folder / p.name) for p in series]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid DS value
        _copy(series[1], copies[1], RescaleSlope="NaN")  # its HU cannot be computed: left out
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


# --- Validity of the derived DICOM, checked with dciodvfy (dicom3tools) ---------------------------

DCIODVFY = shutil.which("dciodvfy")
needs_dciodvfy = pytest.mark.skipif(
    DCIODVFY is None, reason="dciodvfy not installed (Debian package dicom3tools): the derived DICOM "
                             "cannot be checked against the standard here")
SAMPLE_GROUPS = ("head-ncct", "cta", "chest-series", "legacy")


def _normalised(line: str) -> str:
    """A dciodvfy line without the values that legitimately differ between source and output."""
    line = re.sub(r"<[^>]*>", "<>", line)          # element values
    line = re.sub(r"\[\d+\]", "[]", line)          # value index
    return re.sub(r"= \d+, expected", "= n, expected", line)  # lengths of values


def _dciodvfy_errors(path: Path) -> set[str]:
    """The normalised "Error" lines dciodvfy reports for DICOM file `path`."""
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    return {_normalised(line) for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")}


def _source_errors(path: Path, tmp_path: Path) -> set[str]:
    """dciodvfy errors of a source file. A source without SOP class (old ACR-NEMA) is not checked
    against any IOD by dciodvfy, so its errors under the CT Image IOD are taken from a copy that
    only gains the CT SOP class and a file meta header: what it lacks then is its own."""
    errors = _dciodvfy_errors(path)
    ds = dicom_io.read_dataset(path, pixels=True)
    if "SOPClassUID" not in ds:
        ds.SOPClassUID = derived_dicom.CT_IMAGE_STORAGE
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = \
            ds.SOPClassUID, ds.SOPInstanceUID
        copy = tmp_path / f"{path.stem}-as-ct.dcm"
        ds.save_as(copy, enforce_file_format=True)
        errors |= _dciodvfy_errors(copy)
    return errors


def _assert_valid_derived(output: Path, source: Path, tmp_path: Path) -> None:
    """No dciodvfy error in `output` that `source` does not have, and none of the kinds upscale fixes."""
    errors = _dciodvfy_errors(output)
    new = errors - _source_errors(source, tmp_path)
    assert not new, f"{output.name} (from {source.name}): new dciodvfy errors:\n" + "\n".join(sorted(new))
    fixed_kinds = ("Type 1 Required", "Type 2 Required", "ImageType", " DA ", " TM ", " DT ")
    assert not [e for e in errors if any(kind in e for kind in fixed_kinds)], sorted(errors)


@needs_dciodvfy
@pytest.mark.slow
@pytest.mark.parametrize("group", SAMPLE_GROUPS)
def test_derived_dicom_of_real_samples_passes_dciodvfy(shared_data, cfg, tmp_path, group):
    """Each real sample upscaled on its own: dciodvfy finds nothing new in the derived image."""
    sources = sorted((shared_data / "dicom" / group).glob("*.dcm"))
    assert sources
    for index, source in enumerate(sources):
        out = tmp_path / f"out{index}"
        summary = upscale.upscale([source], out, inference.bicubic(), cfg, window=WIDE, progress=False)
        assert summary.images == 1 and not summary.skipped
        [derived] = dicoms(out)
        _assert_valid_derived(derived, source, tmp_path)


@needs_dciodvfy
@pytest.mark.slow
def test_derived_dicom_of_the_phantom_passes_dciodvfy(phantom_dir, cfg, tmp_path):
    source_dir = phantom_dir / "patient00" / "01_ncct"
    summary = upscale.upscale([source_dir], tmp_path / "out", inference.bicubic(), cfg, window=WIDE,
                              progress=False, uncertainty=True)
    assert len(summary.spread) == 1  # the flip-spread series is checked too
    sources = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in source_dir.glob("*.dcm")}
    outputs = dicoms(tmp_path / "out")
    assert len(outputs) == 2 * len(sources)
    for path in outputs:
        source = sources[pydicom.dcmread(path, stop_before_pixels=True).SourceImageSequence[0]
                         .ReferencedSOPInstanceUID]
        assert not _dciodvfy_errors(source)  # the phantom is valid: so must its upscale be
        _assert_valid_derived(path, source, tmp_path)


@needs_dciodvfy
@pytest.mark.slow
def test_no_image_type_and_invalid_dates_are_fixed_never_invented(shared_data, cfg, tmp_path):
    src = tmp_path / "in" / "im.dcm"
    ds = pydicom.dcmread(shared_data / "dicom" / "head-ncct" / "pydicom-data_693_UNCR.dcm")
    del ds.ImageType
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values; it writes them anyway
        ds.StudyDate, ds.StudyTime = "2023-13-45", "abc"            # type 2: become empty
        ds.AcquisitionDate, ds.AcquisitionTime = "abc", "25:61:00"  # type 3: left out
        ds.SeriesDate, ds.SeriesTime = "2001.02.03", "10:52:34.5"   # ACR-NEMA forms: rewritten
        ds.PatientBirthDate = "19990231"                            # no such day: empty
        ds.AcquisitionDateTime = "20230230101010"                   # DT, no such day: left out
    src.parent.mkdir()
    ds.save_as(src)
    upscale.upscale([src], tmp_path / "out", inference.bicubic(), cfg, window=WIDE, progress=False)
    [path] = dicoms(tmp_path / "out")
    out = pydicom.dcmread(path)
    assert list(out.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    assert out.StudyDate == "" and out.StudyTime == "" and out.PatientBirthDate == ""
    assert "StudyDate" in out and "PatientBirthDate" in out
    for keyword in ("AcquisitionDate", "AcquisitionTime", "AcquisitionDateTime"):
        assert keyword not in out
    assert (out.SeriesDate, out.SeriesTime) == ("20010203", "105234.5")
    errors = _dciodvfy_errors(path)
    assert not [e for e in errors if any(k in e for k in ("ImageType", " DA ", " TM ", " DT "))], errors


def test_source_image_type_values_3_and_on_are_kept(shared_data, cfg, tmp_path):
    src = _copy(shared_data / "dicom" / "head-ncct" / "pydicom-data_693_UNCR.dcm", tmp_path / "in" / "im.dcm",
                ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER", "EXTRA"])
    upscale.upscale([src], tmp_path / "out", inference.bicubic(), cfg, window=WIDE, progress=False)
    out = pydicom.dcmread(dicoms(tmp_path / "out")[0])
    assert list(out.ImageType) == ["DERIVED", "SECONDARY", "LOCALIZER", "EXTRA"]


# --- Never an output that cannot be read back; no upscale of non-finite HU ----------------------------

def _broken_copy(shared_data, folder: Path, **changes) -> Path:
    """A copy of the real 693_UNCR slice in `folder` with header `changes` (possibly invalid values)."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(shared_data / "dicom" / "head-ncct" / "pydicom-data_693_UNCR.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about invalid values (NaN)
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
    ds.save_as(folder / "im.dcm")
    return folder / "im.dcm"


def _assert_named_skip_and_nothing_written(summary_or_error, path: Path, out: Path, caplog, *words) -> None:
    assert caplog.text.count(str(dicom_io.relpath(str(path)))) == 1, caplog.text
    line = next(line for line in caplog.text.splitlines() if "skipped" in line and path.name in line)
    assert all(word in line for word in words), line
    assert "Traceback" not in caplog.text
    assert not list(out.glob("**/*.dcm")) and not list(out.glob(".*"))


@pytest.mark.parametrize("changes, words", [
    ({"Rows": 0}, ()),
    ({"RescaleSlope": "NaN"}, ("finite",)),
    ({"RescaleIntercept": "inf"}, ("finite",)),
], ids=["rows-0", "nan-slope", "inf-intercept"])
def test_unreadable_or_non_finite_source_is_a_named_skip(shared_data, cfg, tmp_path, caplog, changes, words):
    src = _broken_copy(shared_data, tmp_path / "in", **changes)
    with pytest.raises(upscale.UpscaleError) as info:
        upscale.upscale([src.parent], tmp_path / "out", inference.bicubic(), cfg, window=WIDE, progress=False)
    assert "1 file(s) skipped" in str(info.value)
    _assert_named_skip_and_nothing_written(info, src, tmp_path / "out", caplog, *words)


def test_non_finite_hu_and_model_output_are_refused(cfg):
    hu = np.zeros((16, 16), np.float32)
    method = inference.bicubic()
    options = upscale.UpscaleOptions(method, WIDE, "bicubic", tile=0, tile_pad=0)
    assert series_output.checked_super_resolve(hu, options).shape == (64, 64)
    hu[3, 4] = np.nan
    with pytest.raises(ValueError, match="source image has 1 non-finite"):
        series_output.checked_super_resolve(hu, options)
    with pytest.raises(ValueError, match="source image is empty"):
        series_output.checked_super_resolve(np.zeros((0, 16), np.float32), options)


def _diverged(method: inference.Method) -> inference.Method:
    """`method` with one output pixel NaN and one +inf: a model whose weights went bad."""
    def predict(lr):
        sr = method.predict(lr).copy()
        sr[:, 5, 7, 0], sr[:, 9, 2, 0] = np.nan, -np.inf
        return sr

    return inference.Method("diverged", predict, method.scale, {"method": "diverged"})


@pytest.mark.parametrize("fmt", ["dicom", "npy"])
def test_non_finite_model_output_is_a_named_skip(phantom_dir, cfg, tmp_path, caplog, fmt):
    source_dir = phantom_dir / "patient00" / "01_ncct"
    with pytest.raises(upscale.UpscaleError, match="no series could be upscaled"):
        upscale.upscale([source_dir], tmp_path / "out", _diverged(inference.bicubic()), cfg, fmt=fmt,
                        window=Window(40, 80), outside="clip", progress=False)
    for path in source_dir.glob("*.dcm"):
        [line] = [line for line in caplog.text.splitlines() if path.name in line]
        assert "model output has 2 non-finite" in line
    assert not list((tmp_path / "out").iterdir())


def test_written_dicom_is_read_back_before_it_counts(shared_data, cfg, tmp_path):
    """write_dicom reads its file back: pixels that do not survive the round trip are not written."""
    src = shared_data / "dicom" / "head-ncct" / "pydicom-data_693_UNCR.dcm"
    uids = derived_dicom.SeriesUids(series="1.2.3", frame_of_reference="1.2.4", study="1.2.5")
    target = tmp_path / "IM00001.dcm"
    derived_dicom.write_dicom(str(src), np.full((64, 64), 40.0, np.float32), target, uids, inference.bicubic(), WIDE)
    assert pydicom.dcmread(target).pixel_array.shape == (64, 64)
    with pytest.raises(ValueError, match="does not read back"):
        derived_dicom.write_dicom(str(src), np.zeros((0, 64), np.float32), tmp_path / "IM00002.dcm", uids,
                                  inference.bicubic(), WIDE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["IM00001.dcm"]  # no temporary file left


def test_two_valued_pixel_padding_is_upscaled_or_skipped_with_a_reason(shared_data, cfg, tmp_path, caplog):
    from pydicom.dataelem import DataElement

    ds = pydicom.dcmread(shared_data / "dicom" / "head-ncct" / "pydicom-data_693_UNCR.dcm")
    ds["PixelPaddingValue"] = DataElement(0x00280120, "SS", [-2000, -2000])
    (tmp_path / "in").mkdir()
    ds.save_as(tmp_path / "in" / "im.dcm")
    try:
        summary = upscale.upscale([tmp_path / "in"], tmp_path / "out", inference.bicubic(), cfg, window=WIDE,
                                  progress=False)
    except upscale.UpscaleError:
        [line] = [line for line in caplog.text.splitlines() if "im.dcm" in line]
        assert "skipped" in line and "PixelPadding" in line
    else:
        assert summary.images == 1
        out = pydicom.dcmread(dicoms(tmp_path / "out")[0])
        assert "PixelPaddingValue" not in out and out.pixel_array.shape == (2048, 2048)
    assert "Traceback" not in caplog.text


# --- --overwrite replaces only what upscale made -------------------------------------------------------

def _series_snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_refuses_an_out_that_holds_the_input(shared_data, cfg, tmp_path):
    source = shared_data / "dicom" / "chest-series" / "dcmqi_ct-3slice_01.dcm"
    out = tmp_path / "out"
    [series] = upscale.upscale([source], out, inference.bicubic(), cfg, fmt="png", progress=False).series
    # The source itself put into its own output series folder, then upscaled from there with --overwrite.
    inside = series / "source.dcm"
    shutil.copyfile(source, inside)
    before = _series_snapshot(out)
    with pytest.raises(upscale.UpscaleError, match=r"holds the input .*source\.dcm.*outside the input"):
        upscale.upscale([inside], out, inference.bicubic(), cfg, fmt="png", overwrite=True, progress=False)
    assert _series_snapshot(out) == before

    # --out the input folder itself: the second run would read its own output and replace it.
    folder = tmp_path / "scans"
    _copy(source, folder / source.name)
    upscale.upscale([folder], folder, inference.bicubic(), cfg, fmt="png", progress=False)
    before = _series_snapshot(folder)
    result = CliRunner().invoke(main, ["upscale", str(folder), "--out", str(folder), "--model", "bicubic",
                                       "--format", "png", "--overwrite", "--no-progress",
                                       "--config", str(SMALL_CONFIG)])
    assert result.exit_code != 0 and "holds the input" in result.output and "Traceback" not in result.output
    assert _series_snapshot(folder) == before


def test_check_replaceable_protects_an_input_inside_the_series_folder(shared_data, tmp_path):
    """The per-folder check (the run-level one above fires first for inputs under --out)."""
    from tfgan_ct import fileio

    folder = tmp_path / "001_x4"
    folder.mkdir()
    source = shutil.copyfile(shared_data / "dicom" / "chest-series" / "dcmqi_ct-3slice_01.dcm",
                             folder / "IM00001.dcm")
    with pytest.raises(fileio.OutputError, match="holds the input"):
        fileio.check_replaceable(folder, upscale._inputs_under(folder, [Path(source).resolve()]),
                                 series_output.is_our_series, "a series folder of upscale")
    assert not series_output.is_our_series(folder)  # named like ours, but not derived by tfgan-ct


@pytest.mark.parametrize("foreign", ["notes.txt", "IM00009.dcm", "sub/"])
def test_overwrite_refuses_a_series_folder_with_foreign_files(shared_data, cfg, tmp_path, foreign):
    source = shared_data / "dicom" / "chest-series" / "dcmqi_ct-3slice_01.dcm"
    out = tmp_path / "out"
    [series] = upscale.upscale([source], out, inference.bicubic(), cfg, window=WIDE, progress=False).series
    assert series_output.is_our_series(series)
    if foreign.endswith("/"):
        (series / foreign).mkdir()
    elif foreign.endswith(".dcm"):
        shutil.copyfile(source, series / foreign)  # a DICOM named like ours that tfgan-ct did not derive
    else:
        (series / foreign).write_text("the radiologist's notes\n")
    before = _series_snapshot(out)
    with pytest.raises(upscale.UpscaleError,
                       match="^nothing written: .*not a series folder of upscale made by tfgan-ct"):
        upscale.upscale([source], out, inference.bicubic(), cfg, window=WIDE, overwrite=True, progress=False)
    assert _series_snapshot(out) == before and (series / foreign.rstrip("/")).exists()
    assert not list(out.glob(".*"))


@pytest.mark.parametrize("fmt", ["dicom", "png", "npy"])
def test_overwrite_replaces_its_own_series_folder(phantom_dir, cfg, tmp_path, fmt):
    source_dir = phantom_dir / "patient00" / "01_ncct"
    first = upscale.upscale([source_dir], tmp_path, inference.bicubic(), cfg, fmt=fmt, progress=False)
    assert series_output.is_our_series(first.series[0])
    again = upscale.upscale([source_dir], tmp_path, inference.bicubic(), cfg, fmt="dicom", overwrite=True,
                            progress=False)
    assert again.series == first.series and len(dicoms(tmp_path)) == again.images


# --- Disk full ---------------------------------------------------------------------------------------

def test_disk_full_is_one_line_and_leaves_nothing_half_written(phantom_dir, tmp_path, monkeypatch):
    """A full disk cannot be made safely in a test: the DICOM writer is made to fail as a full disk
    does (half a file written, then OSError ENOSPC) on the third image of the second series."""
    sources = [phantom_dir / "patient00" / "01_ncct", phantom_dir / "patient01" / "01_ncct"]
    writes = []
    real_save = pydicom.dataset.Dataset.save_as

    def save_as(ds, filename, *args, **kwargs):
        writes.append(filename)
        if len(writes) == 4 + 3:  # 4 images in the first series
            Path(filename).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real_save(ds, filename, *args, **kwargs)

    monkeypatch.setattr(pydicom.dataset.Dataset, "save_as", save_as)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["upscale", *map(str, sources), "--out", str(out), "--model", "bicubic",
                                       "--no-progress", "--config", str(SMALL_CONFIG)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    [line] = [line for line in result.output.splitlines() if "no space left" in line]
    assert "incomplete series was removed" in line and "1 series written before it are complete" in line
    assert result.output.count("no space left") == 1
    # The first series is complete; of the second nothing remains, not even its staging.
    [complete] = [p for p in out.iterdir()]
    assert len(list(complete.glob("*.dcm"))) == 4 and not list(out.glob(".*"))
    for path in complete.glob("*.dcm"):
        assert pydicom.dcmread(path).pixel_array.shape == (512, 512)


# --- Interrupted runs --------------------------------------------------------------------------------

def test_stale_staging_in_out_is_removed_at_start(phantom_dir, cfg, tmp_path, caplog):
    """A killed run's staging (here: one of a process that no longer exists) in --out goes first."""
    from tfgan_ct import fileio

    out = tmp_path / "out"
    dead_pid = 2 ** 22  # above Linux's largest pid_max (and macOS's): no process has it
    stale = out / f".other_series_x4.partial-{fileio._host()}-{dead_pid}-abc"
    stale.mkdir(parents=True)
    (stale / "IM00001.dcm").write_bytes(b"identified pixels")
    upscale.upscale([phantom_dir / "patient00" / "01_ncct"], out, inference.bicubic(), cfg, fmt="png",
                    progress=False)
    assert not stale.exists() and not list(out.glob(".*"))
    assert f"removed {stale}" in caplog.text


def _upscale_command(source: Path, out: Path, models: Path) -> list[str]:
    return [sys.executable, "-m", "tfgan_ct.cli", "upscale", str(source), "--out", str(out),
            "--models-dir", str(models), "--model", "ncct", "--tile", "8", "--tile-pad", "4",
            "--no-progress", "--config", str(SMALL_CONFIG)]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _comparable(path: Path) -> tuple[np.ndarray, dict]:
    """Pixels and the attributes of a derived image that two runs must share (not its UIDs or
    creation date and time)."""
    ds = pydicom.dcmread(path)
    varying = {"InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime"}
    attributes = {elem.keyword or str(elem.tag): elem.value for elem in ds
                  if elem.VR != "UI" and elem.keyword not in varying and elem.keyword != "PixelData"}
    return ds.pixel_array, attributes


@pytest.mark.slow
def test_killed_upscale_leaves_no_staging_after_the_next_run(phantom_dir, tiny_export, tmp_path):
    """SIGKILL while a series is being written, run again: no staging left, and the output is the
    one an uninterrupted run writes (pixels and non-UID attributes)."""
    source = phantom_dir / "patient00" / "02_ctp"  # 12 images in one series
    out = tmp_path / "out"
    command = _upscale_command(source, out, tiny_export)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob(".*.partial-*/IM*.dcm")):
            assert process.poll() is None, "upscale ended before it could be interrupted"
            assert time.monotonic() < deadline, "no staging folder with images appeared"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert list(out.glob(".*.partial-*/IM*.dcm")), "the killed run left no staging (test premise)"
    assert not [p for p in out.iterdir() if not p.name.startswith(".")]

    again = _run(command)
    assert "left by an interrupted run" in again.stderr
    assert not list(out.glob(".*"))
    _run(_upscale_command(source, tmp_path / "reference", tiny_export))
    [series] = [p for p in out.iterdir() if p.is_dir()]
    [reference] = [p for p in (tmp_path / "reference").iterdir() if p.is_dir()]
    assert series.name == reference.name
    names = sorted(p.name for p in series.iterdir())
    assert names == sorted(p.name for p in reference.iterdir()) and len(names) == 12
    for name in names:
        pixels, attributes = _comparable(series / name)
        ref_pixels, ref_attributes = _comparable(reference / name)
        np.testing.assert_array_equal(pixels, ref_pixels)
        assert attributes == ref_attributes


def test_skipped_images_carry_a_reason_code(shared_data, cfg, tmp_path):
    """The good slices of a series are written; the bad one is counted under a stable code."""
    series = sorted((shared_data / "dicom" / "chest-series").glob("*.dcm"))
    folder = tmp_path / "in"
    for p in series:
        _copy(p, folder / p.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid DS value
        _copy(series[0], folder / series[0].name, RescaleIntercept="inf")
    summary = upscale.upscale([folder], tmp_path / "out", inference.bicubic(), cfg, window=WIDE, progress=False)
    assert summary.images == 2 and len(dicoms(tmp_path / "out")) == 2
    [item] = summary.skipped
    assert Path(item.path).name == series[0].name and item.code == "non-finite-hu"
    assert item.code in {**dicom_io.REASONS, **series_output.REASONS}


def test_derived_series_are_never_sources(phantom_dir, cfg, tmp_path):
    """An output folder inside the inputs (or an earlier output given as input) is not
    upscaled again: each of its images is a named skip, the source series is done once."""
    source_dir = phantom_dir / "patient00" / "01_ncct"
    first = upscale.upscale([source_dir], tmp_path / "sr", inference.bicubic(), cfg, window=WIDE, progress=False)
    derived = dicoms(tmp_path / "sr")
    assert len(derived) == first.images > 0
    again = upscale.upscale([source_dir, tmp_path / "sr"], tmp_path / "sr2", inference.bicubic(), cfg,
                            window=WIDE, progress=False)
    assert len(again.series) == 1 and again.images == first.images
    report = tmp_path / "sr" / upscale.TRUST_REPORT
    assert sorted(s.path for s in again.skipped) == sorted(str(p) for p in [*derived, report])
    assert {s.code for s in again.skipped} == {"own-output"}


def test_trust_figures_references_and_seeded_uids(phantom_dir, cfg, tmp_path):
    """Every derived image carries its LR consistency and names its source series; trust_report.json
    holds the figures per series; a UID seed makes a second run give the same UIDs, none does not."""
    source_dir = phantom_dir / "patient00" / "01_ncct"
    source = pydicom.dcmread(sorted(source_dir.glob("*.dcm"))[0], stop_before_pixels=True)
    runs = {}
    for name, seed in (("a", "model-x"), ("b", "model-x"), ("c", None)):
        summary = upscale.upscale([source_dir], tmp_path / name, inference.bicubic(), cfg, window=WIDE,
                                  progress=False, uid_seed=seed)
        runs[name] = [pydicom.dcmread(p, stop_before_pixels=True) for p in dicoms(tmp_path / name)]
    first = runs["a"][0]
    assert re.fullmatch(r"LR consistency mean [\d.]+ HU, max [\d.]+ HU \(brain\)", first.ImageComments)
    assert first.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert first.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == \
        first.SourceImageSequence[0].ReferencedSOPInstanceUID
    assert [d.SOPInstanceUID for d in runs["a"]] == [d.SOPInstanceUID for d in runs["b"]]
    assert runs["a"][0].SeriesInstanceUID == runs["b"][0].SeriesInstanceUID
    assert not {d.SOPInstanceUID for d in runs["a"]} & {d.SOPInstanceUID for d in runs["c"]}
    assert runs["a"][0].SeriesInstanceUID != runs["c"][0].SeriesInstanceUID

    report = json.loads((tmp_path / "c" / upscale.TRUST_REPORT).read_text())
    [(folder, entry)] = report["series"].items()
    assert folder == summary.series[0].name and entry["images"] == len(runs["c"])
    assert len(entry["per_image"]) == entry["images"] and entry["lr_consistency"]["pixels"] > 0
    # bicubic up then the same bicubic down is close to the identity: ~6 HU on average in the
    # phantom's brain (edges such as the skull's give the maximum)
    assert entry["lr_consistency"]["mean_hu"] < 10, entry["lr_consistency"]
    assert entry["summary"].startswith("LR consistency mean ") and entry["summary"].endswith(" HU (brain)")
    assert source.SeriesInstanceUID not in json.dumps(report) and str(source.PatientName) not in json.dumps(report)


def test_uncertainty_series_from_the_command_line(phantom_dir, tiny_export, tmp_path):
    source = phantom_dir / "patient01" / "03_cta"
    args = ["upscale", str(source), "--models-dir", str(tiny_export), "--model", "ncct", "--no-progress",
            "--config", str(SMALL_CONFIG), "--out", str(tmp_path / "out"), "--uncertainty"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    [series] = [p for p in (tmp_path / "out").iterdir() if p.is_dir() and not p.name.endswith("_spread")]
    spread = series.with_name(series.name + "_spread")
    images, spreads = sorted(series.glob("*.dcm")), sorted(spread.glob("*.dcm"))
    assert len(images) == len(spreads) == len(list(source.glob("*.dcm")))
    first, spread_first = pydicom.dcmread(images[0]), pydicom.dcmread(spreads[0])
    assert spread_first.SeriesInstanceUID != first.SeriesInstanceUID
    assert derived_dicom.derivation_kind(spread_first.DerivationDescription) == derived_dicom.SPREAD
    assert derived_dicom.derivation_kind(first.DerivationDescription) == derived_dicom.SR
    assert spread_first.pixel_array.min() >= 0 and spread_first.pixel_array.shape == first.pixel_array.shape
    assert json.loads((tmp_path / "out" / upscale.TRUST_REPORT).read_text())["series"][series.name][
        "spread_series"] == spread.name
    npy = CliRunner().invoke(main, [*args[:-3], "--out", str(tmp_path / "npy"), "--format", "npy", "--uncertainty"])
    assert npy.exit_code == 1 and "DICOM only" in npy.output

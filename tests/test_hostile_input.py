"""A corpus of hostile files, mixed with good ones, through `convert` and `upscale`.

Every bad file must be named once with its reason code, the batch must go on,
the good slices must be converted and upscaled, and every file written must
read back. The corpus is made from the package's own phantom DICOM (and the
broken samples in ../shared/data when they are there).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from pydicom.dataelem import RawDataElement
from pydicom.encaps import encapsulate
from pydicom.tag import Tag
from pydicom.uid import JPEG2000Lossless, generate_uid

from tfgan_ct.cli import main
from tfgan_ct.data import dicom_io

from helpers import SHARED, SMALL_CONFIG

NON_UTF8 = b"caf\xe9"  # a folder name that is not valid UTF-8 (Latin-1 "café")


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=False)
    return path


def _mutants(base: pydicom.Dataset) -> dict[str, tuple[object, set[str]]]:
    """name -> (how to change a copy of `base`, or bytes to write; the reason codes allowed)."""
    def frames(n):
        def change(ds):
            ds.NumberOfFrames = n
            ds.PixelData = b"\0" * 1000
        return change

    def setattr_(**values):
        def change(ds):
            for key, value in values.items():
                setattr(ds, key, value)
        return change

    def raw(tag, vr, value: bytes):
        """An element stored as it is, unchecked (pydicom validates values set normally)."""
        def change(ds):
            ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
        return change

    def delete(keyword):
        return lambda ds: delattr(ds, keyword)

    def rgb(ds):
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.PixelData = ds.PixelData * 3

    def j2k_garbage(ds):
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])

    def padding_two_values(ds):
        ds.add_new(0x00280120, "SS", [-2000, 0])

    return {
        "rows0.dcm": (setattr_(Rows=0), {"too-small"}),
        "tiny3x3.dcm": (setattr_(Rows=3, Columns=3, PixelData=b"\0" * 18), {"too-small"}),
        "huge-side.dcm": (setattr_(Rows=60000, Columns=60000), {"too-large"}),
        "bits8-of-16bit-data.dcm": (setattr_(BitsAllocated=8, BitsStored=8, HighBit=7), {"size-mismatch"}),
        "bits12-allocated.dcm": (setattr_(BitsAllocated=12), {"bad-header"}),
        "bitsstored-20.dcm": (setattr_(BitsStored=20, HighBit=19), {"bad-header"}),
        "frames-3000000.dcm": (frames(3_000_000), {"too-many-frames"}),
        "frames-100000.dcm": (frames(100_000), {"too-many-frames"}),
        "frames-abc.dcm": (raw(0x00280008, "IS", b"abc "), {"bad-header"}),
        "frames-0.dcm": (setattr_(NumberOfFrames=0), {"bad-header"}),
        "frame-too-many-bytes.dcm": (lambda ds: setattr(ds, "PixelData", ds.PixelData * 2), {"size-mismatch"}),
        "nan-slope.dcm": (setattr_(RescaleSlope="NaN"), {"non-finite-hu"}),
        "inf-intercept.dcm": (setattr_(RescaleIntercept="inf"), {"non-finite-hu"}),
        "overflow-slope.dcm": (setattr_(RescaleSlope="1e38"), {"non-finite-hu"}),
        "padding-two-values.dcm": (padding_two_values, {"bad-header"}),
        "mr.dcm": (setattr_(Modality="MR", SOPClassUID="1.2.840.10008.5.1.4.1.1.4"), {"not-ct"}),
        "no-pixels.dcm": (delete("PixelData"), {"no-pixels"}),
        "rgb.dcm": (rgb, {"not-grey"}),
        "rows-missing.dcm": (delete("Rows"), {"bad-header"}),
        "position-garbage.dcm": (raw(0x00200032, "DS", b"a\\b\\c "), {"bad-header"}),
        "j2k-garbage.dcm": (j2k_garbage, {"decode-failed", "size-mismatch"}),
        "unknown-syntax.dcm": (lambda ds: setattr(ds.file_meta, "TransferSyntaxUID", "1.2.3.4.5"),
                               {"decode-failed"}),
    }


def make_corpus(phantom_dir: Path, root: Path) -> tuple[dict[str, set[str]], int]:
    """Hostile files under `root/bad` (and a good phantom patient, plus files that used to
    break the tools but are valid, under `root/good`). Returns ({file name: reason codes
    allowed}, number of good single-frame images)."""
    sources = sorted((phantom_dir / "patient00" / "01_ncct").glob("*.dcm"))
    base = pydicom.dcmread(sources[0])
    bad = root / "bad"
    expected: dict[str, set[str]] = {}
    for name, (change, codes) in _mutants(base).items():
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        change(ds)
        _save(ds, bad / name)
        expected[name] = codes
    raw = sources[0].read_bytes()
    (bad / "empty.dcm").write_bytes(b"")
    (bad / "notes.dcm").write_text("patient list, not an image\n")
    (bad / "cut-in-header.dcm").write_bytes(raw[:200])
    (bad / "cut-in-pixels.dcm").write_bytes(raw[:len(raw) - 5000])
    (bad / "DICOMDIR").write_bytes(b"DICM" * 40)
    os.symlink(bad / "no-such-file.dcm", bad / "dangling.dcm")
    os.mkfifo(bad / "pipe.dcm")  # reading it would block for ever
    expected.update({"empty.dcm": {"not-dicom"}, "notes.dcm": {"not-dicom"},
                     "cut-in-header.dcm": {"not-dicom", "corrupt-header", "bad-header", "not-ct", "no-pixels"},
                     "cut-in-pixels.dcm": {"truncated"}, "DICOMDIR": {"bad-dicomdir"},
                     "dangling.dcm": {"dangling-link"}, "pipe.dcm": {"not-a-file"}})
    if shutil.which("dcmdjpeg") is None:  # without DCMTK a retired JPEG file is a named skip
        expected["retired-jpeg.dcm"] = {"retired-jpeg"}
    if SHARED.is_dir():
        for path in sorted((SHARED / "dicom/bad").iterdir()):
            shutil.copy(path, bad / f"shared-{path.name}")
            expected[f"shared-{path.name}"] = {"not-dicom", "truncated", "corrupt-header"}
    return expected, _good_files(phantom_dir, root / "good", base)


def _good_files(phantom_dir: Path, good: Path, base: pydicom.Dataset) -> int:
    """A phantom patient plus valid files that used to stop a batch; returns their image count."""
    shutil.copytree(phantom_dir / "patient01", good / "patient01")
    count = len(list((good / "patient01").rglob("*.dcm")))
    # Same two values of PixelPaddingValue: a valid (if odd) header.
    ds = copy.deepcopy(base)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.add_new(0x00280120, "SS", [-2000, -2000])
    _save(ds, good / "padding-twice.dcm")
    # No PatientID, PatientName, StudyInstanceUID or SeriesInstanceUID, in a folder whose
    # name is not UTF-8: grouped by folder, pseudonymised like any other.
    ds = copy.deepcopy(base)
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID"):
        delattr(ds, keyword)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    folder = os.fsencode(good) + b"/" + NON_UTF8
    os.makedirs(folder)
    _save(ds, Path(os.fsdecode(folder)) / "anonymous.dcm")
    # Two patients whose images share a SOP Instance UID: both are kept.
    shared_uid = generate_uid()
    for patient in ("COLLIDE-A", "COLLIDE-B"):
        ds = copy.deepcopy(base)
        ds.PatientID = patient
        ds.SeriesInstanceUID = ds.StudyInstanceUID = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = shared_uid
        _save(ds, good / f"{patient}.dcm")
    count += 4
    retired = good / "retired-jpeg.dcm"
    if shutil.which("dcmcjpeg"):
        src = sorted((phantom_dir / "patient00" / "01_ncct").glob("*.dcm"))[1]
        subprocess.run(["dcmcjpeg", "+es", str(src), str(retired)], check=True, capture_output=True)
        if shutil.which("dcmdjpeg"):
            count += 1
        else:
            shutil.move(retired, good.parent / "bad" / retired.name)
    return count


def _lines_naming(output: str, name: str) -> list[str]:
    return [line for line in output.splitlines() if f"{os.sep}{name}:" in line or f" {name}:" in line]


@pytest.fixture(scope="module")
def corpus(phantom_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    expected, good = make_corpus(phantom_dir, root)
    if not (root / "bad" / "retired-jpeg.dcm").exists():
        expected.pop("retired-jpeg.dcm", None)
    return root, expected, good


def _check_named_once(output: str, expected: dict[str, set[str]]) -> None:
    assert "Traceback" not in output, output
    for name, codes in expected.items():
        lines = _lines_naming(output, name)
        assert len(lines) == 1, (name, lines)
        assert any(f"[{code}]" in lines[0] for code in codes), (name, codes, lines[0])


def test_corpus_has_at_least_25_hostile_files(corpus):
    _, expected, _ = corpus
    assert len(expected) >= 25


def test_convert_names_every_bad_file_once_and_converts_the_rest(corpus, tmp_path):
    root, expected, good = corpus
    out = tmp_path / "dataset"
    result = CliRunner().invoke(main, ["convert", str(root), "--out", str(out), "--config", str(SMALL_CONFIG),
                                       "--set", "convert.split=1:0:0", "--modality", "ncct",
                                       "--workers", "2", "--no-progress"])
    assert result.exit_code == 0 and result.exception is None, result.output
    _check_named_once(result.output, expected)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"]["files"] == len(expected)
    by_code = manifest["skipped"]["by_reason"]
    assert set(by_code) <= set(dicom_io.REASONS), by_code
    converted = manifest["counts"]["train"]["slices"] + manifest["slices_without_brain"]
    assert converted == good, (converted, good)
    # both patients of the UID collision are in the dataset, and nobody is named
    assert manifest["counts"]["train"]["patients"] == 5  # patient01, the folder, two collisions, the rest
    assert "share one SOP Instance UID" in result.output
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"COLLIDE" not in data and NON_UTF8 not in data, path.name


def test_upscale_names_every_bad_file_once_and_writes_readable_dicom(corpus, tmp_path):
    root, expected, good = corpus
    out = tmp_path / "sr"
    result = CliRunner().invoke(main, ["upscale", str(root), "--out", str(out), "--model", "bicubic",
                                       "--window", "40,80", "--no-progress", "--config", str(SMALL_CONFIG)])
    assert result.exit_code == 0 and result.exception is None, result.output
    _check_named_once(result.output, expected)
    written = sorted(out.rglob("*.dcm"))
    assert len(written) == good
    for path in written:
        ds = pydicom.dcmread(path)
        assert np.isfinite(ds.pixel_array).all() and ds.pixel_array.shape == (ds.Rows, ds.Columns)


def test_no_dcmdjpeg_names_the_retired_syntax_and_the_tool(phantom_dir, tmp_path, monkeypatch):
    if shutil.which("dcmcjpeg") is None:
        pytest.skip("dcmcjpeg (DCMTK) not installed: no retired JPEG file can be made here")
    src = sorted((phantom_dir / "patient00" / "01_ncct").glob("*.dcm"))[0]
    path = tmp_path / "es.dcm"
    subprocess.run(["dcmcjpeg", "+es", str(src), str(path)], check=True, capture_output=True)
    reference = dicom_io.read_hu(str(src), [0], -1500)[0]
    if shutil.which("dcmdjpeg"):
        decoded = dicom_io.read_hu(str(path), [0], -1500)[0]
        assert decoded.shape == reference.shape and np.abs(decoded - reference).mean() < 20  # lossy JPEG
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(dicom_io.Unusable, match=r"1\.2\.840\.10008\.1\.2\.4\.53.*dcmdjpeg") as info:
        dicom_io.read_hu(str(path), [0], -1500)
    assert info.value.code == "retired-jpeg"


def test_a_device_given_as_input_is_a_named_skip_not_a_hang():
    skipped = []
    assert list(dicom_io.iter_files(["/dev/zero"], skipped)) == []
    assert [(item.path, item.code) for item in skipped] == [("/dev/zero", "not-a-file")]


def test_unreadable_subfolder_is_a_named_skip(phantom_dir, tmp_path):
    """A folder without read permission. Root reads every folder, so there the walk runs
    without the capabilities that override permissions (util-linux `setpriv`)."""
    tree = tmp_path / "in"
    shutil.copytree(phantom_dir / "patient00" / "01_ncct", tree / "ok")
    (tree / "locked").mkdir()
    shutil.copy(next((tree / "ok").glob("*.dcm")), tree / "locked" / "x.dcm")
    code = ("import sys; from tfgan_ct.data import dicom_io; s = []; "
            "files = list(dicom_io.iter_files([sys.argv[1]], s)); "
            "print(len(files)); print(*[f'{x.code} {x.path}' for x in s], sep='\\n')")
    command = [sys.executable, "-c", code, str(tree)]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without util-linux setpriv: every folder is readable")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    (tree / "locked").chmod(0)
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=True)
    finally:
        (tree / "locked").chmod(0o755)
    lines = done.stdout.splitlines()
    assert int(lines[0]) == len(list((tree / "ok").glob("*.dcm")))
    assert lines[1:] == [f"unreadable {tree / 'locked'}"]

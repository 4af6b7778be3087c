"""NIfTI in and out: the phantom's DICOM written as NIfTI (nibabel, dcm2niix), convert and upscale.

The volumes are made here from the phantom's DICOM series: its HU in DICOM order, and the
affine from ImagePositionPatient / ImageOrientationPatient / PixelSpacing, then stored with
other axis orders, flips, scaling and obliquity. Whatever the storage, the slices must be the
DICOM series' own.
"""
from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner

from tfgan_ct.cli import main
from tfgan_ct.config import Window, load_config
from tfgan_ct.data import convert, dicom_io, nifti, resize
from tfgan_ct.data.conversion import worker_pool
from tfgan_ct.data.nifti_geometry import orientation
from tfgan_ct.data.shards import read_records
from tfgan_ct.data.splits import salted_hash
from tfgan_ct.deploy import inference, nifti_output, upscale

from helpers import SMALL_CONFIG

WIDE = Window(1000, 6000)  # no clipping: the bicubic method then gives bicubic HU
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
OOF = -1500.0


@pytest.fixture(scope="module")
def cfg():
    return load_config(SMALL_CONFIG)


# ---------------------------------------------------------------- making NIfTI from DICOM


def dicom_volume(folder: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """HU of a DICOM series as stored DICOM-style, [columns, rows, slices(, time)] with slices
    ascending along the normal, its LPS affine, and a sidecar-like dict of its header."""
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.glob("*.dcm"))]
    paths = sorted(folder.glob("*.dcm"))
    iop = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    times = sorted({int(ds.get("TemporalPositionIndex", 1)) for ds in datasets})
    by_time: dict[int, list] = {t: [] for t in times}
    for path, ds in zip(paths, datasets):
        by_time[int(ds.get("TemporalPositionIndex", 1))].append((float(np.dot(ds.ImagePositionPatient, normal)),
                                                                   path, ds))
    stacks = []
    for t in times:
        members = sorted(by_time[t], key=lambda m: m[0])
        stacks.append(np.stack([dicom_io.read_hu(str(p), [0], OOF)[0].T for _, p, _ in members], axis=-1))
    ordered = sorted(by_time[times[0]], key=lambda m: m[0])
    first, last = ordered[0][2], ordered[-1][2]
    row_mm, col_mm = (float(v) for v in first.PixelSpacing)
    ipp0, ipp1 = (np.array([float(v) for v in ds.ImagePositionPatient]) for ds in (first, last))
    n = stacks[0].shape[-1]
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1] = iop[:3] * col_mm, iop[3:] * row_mm
    affine[:3, 2] = (ipp1 - ipp0) / (n - 1) if n > 1 else normal * float(first.SliceThickness)
    affine[:3, 3] = ipp0
    data = stacks[0] if len(stacks) == 1 else np.stack(stacks, axis=-1)
    header = {"Modality": "CT", "SeriesDescription": str(first.SeriesDescription),
              "ProtocolName": str(first.ProtocolName), "SliceThickness": float(first.SliceThickness),
              "PatientID": str(first.PatientID)}
    if "ContrastBolusAgent" in first:
        header["ContrastBolusAgent"] = str(first.ContrastBolusAgent)
    return data.astype(np.float32), affine, header


def write_nifti(path: Path, data: np.ndarray, lps_affine: np.ndarray, flips=(), perm=(0, 1, 2),
                stored="int16", slope=1.0, inter=0.0, sidecar: dict | None = None) -> Path:
    """Store HU `data` ([x, y, z(, t)], LPS affine) with spatial axes flipped (`flips`) and then
    reordered (`perm`: new axis m is old axis perm[m]); the affine follows, so the anatomy stays."""
    data, affine = data.copy(), lps_affine.copy()
    for axis in flips:
        affine[:3, 3] += affine[:3, axis] * (data.shape[axis] - 1)
        affine[:3, axis] *= -1
        data = np.flip(data, axis)
    order = list(perm) + list(range(3, data.ndim))
    data = np.transpose(data, order)
    affine[:3, :3] = affine[:3, list(perm)]
    values = (data - inter) / slope
    image = nib.Nifti1Image(np.rint(values).astype(stored) if stored != "float32" else values.astype(np.float32),
                            LPS @ affine)
    image.header.set_slope_inter(slope, inter)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, path)
    if sidecar is not None:
        nifti.sidecar_path(path).write_text(json.dumps(sidecar))
    return path


def series_hu(frames: list[dicom_io.Frame], kind: str) -> list[np.ndarray]:
    """HU slices of one series in the order convert gives them."""
    frames = sorted(frames, key=convert._slice_key(kind))
    if nifti.is_nifti_frame(frames[0]):
        return [nifti.read_hu(f.path, [f.frame], OOF, f.layout)[0] for f in frames]
    return [dicom_io.read_hu(f.path, [f.frame], OOF)[0] for f in frames]


def dicom_frames(folder: Path) -> list[dicom_io.Frame]:
    return [f for p in sorted(folder.glob("*.dcm")) for f in dicom_io.frames_of(p)]


def rotated_series(source: Path, out: Path, tilt_deg: float = 20.0, turn_deg: float = 15.0) -> Path:
    """A copy of a DICOM series with an oblique plane (tilted about x, turned about z), same pixels."""
    a, b = np.radians(tilt_deg), np.radians(turn_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    rotation = rz @ rx
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in [*rotation @ [1, 0, 0], *rotation @ [0, 1, 0]]]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in rotation @ np.array([float(v) for v in ds.ImagePositionPatient])]
        ds.save_as(out / path.name)
    return out


STORAGES = {  # name: (flips, perm) -- dcm2niix-like, slice axis first and reversed, everything flipped
    "dcm2niix": ((1,), (0, 1, 2)),
    "slices-first": ((2, 0), (2, 0, 1)),
    "transposed-flipped": ((0, 1, 2), (1, 0, 2)),
}


# ---------------------------------------------------------------- slices


@pytest.mark.parametrize("storage", sorted(STORAGES))
@pytest.mark.parametrize("series", ["01_ncct", "02_ctp", "03_cta"])
def test_same_slices_as_dicom(phantom_dir, tmp_path, series, storage):
    folder = phantom_dir / "patient01" / series
    data, affine, header = dicom_volume(folder)
    flips, perm = STORAGES[storage]
    path = write_nifti(tmp_path / "v.nii.gz", data, affine, flips, perm, slope=0.5, inter=-1024.0)
    frames = nifti.frames_of(path)
    assert not isinstance(frames, dicom_io.Skipped), frames
    kind = "ctp" if series == "02_ctp" else "ncct"
    expected = series_hu(dicom_frames(folder), kind)
    got = series_hu(frames, kind)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
    assert frames[0].pixel_spacing == pytest.approx(dicom_frames(folder)[0].pixel_spacing)


@pytest.mark.parametrize("storage", sorted(STORAGES))
def test_oblique_series_same_slices_as_its_dicom(phantom_dir, tmp_path, storage):
    folder = rotated_series(phantom_dir / "patient00" / "01_ncct", tmp_path / "oblique")
    data, affine, _ = dicom_volume(folder)
    assert abs(affine[2, 1]) > 0.1  # tilted: the rows climb in z
    flips, perm = STORAGES[storage]
    path = write_nifti(tmp_path / "oblique.nii", data, affine, flips, perm, stored="float32")
    got, expected = series_hu(nifti.frames_of(path), "ncct"), series_hu(dicom_frames(folder), "ncct")
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_orientation_rules():
    # Overlapping reconstruction: slices (0.4 mm) closer than the pixels (0.45 mm) still are slices.
    turn = orientation(np.diag([-0.45, 0.45, 0.4, 1]), (64, 64, 100))
    assert (turn.slice_axis, turn.row_axis, turn.col_axis, turn.flip_rows) == (2, 1, 0, True)
    # Cubic voxels: the axis nearest head-foot, wherever it is stored.
    cubic = np.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]])
    assert orientation(cubic, (64, 64, 64)).slice_axis == 1
    # A coronal volume: columns to the patient's left, rows down (inferior).
    turn = orientation(np.array([[-1, 0, 0, 0], [0, 0, 3, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]]), (64, 64, 20))
    assert (turn.slice_axis, turn.col_axis, turn.row_axis, turn.flip_cols, turn.flip_rows) == (2, 0, 1, False, True)


# ---------------------------------------------------------------- convert


def _run(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result.output


def _records(out: Path) -> dict[tuple[str, int], dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    records = [r for split in manifest["shards"].values() for s in split for r in read_records(out / s["file"])]
    return {(r["modality"], r["slice_index"]): r for r in records}


def _convert(inputs, out: Path, *extra: str) -> dict:
    _run(["convert", *map(str, inputs), "--out", str(out), "--config", str(SMALL_CONFIG), "--no-progress", *extra])
    return json.loads((out / "manifest.json").read_text())


def test_convert_nifti_equals_dicom_and_4d_is_ctp(phantom_dir, tmp_path):
    """The phantom's study as NIfTI (oblique, flipped, with sidecars) gives the DICOM's records."""
    patient = phantom_dir / "patient02"
    volumes = tmp_path / "nifti"
    volumes.mkdir()
    for i, series in enumerate(["01_ncct", "02_ctp", "03_cta"]):
        data, affine, header = dicom_volume(patient / series)
        flips, perm = list(STORAGES.values())[i]
        write_nifti(volumes / f"{series}.nii.gz", data, affine, flips, perm, sidecar=header)
    csv = tmp_path / "split.csv"
    csv.write_text("patient,split\nTFGANPHANTOM0002,test\n")
    from_dicom = _convert([patient], tmp_path / "dicom-ds", "--split-csv", str(csv))
    from_nifti = _convert([volumes], tmp_path / "nifti-ds", "--split-csv", str(csv), "--workers", "2")
    assert sorted(s["modality"] for s in from_nifti["series"]) == ["cta", "ctp", "ncct"]
    assert [s["patient"] for s in from_nifti["series"]] == [s["patient"] for s in from_dicom["series"]]
    reasons = {s["modality"]: s["modality_reason"] for s in from_nifti["series"]}
    assert reasons["ctp"].startswith("4-D NIfTI volume (6 time points")
    a, b = _records(tmp_path / "dicom-ds"), _records(tmp_path / "nifti-ds")
    assert sorted(a) == sorted(b) and len(a) == 4 + 12 + 4
    for key in a:
        for field in ("hr", "lr", "mask"):
            np.testing.assert_array_equal(a[key][field], b[key][field])


def test_modality_auto_and_forced(phantom_dir, tmp_path, cfg):
    data, affine, header = dicom_volume(phantom_dir / "patient00" / "02_ctp")
    write_nifti(tmp_path / "two.nii.gz", data[..., :2], affine)  # 4-D with 2 time points: still CTP
    data, affine, header = dicom_volume(phantom_dir / "patient00" / "03_cta")
    write_nifti(tmp_path / "bare.nii.gz", data, affine)  # no sidecar: NCCT
    write_nifti(tmp_path / "angio.nii.gz", data, affine, sidecar=header)  # sidecar: CTA
    frames, skipped = convert.scan([tmp_path], worker_pool(1), progress=False)
    assert not skipped
    plans = {Path(p.frames[0].path).name: p for p in convert.plan_series(frames, cfg, "auto", "s", None)}
    assert {name: p.modality for name, p in plans.items()} == {"two.nii.gz": "ctp", "bare.nii.gz": "ncct",
                                                             "angio.nii.gz": "cta"}
    assert "without a JSON sidecar" in plans["bare.nii.gz"].reason
    forced = convert.plan_series(frames, cfg, "cta", "s", None)
    assert {p.modality for p in forced} == {"cta"}


def test_dimensions(tmp_path):
    """(x, y, z, 1) is 3-D, (x, y, z, 1, t) 4-D, unless the 5th axis holds components (an intent)."""
    values = np.full((32, 32, 3, 1, 5), -1000, np.int16)
    values[8:24, 8:24] = 40
    nib.save(nib.Nifti1Image(values[..., :1], np.diag([-1, 1, 4, 1.0])), tmp_path / "three.nii.gz")
    nib.save(nib.Nifti1Image(values, np.diag([-1, 1, 4, 1.0])), tmp_path / "time.nii.gz")
    vector = nib.Nifti1Image(values[..., :3], np.diag([-1, 1, 4, 1.0]))
    vector.header.set_intent("vector")
    nib.save(vector, tmp_path / "vector.nii.gz")
    assert [f.layout.time_points for f in nifti.frames_of(tmp_path / "three.nii.gz")] == [1] * 3
    assert len(nifti.frames_of(tmp_path / "time.nii.gz")) == 15
    assert nifti.frames_of(tmp_path / "vector.nii.gz").code == "bad-dimensions"
    air = nib.Nifti1Image(np.full((32, 32, 3), -1000, np.int16), np.eye(4))  # no tissue: not HU
    nib.save(air, tmp_path / "air.nii.gz")
    assert nifti.frames_of(tmp_path / "air.nii.gz").code == "not-hu"


def _broken_inputs(folder: Path, good: tuple[np.ndarray, np.ndarray]) -> dict[str, str]:
    """Every kind of bad NIfTI beside one good volume; file name -> reason code expected."""
    data, affine = good
    write_nifti(folder / "good.nii.gz", data, affine)
    expected = {}
    packed = (folder / "good.nii.gz").read_bytes()
    (folder / "truncated.nii.gz").write_bytes(packed[: len(packed) // 2])
    expected["truncated.nii.gz"] = "truncated"
    raw = gzip.decompress(packed)
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
    header.set_data_shape((*data.shape[:2], data.shape[2] + 1))  # one slice more than the data hold
    (folder / "shape.nii.gz").write_bytes(gzip.compress(header.binaryblock + raw[348:]))
    expected["shape.nii.gz"] = "size-mismatch"
    (folder / "longer.nii").write_bytes(raw + b"\0" * 50000)
    expected["longer.nii"] = "size-mismatch"
    nan = data.copy()
    nan[5, 5, 1] = np.nan
    write_nifti(folder / "nan.nii.gz", nan, affine, stored="float32")
    expected["nan.nii.gz"] = "non-finite-hu"
    nib.save(nib.Nifti1Image(np.zeros((64, 64), np.int16), np.eye(4)), folder / "flat.nii.gz")
    expected["flat.nii.gz"] = "bad-dimensions"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 4, 2, 3), np.int16), np.eye(4)), folder / "five.nii.gz")
    expected["five.nii.gz"] = "bad-dimensions"
    eight = np.clip(data + 1024, 0, 255).astype(np.uint8)
    nib.save(nib.Nifti1Image(eight, LPS @ affine), folder / "eight.nii.gz")
    expected["eight.nii.gz"] = "not-hu"
    (folder / "noise.nii").write_bytes(b"not a nifti file at all" * 40)
    expected["noise.nii"] = "not-nifti"
    write_nifti(folder / "badjson.nii.gz", data, affine)
    (folder / "badjson.json").write_text("{not json")
    expected["badjson.nii.gz"] = "bad-sidecar"
    write_nifti(folder / "other.nii.gz", data, affine, sidecar={"Modality": "MR"})
    expected["other.nii.gz"] = "not-ct"
    for name, code in (("SMIR.Brain.XX.O.CT_CBF.77.nii", "derived-map"), ("SMIR.Brain.XX.O.MR_DWI.78.nii", "not-ct"),
                       ("sub-01_ses-1_dseg.nii.gz", "derived-map")):
        write_nifti(folder / name, data, affine)
        expected[name] = code
    return expected


def test_bad_nifti_are_named_skips_and_the_batch_goes_on(phantom_dir, tmp_path):
    data, affine, _ = dicom_volume(phantom_dir / "patient00" / "01_ncct")
    folder = tmp_path / "in"
    folder.mkdir()
    expected = _broken_inputs(folder, (data, affine))
    result = CliRunner().invoke(main, ["convert", str(folder), str(phantom_dir / "patient01" / "01_ncct"), "--out",
                                       str(tmp_path / "ds"), "--config", str(SMALL_CONFIG), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    for name, code in expected.items():
        lines = [line for line in result.output.splitlines() if f"/{name}: [" in line]
        assert len(lines) == 1 and f"[{code}]" in lines[0], (name, code, lines)
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert len(manifest["series"]) == 2  # the good volume and the DICOM series
    assert manifest["skipped"]["files"] == len(expected)
    assert set(manifest["skipped"]["by_reason"]) <= {*dicom_io.REASONS, *nifti.REASONS}
    # upscale: the same skips, the good volume written.
    summary = _upscale([folder], tmp_path / "sr", load_config(SMALL_CONFIG))
    assert {Path(s.path).name: s.code for s in summary.skipped} == expected
    assert [p.name for p in summary.series] == ["good_x4.nii.gz"]
    # The 8-bit volume is taken, as it is, when asked for.
    frames = nifti.frames_of(folder / "eight.nii.gz", require_hu=False)
    assert not isinstance(frames, dicom_io.Skipped) and len(frames) == data.shape[2]


def test_patients_from_bids_isles_and_file_names_and_no_names_written(phantom_dir, tmp_path, cfg):
    data, affine, header = dicom_volume(phantom_dir / "patient00" / "01_ncct")
    perfusion, affine4, _ = dicom_volume(phantom_dir / "patient00" / "02_ctp")
    root = tmp_path / "in"
    files = {
        "bids/sub-07/ses-1/anat/sub-07_ses-1_ct.nii.gz": "sub-07",
        "bids/sub-07/ses-2/anat/sub-07_ses-2_ct.nii.gz": "sub-07",
        "isles/TRAINING/case_1/SMIR.Brain.XX.O.CT.101/SMIR.Brain.XX.O.CT.101.nii": "TRAINING/case_1",
        "isles/TESTING/case_1/SMIR.Brain.XX.O.CT.201/SMIR.Brain.XX.O.CT.201.nii": "TESTING/case_1",
        "loose/volume42.nii.gz": "volume42",
    }
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write_nifti(root / name, data, affine)
    ctp = "isles/TRAINING/case_1/SMIR.Brain.XX.O.CT_4DPWI.102/SMIR.Brain.XX.O.CT_4DPWI.102.nii"
    (root / ctp).parent.mkdir(parents=True)
    write_nifti(root / ctp, perfusion, affine4)
    files[ctp] = "TRAINING/case_1"
    frames, skipped = convert.scan([root], worker_pool(1), progress=False)
    assert not skipped
    patients = {str(Path(f.path).relative_to(root)): f.patient for f in frames}
    assert patients == files
    assert len({f.series for f in frames}) == len(files)
    manifest = _convert([root], tmp_path / "ds")
    assert {s["patient"] for s in manifest["series"]} == {salted_hash("patient:" + p, "tfgan-ct:0")
                                                          for p in files.values()}
    assert {s["modality"] for s in manifest["series"]} == {"ncct", "ctp"}
    written = b"".join(p.read_bytes() for p in (tmp_path / "ds").iterdir() if p.is_file())
    for word in ("case_1", "TRAINING", "sub-07", "SMIR", "volume42", "isles", "bids"):
        assert word.encode() not in written, word


# ---------------------------------------------------------------- upscale


def _upscale(inputs, out: Path, cfg, fmt="auto", **kwargs) -> upscale.Summary:
    return upscale.upscale(inputs, out, inference.bicubic(), cfg, fmt=fmt, window=WIDE, progress=False, **kwargs)


def test_upscale_nifti_keeps_the_affine_rule_and_the_anatomy(phantom_dir, tmp_path, cfg):
    folder = rotated_series(phantom_dir / "patient00" / "02_ctp", tmp_path / "oblique")
    data, affine, _ = dicom_volume(folder)
    (tmp_path / "in").mkdir()
    source = write_nifti(tmp_path / "in" / "perfusion.nii.gz", data, affine, *STORAGES["slices-first"])
    summary = _upscale([source], tmp_path / "out", cfg)
    out = tmp_path / "out" / "perfusion_x4.nii.gz"
    assert summary.series == [out] and summary.images == data.shape[2] * data.shape[3]
    before, after = nib.load(source), nib.load(out)
    assert after.get_data_dtype() == np.int16 and after.header.get_slope_inter() in ((None, None), (1.0, 0.0))
    # Voxel size / 4 in the plane, first voxel's centre -3/8 of an input voxel along those axes.
    turn = nifti.frames_of(source)[0].layout.orientation
    expected = before.affine.copy()
    for axis in (turn.row_axis, turn.col_axis):
        expected[:3, 3] -= 0.375 * before.affine[:3, axis]
        expected[:3, axis] /= 4
    np.testing.assert_allclose(after.affine, expected, atol=1e-5)
    shape = list(before.shape)
    shape[turn.row_axis] *= 4
    shape[turn.col_axis] *= 4
    assert list(after.shape) == shape
    # Its slices are the bicubic x4 of the source's, in the same order.
    got, source_hu = series_hu(nifti.frames_of(out), "ctp"), series_hu(nifti.frames_of(source), "ctp")
    for a, b in zip(got, source_hu, strict=True):
        np.testing.assert_allclose(a, np.rint(resize.upscale(b, 4)), atol=1)
    # Rerun: left out; --overwrite replaces it; the output is never a source.
    again = tmp_path / "again"
    with pytest.raises(upscale.UpscaleError, match="already exists"):
        _upscale([source], tmp_path / "out", cfg)
    assert _upscale([source], tmp_path / "out", cfg, overwrite=True).series == [out]
    shutil.copy(out, tmp_path / "in" / out.name)
    summary = _upscale([tmp_path / "in"], again, cfg)
    assert [s.code for s in summary.skipped] == ["own-output"] and len(summary.series) == 1


def test_dicom_as_nifti_matches_the_derived_dicom(phantom_dir, tmp_path, cfg):
    folder = rotated_series(phantom_dir / "patient01" / "01_ncct", tmp_path / "oblique")
    as_dicom = _upscale([folder], tmp_path / "dicom", cfg)
    as_nifti = _upscale([folder], tmp_path / "nifti", cfg, fmt="nifti")
    (series_dir,), (volume,) = as_dicom.series, as_nifti.series
    assert volume.name == series_dir.name + ".nii.gz"
    image = nib.load(volume)
    data = np.asanyarray(image.dataobj)
    derived = sorted((pydicom.dcmread(p) for p in series_dir.glob("*.dcm")),
                     key=lambda d: float(np.dot(np.array(d.ImagePositionPatient, float),
                                                np.cross(np.array(d.ImageOrientationPatient[:3], float),
                                                         np.array(d.ImageOrientationPatient[3:], float)))))
    for k, ds in enumerate(derived):
        first_voxel = LPS @ image.affine @ [0, 0, k, 1]
        np.testing.assert_allclose(first_voxel[:3], np.array(ds.ImagePositionPatient, float), atol=2e-3)
        np.testing.assert_array_equal(data[:, :, k].T, ds.pixel_array)
    np.testing.assert_allclose(np.linalg.norm(image.affine[:3, :2], axis=0)[::-1],
                               [float(v) for v in derived[0].PixelSpacing], rtol=1e-5)


def test_upscale_formats_for_nifti_input(phantom_dir, tmp_path, cfg):
    data, affine, _ = dicom_volume(phantom_dir / "patient00" / "01_ncct")
    source = write_nifti(tmp_path / "ncct.nii", data, affine, *STORAGES["dcm2niix"])
    with pytest.raises(upscale.UpscaleError, match="DICOM output needs DICOM input"):
        _upscale([source], tmp_path / "dicom", cfg, fmt="dicom")
    summary = _upscale([source], tmp_path / "npy", cfg, fmt="npy")
    stack = np.load(summary.series[0] / "sr_hu.npy")
    expected = series_hu(nifti.frames_of(source), "ncct")
    np.testing.assert_allclose(stack, [resize.upscale(h, 4) for h in expected], atol=1e-3)


def test_upscale_refuses_to_replace_a_foreign_file(phantom_dir, tmp_path, cfg):
    data, affine, _ = dicom_volume(phantom_dir / "patient00" / "01_ncct")
    source = write_nifti(tmp_path / "ncct.nii.gz", data, affine)
    (tmp_path / "out").mkdir()
    foreign = tmp_path / "out" / "ncct_x4.nii.gz"
    foreign.write_bytes(b"someone else's")
    with pytest.raises(upscale.UpscaleError, match="not a volume made by tfgan-ct"):
        _upscale([source], tmp_path / "out", cfg, overwrite=True)
    assert foreign.read_bytes() == b"someone else's"
    # Two inputs of one name get a hash each.
    names = nifti_output.volume_names({("a", "1"): nifti.frames_of(source), ("b", "2"): nifti.frames_of(source)})
    assert len(set(names.values())) == 2 and all(n.startswith("ncct_") and n.endswith("_x4") for n in names.values())


def test_cli_upscale_nifti_default(phantom_dir, tmp_path):
    data, affine, _ = dicom_volume(phantom_dir / "patient00" / "01_ncct")
    source = write_nifti(tmp_path / "ncct.nii.gz", data, affine)
    output = _run(["upscale", str(source), "--out", str(tmp_path / "out"), "--model", "bicubic", "--no-progress",
                   "--config", str(SMALL_CONFIG)])
    assert "in 1 series" in output and (tmp_path / "out" / "ncct_x4.nii.gz").is_file()


# ---------------------------------------------------------------- dcm2niix


@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix not installed (apt-get install dcm2niix)")
def test_dcm2niix_volumes_give_the_dicom_records(phantom_dir, tmp_path):
    out = tmp_path / "nifti"
    out.mkdir()
    subprocess.run(["dcm2niix", "-ba", "n", "-z", "y", "-f", "%s_%d", "-o", str(out), str(phantom_dir / "patient01")],
                   check=True, capture_output=True)
    assert len(list(out.glob("*.nii.gz"))) == 3 and len(list(out.glob("*.json"))) == 3
    csv = tmp_path / "split.csv"
    csv.write_text("patient,split\nTFGANPHANTOM0001,test\n")
    from_dicom = _convert([phantom_dir / "patient01"], tmp_path / "a", "--split-csv", str(csv))
    from_nifti = _convert([out], tmp_path / "b", "--split-csv", str(csv))
    assert sorted(s["modality"] for s in from_nifti["series"]) == sorted(s["modality"] for s in from_dicom["series"])
    assert from_nifti["skipped"]["files"] == 0  # the sidecars are no inputs of their own
    a, b = _records(tmp_path / "a"), _records(tmp_path / "b")
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key]["hr"], b[key]["hr"])

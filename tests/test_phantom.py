"""Tests for the synthetic head CT phantom (tfgan_ct.demo.phantom), read back with pydicom."""
import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tfgan_ct.demo.phantom import make_dataset, make_study

SIZE = 128
STUDY = dict(ncct_slices=4, ctp_slices=2, ctp_timepoints=16, cta_slices=8)
N_PATIENTS = 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    return make_dataset(out, n_patients=N_PATIENTS, seed=0, size=SIZE, **STUDY)


def _read(path):
    return pydicom.dcmread(path)


def _hu(ds) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _disk(radius_fraction: float, size: int = SIZE) -> np.ndarray:
    """Central disk of radius ``radius_fraction * size`` pixels."""
    c = np.arange(size) + 0.5 - size / 2
    return c[None, :] ** 2 + c[:, None] ** 2 <= (radius_fraction * size) ** 2


# Air beside the head, inside the reconstruction circle: rows around the
# middle, columns 4-12 % of the width (the head spans roughly 20-80 %).
AIR = (slice(int(0.44 * SIZE), int(0.56 * SIZE)), slice(int(0.04 * SIZE), int(0.12 * SIZE)))


def test_layout_and_counts(dataset):
    assert len(dataset) == N_PATIENTS
    for study in dataset:
        assert set(study) == {"ncct", "ctp", "cta"}
        assert len(study["ncct"]) == STUDY["ncct_slices"]
        assert len(study["ctp"]) == STUDY["ctp_slices"] * STUDY["ctp_timepoints"]
        assert len(study["cta"]) == STUDY["cta_slices"]
        for paths in study.values():
            assert all(p.is_file() and p.name.startswith("IM") for p in paths)
            assert len({p.parent for p in paths}) == 1


def test_headers(dataset):
    for index, study in enumerate(dataset):
        for paths in study.values():
            ds = _read(paths[0])
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert ds.SOPClassUID == pydicom.uid.CTImageStorage
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.Modality == "CT"
            assert ds.Manufacturer == "TFGAN-CT PHANTOM"
            assert str(ds.PatientName) == f"PHANTOM^PATIENT{index:02d}"
            assert ds.PatientID == f"TFGANPHANTOM{index:04d}"
            assert (ds.Rows, ds.Columns) == (SIZE, SIZE)
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert (ds.BitsAllocated, ds.SamplesPerPixel) == (16, 1)
            assert ds.PhotometricInterpretation == "MONOCHROME2"
            assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
            # FOV 222-250 mm, head ~70 % of it.
            assert 222 / SIZE <= float(ds.PixelSpacing[0]) <= 250 / SIZE
        ncct, ctp, cta = (_read(study[k][0]) for k in ("ncct", "ctp", "cta"))
        assert "ContrastBolusAgent" not in ncct
        assert ncct.SeriesDescription == "HEAD W/O CONTRAST 5mm" and float(ncct.KVP) == 120
        assert float(ncct.SliceThickness) == 5.0
        assert ctp.SeriesDescription == "CT PERFUSION HEAD" and float(ctp.KVP) == 80
        assert ctp.ContrastBolusAgent == "IOPAMIDOL 370"
        assert cta.SeriesDescription == "CTA HEAD ANGIO" and cta.ContrastBolusAgent == "IOPAMIDOL 370"
        assert float(cta.SliceThickness) == 0.625
        assert len({ncct.SeriesInstanceUID, ctp.SeriesInstanceUID, cta.SeriesInstanceUID}) == 3
        assert ncct.StudyInstanceUID == ctp.StudyInstanceUID == cta.StudyInstanceUID
        assert ncct.FrameOfReferenceUID == ctp.FrameOfReferenceUID == cta.FrameOfReferenceUID


def test_pixel_representation_and_padding(dataset):
    for index, study in enumerate(dataset):
        ds = _read(study["ncct"][0])
        stored = ds.pixel_array
        if index % 2 == 0:
            assert (ds.PixelRepresentation, ds.BitsStored, ds.HighBit) == (0, 12, 11)
            assert ds.PixelPaddingValue == 0 and stored.dtype == np.uint16
        else:
            assert (ds.PixelRepresentation, ds.BitsStored, ds.HighBit) == (1, 16, 15)
            assert ds.PixelPaddingValue == -2000 and stored.dtype == np.int16
        outside = ~_disk(0.5)
        assert np.all(stored[outside] == ds.PixelPaddingValue)
        assert not np.any(stored[_disk(0.49)] == ds.PixelPaddingValue)


def test_ncct_hu_values(dataset):
    for study in dataset:
        slices = [_hu(_read(p)) for p in study["ncct"]]
        for hu in slices:
            assert abs(hu[AIR].mean() + 1000) < 10
            assert 20 <= hu[_disk(0.15)].mean() <= 45
        assert max(hu.max() for hu in slices) > 500          # skull


def test_slices_move_in_z(dataset):
    for study in dataset:
        for key in ("ncct", "cta"):
            z = [float(_read(p).ImagePositionPatient[2]) for p in study[key]]
            assert np.all(np.diff(z) > 0)
        step = np.diff([float(_read(p).ImagePositionPatient[2]) for p in study["cta"]])
        assert np.allclose(step, 0.625)


def test_ctp_time_series_structure(dataset):
    for study in dataset:
        headers = [_read(p) for p in study["ctp"]]
        positions = Counter(tuple(float(v) for v in ds.ImagePositionPatient) for ds in headers)
        assert len(positions) == STUDY["ctp_slices"]
        assert set(positions.values()) == {STUDY["ctp_timepoints"]}
        instance = [int(ds.InstanceNumber) for ds in headers]
        assert instance == sorted(instance) == list(range(1, len(headers) + 1))
        temporal = [int(ds.TemporalPositionIndex) for ds in headers]
        assert temporal == sorted(temporal)
        assert [int(ds.AcquisitionNumber) for ds in headers] == temporal
        times = [float(ds.AcquisitionTime) for ds in headers]
        assert np.all(np.diff(times) > 0)
        content = [float(ds.ContentTime) for ds in headers]
        assert np.all(np.diff(content) > 0)


def _ctp_stack(study) -> np.ndarray:
    """(time, slice, rows, cols) HU."""
    hu = np.stack([_hu(_read(p)) for p in study["ctp"]])
    return hu.reshape(STUDY["ctp_timepoints"], STUDY["ctp_slices"], SIZE, SIZE)


def test_ctp_arterial_bolus(dataset):
    for study in dataset:
        stack = _ctp_stack(study)
        baseline = stack[:2].mean(axis=0)
        enhancement = stack - baseline
        peak = enhancement.max(axis=0)
        vessels = peak > 100
        assert vessels.sum() >= 3
        ttp = enhancement.argmax(axis=0)[vessels]
        curves = enhancement[:, vessels]                   # (time, pixels)
        early = ttp <= np.percentile(ttp, 25)              # arteries peak first
        artery = curves[:, early].mean(axis=1)
        late = curves[:, ttp >= np.percentile(ttp, 75)].mean(axis=1)
        t_peak = int(artery.argmax())
        assert t_peak > 0
        assert artery[t_peak] > 100
        assert artery[-1] < 0.5 * artery[t_peak]           # washes out toward baseline
        assert t_peak <= int(late.argmax())


def test_ctp_noisier_than_ncct(dataset):
    for study in dataset:
        ncct = _hu(_read(study["ncct"][0]))[AIR].std()
        ctp = _hu(_read(study["ctp"][0]))[AIR].std()
        assert 3 < ncct < 8
        assert ctp > 1.8 * ncct


def test_cta_arteries_brighter_than_ncct(dataset):
    brain = _disk(0.17)
    for study in dataset:
        cta = max(np.percentile(_hu(_read(p))[brain], 99.9) for p in study["cta"])
        ncct = max(np.percentile(_hu(_read(p))[brain], 99.9) for p in study["ncct"])
        assert cta > 250
        assert cta > ncct + 150


def test_patients_differ(dataset):
    ids = [_read(study["ncct"][0]).PatientID for study in dataset]
    assert len(set(ids)) == N_PATIENTS
    studies = [_read(study["ncct"][0]).StudyInstanceUID for study in dataset]
    assert len(set(studies)) == N_PATIENTS
    first = [_read(study["ncct"][0]).pixel_array.astype(np.int32) for study in dataset]
    assert not np.array_equal(first[0], first[2])


def test_same_seed_gives_identical_files(dataset, tmp_path):
    again = make_study(tmp_path, 1, seed=0, size=SIZE, **STUDY)
    for key, paths in again.items():
        assert [p.name for p in paths] == [p.name for p in dataset[1][key]]
        for new, old in zip(paths, dataset[1][key]):
            assert new.read_bytes() == old.read_bytes()


def test_other_seed_differs(dataset, tmp_path):
    other = make_study(tmp_path, 1, seed=1, size=SIZE, ncct_slices=1, ctp_slices=1,
                       ctp_timepoints=1, cta_slices=1)
    ds_new, ds_old = _read(other["ncct"][0]), _read(dataset[1]["ncct"][0])
    assert ds_new.PatientID == ds_old.PatientID          # same fake patient number
    assert ds_new.SOPInstanceUID != ds_old.SOPInstanceUID
    assert not np.array_equal(ds_new.pixel_array, ds_old.pixel_array)


def test_parallel_writing_is_identical(tmp_path):
    small = dict(size=48, ncct_slices=1, ctp_slices=1, ctp_timepoints=2, cta_slices=1)
    serial = make_dataset(tmp_path / "serial", n_patients=2, **small)
    parallel = make_dataset(tmp_path / "parallel", n_patients=2, workers=2, **small)
    for a, b in zip(serial, parallel):
        for key in a:
            assert [p.read_bytes() for p in a[key]] == [p.read_bytes() for p in b[key]]


def _cli_main():
    """``tools.make_phantom.main``, also when the repository root is not on sys.path."""
    try:
        from tools.make_phantom import main
    except ImportError:
        path = Path(__file__).resolve().parents[1] / "tools" / "make_phantom.py"
        spec = importlib.util.spec_from_file_location("make_phantom", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        main = module.main
    return main


def test_cli(tmp_path, capsys):
    main = _cli_main()
    assert main(["--out", str(tmp_path), "--patients", "2", "--size", "32", "--ncct-slices", "1",
                 "--ctp-slices", "1", "--ctp-timepoints", "2", "--cta-slices", "1",
                 "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "patient 01" in printed and "wrote 8 DICOM files for 2 patients" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patient00", "patient01"]

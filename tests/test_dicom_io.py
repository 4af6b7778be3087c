"""Reading real CT files in every encoding the samples hold, and refusing broken ones clearly."""
import numpy as np
import pydicom
import pytest

from tfgan_ct.data import dicom_io, dicom_pixels


@pytest.mark.parametrize("name", [
    "head-ncct/pydicom-data_693_UNCR.dcm",
    "head-ncct/pydicom-data_693_J2KR.dcm",              # JPEG 2000 lossless
    "head-ncct/DICOMSamples_CT_Explicit_Little.dcm",    # signed pixels
    "cta/dwv_osirix-goudurix.dcm",                      # implicit VR, unsigned
    "cta/dwv_osirix-toutatix-100.dcm",                  # lossy JPEG 2000
    "encodings/dwv_nema-ct1_jpll.dcm",                  # JPEG Lossless process 14
    "encodings/DICOMSamples_CT_JPEG70.dcm",
    "encodings/pydicom-data_bad_sequence_jpeg_lossless.dcm",
    "legacy/DICOMSamples_CT_Implicit_Little_Headless_Retired.dcm",  # no preamble, no meta
])
def test_decodes_to_plausible_hu(shared_data, name):
    path = shared_data / "dicom" / name
    frames = dicom_io.frames_of(path)
    assert isinstance(frames, list) and len(frames) == 1, frames
    hu = dicom_io.read_hu(str(path), [0], -1500)[0]
    assert hu.dtype == np.float32 and hu.shape == (frames[0].rows, frames[0].columns)
    assert -1100 <= hu.min() < -100 < hu.max() <= 4000


def test_rescale_and_padding_match_pydicom(shared_data):
    path = shared_data / "dicom/head-ncct/pydicom-data_693_UNCR.dcm"
    ds = pydicom.dcmread(path)
    stored = ds.pixel_array
    expected = stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    hu = dicom_io.read_hu(str(path), [0], -1500)[0]
    padded = stored == ds.PixelPaddingValue
    assert padded.any()
    assert np.all(hu[padded] == dicom_io.AIR_HU)
    np.testing.assert_array_equal(hu[~padded], expected[~padded])


def test_multiframe_enhanced_ct(shared_data):
    path = shared_data / "dicom/encodings/pydicom-data_eCT_Supplemental.dcm"
    frames = dicom_io.frames_of(path)
    assert [f.frame for f in frames] == [0, 1]
    assert frames[0].pixel_spacing == (0.388672, 0.388672)
    hus = dicom_io.read_hu(str(path), [0, 1], -1500)
    stored = pydicom.dcmread(path).pixel_array
    np.testing.assert_array_equal(hus[1], stored[1].astype(np.float32) - 1024)  # per-frame intercept


def test_same_image_twice_is_merged(shared_data):
    a = dicom_io.frames_of(shared_data / "dicom/head-ncct/pydicom-data_693_J2KR.dcm")
    b = dicom_io.frames_of(shared_data / "dicom/head-ncct/pydicom-data_693_UNCR.dcm")
    merged = dicom_io.merge_duplicates(a + b)
    assert len(merged) == 1 and merged[0].duplicates == [b[0].path]


@pytest.mark.parametrize("name, reason", [
    ("bad/not_dicom.dcm", "not a DICOM file"),
])
def test_header_pass_rejects(shared_data, name, reason):
    result = dicom_io.frames_of(shared_data / "dicom" / name)
    assert isinstance(result, dicom_io.Skipped) and result.reason.startswith(reason)


@pytest.mark.parametrize("name", ["bad/truncated_header.dcm", "bad/truncated_pixeldata.dcm"])
def test_truncated_pixels_raise_readable_error(shared_data, name):
    with pytest.raises(ValueError, match="pixel data truncated"):
        dicom_io.read_hu(str(shared_data / "dicom" / name), [0], -1500)


def test_non_ct_and_pixelless(tmp_path, shared_data):
    ds = pydicom.dcmread(shared_data / "dicom/head-ncct/pydicom-data_693_UNCR.dcm")
    ds.Modality = "MR"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.save_as(tmp_path / "mr.dcm")
    assert dicom_io.frames_of(tmp_path / "mr.dcm").reason == "not CT (Modality MR)"
    ds = pydicom.dcmread(shared_data / "dicom/head-ncct/pydicom-data_693_UNCR.dcm")
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    assert dicom_io.frames_of(tmp_path / "nopix.dcm").reason == "no pixel data"


def test_dicomdir_is_followed(tmp_path, shared_data):
    from pydicom.fileset import FileSet

    fs = FileSet()
    for name in ("dcmqi_ct-3slice_01.dcm", "dcmqi_ct-3slice_02.dcm"):
        fs.add(pydicom.dcmread(shared_data / "dicom/chest-series" / name))
    fs.write(tmp_path / "media")
    files = list(dicom_io.iter_files([tmp_path / "media"]))
    assert len(files) == 2 and all(f.name != "DICOMDIR" for f in files)
    assert all(isinstance(dicom_io.frames_of(f), list) for f in files)


def test_fast_native_path_equals_pydicom(shared_data, phantom_dir):
    paths = [shared_data / "dicom/head-ncct/pydicom-data_693_UNCR.dcm",
             shared_data / "dicom/head-ncct/DICOMSamples_CT_Explicit_Little.dcm",
             shared_data / "dicom/cta/dwv_osirix-goudurix.dcm",
             shared_data / "dicom/encodings/pydicom-data_eCT_Supplemental.dcm",
             *[sorted(patient.rglob("*.dcm"))[0] for patient in sorted(phantom_dir.iterdir())]]
    for path in paths:
        ds = pydicom.dcmread(path)
        fast = dicom_pixels._native_pixels(ds)
        assert fast is not None, path
        reference = ds.pixel_array
        np.testing.assert_array_equal(fast, reference.reshape(fast.shape), err_msg=str(path))


def test_header_pass_finds_truncated_pixels_from_the_file_size(shared_data):
    """The header pass reads no pixels, yet a file cut short is skipped there: the
    pixel data's claimed length is compared with what the file holds."""
    result = dicom_io.frames_of(shared_data / "dicom/bad/truncated_pixeldata.dcm")
    assert isinstance(result, dicom_io.Skipped) and result.code == "truncated", result
    assert "298302 bytes" in result.reason and "524288" in result.reason


def test_layout_from_header_pass_reads_what_a_full_read_gives(shared_data, phantom_dir):
    """The pixel pass reads uncompressed pixels where the header pass found them, without a
    second parse; the HU equal those of a full read (rescale per frame, padding, sign)."""
    paths = [shared_data / "dicom/head-ncct/pydicom-data_693_UNCR.dcm",
             shared_data / "dicom/head-ncct/DICOMSamples_CT_Explicit_Little.dcm",
             shared_data / "dicom/cta/dwv_osirix-goudurix.dcm",
             shared_data / "dicom/encodings/pydicom-data_eCT_Supplemental.dcm",
             shared_data / "dicom/legacy/DICOMSamples_CT_Implicit_Little_Headless_Retired.dcm",
             *[sorted(patient.rglob("*.dcm"))[0] for patient in sorted(phantom_dir.iterdir())]]
    for path in paths:
        frames = dicom_io.frames_of(path)
        layout = frames[0].layout
        assert layout is not None, path
        indices = [f.frame for f in frames]
        fast = dicom_io.read_hu(str(path), indices, -1500, layout=layout)
        full = dicom_io.read_hu(str(path), indices, -1500)
        for a, b in zip(fast, full):
            assert a.dtype == np.float32
            np.testing.assert_array_equal(a, b, err_msg=str(path))
    compressed = dicom_io.frames_of(shared_data / "dicom/head-ncct/pydicom-data_693_J2KR.dcm")
    assert compressed[0].layout is None


def test_truncated_file_with_layout_still_reports_truncation(shared_data, tmp_path):
    """A file cut short between the header pass and the pixel pass."""
    path = tmp_path / "cut.dcm"
    path.write_bytes((shared_data / "dicom/head-ncct/pydicom-data_693_UNCR.dcm").read_bytes())
    frames = dicom_io.frames_of(path)
    path.write_bytes(path.read_bytes()[:300_000])
    with pytest.raises(ValueError, match="pixel data truncated"):
        dicom_io.read_hu(str(path), [0], -1500, layout=frames[0].layout)


LEGACY = "dicom/legacy/DICOMSamples_CT_Implicit_Little_Headless_Retired.dcm"
UNCR = "dicom/head-ncct/pydicom-data_693_UNCR.dcm"


def test_retired_image_position_is_used(tmp_path, shared_data):
    """Only the retired ImagePosition (0020,0030): its z is the slice position."""
    legacy = dicom_io.frames_of(shared_data / LEGACY)[0]
    assert legacy.position == pytest.approx(52.0)
    ds = pydicom.dcmread(shared_data / UNCR)
    del ds.ImagePositionPatient, ds.SliceLocation
    ds.add_new(0x00200030, "DS", [-122.5, -112.4, 33.5])
    ds.save_as(tmp_path / "retired.dcm")
    assert dicom_io.frames_of(tmp_path / "retired.dcm")[0].position == pytest.approx(33.5)


def test_no_position_is_unknown_not_zero(tmp_path, shared_data):
    ds = pydicom.dcmread(shared_data / LEGACY, force=True)
    del ds[0x00200030]
    ds.save_as(tmp_path / "nopos.dcm")
    frames = dicom_io.frames_of(tmp_path / "nopos.dcm")
    assert isinstance(frames, list) and frames[0].position is None


def test_position_key_orders_unknown_positions_last(shared_data):
    frames = [dicom_io.frames_of(shared_data / "dicom/chest-series" / f"dcmqi_ct-3slice_0{i}.dcm")[0]
              for i in (1, 2, 3)]
    frames[1].position = None
    ordered = sorted(frames, key=lambda f: (dicom_io.position_key(f.position), f.instance, f.path))
    assert ordered[-1] is frames[1]
    assert ordered[0].position < ordered[1].position


@pytest.mark.parametrize("keyword", ["SamplesPerPixel", "Rows", "Columns"])
def test_empty_header_value_is_skipped_with_reason(tmp_path, shared_data, keyword):
    ds = pydicom.dcmread(shared_data / UNCR)
    ds[keyword].value = None
    ds.save_as(tmp_path / "empty.dcm")
    result = dicom_io.frames_of(tmp_path / "empty.dcm")
    assert isinstance(result, dicom_io.Skipped), result
    assert f"{keyword} is empty" in result.reason


def test_empty_samples_per_pixel_in_legacy_file_is_skipped(tmp_path, shared_data):
    ds = pydicom.dcmread(shared_data / LEGACY, force=True)
    ds.add_new(0x00280002, "US", None)  # SamplesPerPixel, present but empty
    ds.save_as(tmp_path / "legacy.dcm")  # no preamble, no meta: read with force again
    result = dicom_io.frames_of(tmp_path / "legacy.dcm")
    assert isinstance(result, dicom_io.Skipped) and "SamplesPerPixel is empty" in result.reason


def test_bad_header_does_not_stop_the_header_pass(tmp_path, shared_data):
    """The conversion's header pass (`pool.imap(frames_of)`) reports the file and goes on."""
    from tfgan_ct.data import convert
    from tfgan_ct.data.conversion import worker_pool

    ds = pydicom.dcmread(shared_data / UNCR)
    ds.SamplesPerPixel = None
    ds.save_as(tmp_path / "bad.dcm")
    (tmp_path / "good.dcm").write_bytes((shared_data / UNCR).read_bytes())
    frames, skipped = convert.scan([tmp_path], worker_pool(1), progress=False)
    assert [f.path for f in frames] == [str(tmp_path / "good.dcm")]
    assert [(s.path, s.reason) for s in skipped] == [(str(tmp_path / "bad.dcm"),
                                                      "unusable header (SamplesPerPixel is empty)")]


@pytest.mark.parametrize("dtype,high,intercept,slope,padding,whole", [
    ("<u2", 4095, -1024.0, None, None, True),     # the usual CT
    ("<u2", 42767, -10000.0, 1.0, 0, True),       # uint16 values above 32767 that come back into int16
    ("<i2", 32767, 0.0, None, -2000, True),       # signed, padding
    ("<i2", 32767, 1.0, None, None, False),       # beyond int16: float
    ("<u2", 4095, -1024.5, None, None, False),    # fractional intercept: float
    ("<i2", 4095, -1024.0, 0.5, None, False),     # a slope: float
])
def test_whole_number_hu_equal_the_float_hu(dtype, high, intercept, slope, padding, whole):
    """`read_hu(whole=True)`'s int16 HU (conversion's fast path) are the float32 HU value
    for value; where they would not be whole or not fit int16 the float32 HU come back."""
    rng = np.random.default_rng(0)
    stored = rng.integers(np.iinfo(dtype).min, high, size=(64, 48), endpoint=True).astype(dtype)
    stored[0, 0] = high
    if padding is not None:
        stored[:3] = padding
    hu = dicom_pixels._to_whole_or_float_hu(stored, slope, intercept, padding, -1500.0)
    assert hu.dtype == (np.int16 if whole else np.float32)
    np.testing.assert_array_equal(hu.astype(np.float32),
                                  dicom_pixels._to_hu(stored, slope, intercept, padding, -1500.0))

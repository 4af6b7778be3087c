"""Reading CT DICOM: find files, read headers, group series, decode slices to HU.

Two passes keep conversion fast and robust:

1. `scan()` reads headers only (no pixel data) of every file under the inputs,
   including the files a DICOMDIR references, and returns one `Frame` per
   image (a multi-frame enhanced CT file gives one per frame) plus a
   `Skipped` line for every file that is not usable CT.
2. `read_hu()` decodes one frame to HU (float32, H x W) in a worker process,
   applying RescaleSlope/Intercept (per frame for enhanced CT) and marking
   padding / out-of-field pixels as air.

Each file is parsed once: for uncompressed little-endian 16-bit images (the
usual CT archive) the header pass also notes where the pixels lie in the file
(`PixelLayout`), and the pixel pass reads them from there without parsing the
DICOM again; anything else (compressed, big endian, truncated, ...) is read in
full by pydicom in the pixel pass.

Identifying values (patient ID, UIDs) stay in memory for grouping; only
salted hashes of them are ever written out.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import tempfile
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tfgan_ct.logs import TERMINAL_ONLY
from tfgan_ct.errors import TfganError

log = logging.getLogger("tfgan_ct.data.dicom_io")

AIR_HU = -1000.0
_DEFER = 4096  # header pass: values this large (pixel data) are left on disk, unread

# Real archives are full of slightly invalid values (a hash in a UID field, a
# number with a trailing space); read them as they are instead of warning.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

# SOP classes whose frames are CT images (plain and enhanced/legacy-converted).
CT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2",      # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",    # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",    # Legacy Converted Enhanced CT Image Storage
}

# What reading a bad header value can raise; `frames_of` turns these into a skip reason.
HEADER_ERRORS = (ValueError, TypeError, AttributeError, KeyError, IndexError)


# The smallest image accepted (rows and columns): x4 needs at least 4x4 LR pixels, and
# anything smaller than this is a localiser crop or a broken header, not a CT slice.
MIN_SIZE = 16
# The largest image side accepted: CT slices are 512-1024 pixels; more is a broken header
# (and its decoding would allocate gigabytes).
MAX_SIDE = 8192
# Most frames accepted in one file: a CTP study stored as one enhanced object has a few
# thousand; a header claiming millions is broken and would stall the header pass.
MAX_FRAMES = 20_000

# Reason codes of skipped files: stable names that summaries and manifests count by.
REASONS = {
    "unreadable": "the file or folder cannot be read",
    "not-dicom": "not a DICOM file",
    "corrupt-header": "the DICOM header cannot be parsed",
    "bad-dicomdir": "a DICOMDIR that cannot be read",
    "dangling-link": "a symbolic link to nothing",
    "not-ct": "not a CT image",
    "no-pixels": "no pixel data",
    "not-grey": "not a grey-scale image",
    "bad-header": "a header value needed is missing, empty or malformed",
    "too-small": f"image smaller than {MIN_SIZE}x{MIN_SIZE}",
    "too-large": f"image side larger than {MAX_SIDE}",
    "too-many-frames": f"more than {MAX_FRAMES} frames claimed",
    "size-mismatch": "the pixel data does not hold what the header claims",
    "truncated": "pixel data cut short",
    "retired-jpeg": "a retired JPEG transfer syntax no installed decoder reads",
    "decode-failed": "compressed pixel data that cannot be decoded",
    "non-finite-hu": "RescaleSlope/Intercept or HU not finite",
    "duplicate": "the same image as another file",
}


@dataclass(frozen=True)
class Skipped:
    """A file that was not used: `code` (a key of REASONS, counted in summaries) and a
    human-readable `reason` with the details (printed once per file)."""

    path: str
    reason: str
    code: str = "bad-header"


class Unusable(TfganError, ValueError):
    """A file that cannot be used; `code` is a key of REASONS, str(exc) the details."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code


def skipped(path, exc: ValueError) -> Skipped:
    """The Skipped line for a file whose reading raised `exc`."""
    return Skipped(str(path), str(exc), getattr(exc, "code", "bad-header"))


@dataclass(frozen=True)
class PixelLayout:
    """Where the uncompressed 16-bit grey pixels of a file lie, noted by the header pass.

    Reading `frames x rows x columns` values of `dtype` at byte `offset` gives
    what `pixel_array` gives (a test checks), without a second parse of the file.
    """

    offset: int
    dtype: str                      # "<i2" (signed) or "<u2"
    frames: int
    rows: int
    columns: int
    bits_stored: int
    padding: int | None             # PixelPaddingValue as a stored value
    rescale: tuple[tuple[float | None, float | None], ...]  # (slope, intercept) per frame


@dataclass
class Frame:
    """One CT image (a file, or one frame of a multi-frame file), header only.

    `position` is the slice position in mm along the slice normal, or None when
    the header gives none (ImagePositionPatient, SliceLocation and the retired
    ImagePosition all missing): such slices are ordered by `instance`
    (InstanceNumber), then file, and never count as repeats of one table
    position. `time` orders repeated acquisitions (CTP). Text fields are
    upper-cased for rule matching.
    """

    path: str
    frame: int                      # frame index inside the file (0 for single-frame)
    instance_uid: str               # SOP Instance UID, to spot one image stored twice
    patient: str                    # patient identity for grouping (never written out)
    series: str                     # series identity for grouping (never written out)
    position: float | None
    time: float
    instance: int
    rows: int
    columns: int
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    description: str                # series + study description + protocol name
    contrast_agent: str
    duplicates: list[str] = field(default_factory=list)  # other files holding the same image
    layout: PixelLayout | None = None  # where `path` holds the pixels, if uncompressed


def iter_files(inputs: Iterable[str | Path], skipped: list[Skipped] | None = None) -> Iterator[Path]:
    """Every file under `inputs` (files, folders; DICOMDIRs expanded), sorted, each once.

    Folders that cannot be read, links that point nowhere and DICOMDIRs that cannot
    be read are appended to `skipped` (when given) instead of being passed over.
    Raises FileNotFoundError for an input that does not exist.
    """
    report = skipped.append if skipped is not None else (lambda item: None)
    seen: set[Path] = set()
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            candidates = _walk(item, report)
        elif item.exists():
            candidates = [item]
        elif item.is_symlink():
            report(Skipped(str(item), "symbolic link to nothing", "dangling-link"))
            continue
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
        for path in candidates:
            refs = _dicomdir_files(path, report) if path.name.upper() == "DICOMDIR" else [path]
            for ref in refs:
                real = ref.resolve()  # once per file (it stats every folder on the way)
                if real not in seen:
                    seen.add(real)
                    yield ref


def _walk(folder: Path, report) -> list[Path]:
    """Files under `folder`, sorted; unreadable subfolders and dangling links are reported."""
    def unreadable(error: OSError) -> None:
        report(Skipped(str(error.filename or folder), f"folder cannot be read ({error.strerror or error})",
                       "unreadable"))

    files = []
    for root, dirs, names in os.walk(folder, onerror=unreadable):
        dirs.sort()
        for name in names:
            path = Path(root, name)
            if path.is_file():
                files.append(path)
            elif path.is_symlink() and not path.exists():
                report(Skipped(str(path), "symbolic link to nothing", "dangling-link"))
    return sorted(files)


def _dicomdir_files(path: Path, report) -> list[Path]:
    """Files referenced by a DICOMDIR (missing references are left out); [] and a report
    when it cannot be read (the files beside it are still found by a folder walk)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fileset = pydicom.fileset.FileSet(pydicom.dcmread(path))
            return sorted(Path(inst.path) for inst in fileset if Path(inst.path).is_file())
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on a broken DICOMDIR
        report(Skipped(str(path), f"DICOMDIR cannot be read ({type(exc).__name__}: {str(exc)[:120]})",
                       "bad-dicomdir"))
        return []


def read_dataset(path: str | Path, pixels: bool) -> pydicom.Dataset:
    """Read a DICOM file, also legacy files without preamble/meta (force), or raise ValueError."""
    with warnings.catch_warnings():
        # pydicom warns about every odd value; the files are judged by what can be used.
        warnings.simplefilter("ignore")
        return _read_dataset(path, pixels)


def _read_dataset(path: str | Path, pixels: bool) -> pydicom.Dataset:
    try:
        ds = pydicom.dcmread(path, defer_size=None if pixels else _DEFER)
    except InvalidDicomError:
        ds = _read_forced(path, pixels)
    except (EOFError, OSError) as exc:
        raise Unusable("unreadable", f"unreadable ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt headers
        raise Unusable("corrupt-header", f"corrupt header ({type(exc).__name__}: {str(exc)[:160]})") from None
    return ds


def _read_forced(path: str | Path, pixels: bool) -> pydicom.Dataset:
    """Read a headerless (pre-DICOM-3) file; accept it only if it looks like an image."""
    try:
        ds = pydicom.dcmread(path, force=True, defer_size=None if pixels else _DEFER)
    except Exception:  # noqa: BLE001
        raise Unusable("not-dicom", "not a DICOM file") from None
    if "Rows" not in ds or "Columns" not in ds:
        raise Unusable("not-dicom", "not a DICOM file (no DICOM header and no image attributes)")
    # Pre-DICOM-3 (ACR-NEMA) files often leave out what is implied for grey images.
    if "SamplesPerPixel" not in ds:
        ds.SamplesPerPixel = 1
    if "PhotometricInterpretation" not in ds and _int(ds, "SamplesPerPixel", 1) == 1:
        ds.PhotometricInterpretation = "MONOCHROME2"
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else
            ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


def frames_of(path: Path) -> list[Frame] | Skipped:
    """Header-only read of one file: its CT frames, or why it is skipped.

    Never raises for a bad file: an unreadable file or a missing, empty or
    malformed header value gives a `Skipped` with the reason.
    """
    path = Path(path)
    try:
        ds = read_dataset(path, pixels=False)
    except ValueError as exc:
        return skipped(path, exc)
    try:
        _check_usable(ds, path)
        frames = _frames_from_header(path, ds)
    except Unusable as exc:
        return skipped(path, exc)
    except HEADER_ERRORS as exc:
        return Skipped(str(path), f"unusable header ({exc})", "bad-header")
    try:
        layout = pixel_layout(ds)
    except HEADER_ERRORS:
        layout = None  # the pixel pass reads the file in full and says what is wrong
    for frame in frames:
        frame.layout = layout
    return frames


def _check_usable(ds: pydicom.Dataset, path: Path) -> None:
    """Raise Unusable unless `ds` is a grey-scale CT image whose pixel data can hold
    what the header claims (checked before anything is allocated for it)."""
    modality = str(ds.get("Modality", "")).upper()
    sop_class = str(ds.get("SOPClassUID", ""))
    if modality != "CT" and sop_class not in CT_SOP_CLASSES:
        raise Unusable("not-ct", f"not CT (Modality {modality or 'missing'})")
    if "PixelData" not in ds:
        raise Unusable("no-pixels", "no pixel data")
    samples = _int(ds, "SamplesPerPixel", 1)
    if samples != 1:
        raise Unusable("not-grey", f"not a grey-scale image (SamplesPerPixel {samples})")
    rows, columns, frames = _int(ds, "Rows"), _int(ds, "Columns"), _frame_count(ds)
    if rows < MIN_SIZE or columns < MIN_SIZE:
        raise Unusable("too-small", f"image too small ({rows}x{columns}; at least {MIN_SIZE}x{MIN_SIZE})")
    if rows > MAX_SIDE or columns > MAX_SIDE:
        raise Unusable("too-large", f"image too large ({rows}x{columns}; at most {MAX_SIDE} a side)")
    if frames > MAX_FRAMES:
        raise Unusable("too-many-frames", f"{frames} frames claimed (at most {MAX_FRAMES} are read)")
    bits = _int(ds, "BitsAllocated", 16)
    if bits not in (8, 16, 32):
        raise Unusable("bad-header", f"BitsAllocated {bits} (8, 16 or 32 expected)")
    stored = _int(ds, "BitsStored", bits)
    if not 1 <= stored <= bits:
        raise Unusable("bad-header", f"BitsStored {stored} with BitsAllocated {bits}")
    _check_pixel_length(ds, path, frames * rows * columns * bits // 8)


def _frame_count(ds: pydicom.Dataset) -> int:
    """NumberOfFrames (1 when absent or empty); Unusable when not a positive number."""
    value = ds.get("NumberOfFrames", 1)
    if value in (None, ""):
        return 1
    try:
        frames = int(value)
    except (TypeError, ValueError):
        raise Unusable("bad-header", f"NumberOfFrames is not a number ({value!r})") from None
    if frames < 1:
        raise Unusable("bad-header", f"NumberOfFrames {frames}")
    return frames


def _check_pixel_length(ds: pydicom.Dataset, path: Path, expected: int) -> None:
    """Compare the claimed size of the pixels (`expected` bytes, uncompressed) with what
    the file holds: native pixel data must hold `expected` bytes (not cut short, and
    not a whole frame more, e.g. 16-bit data under BitsAllocated 8); compressed data
    needs at least one 8-byte item per frame."""
    elem = ds.get_item(0x7FE00010, keep_deferred=True)
    if isinstance(elem, RawDataElement) and elem.value is not None:
        length = elem.length if elem.length == 0xFFFFFFFF else len(elem.value)
    elif isinstance(elem, RawDataElement):
        length = elem.length
        if length != 0xFFFFFFFF:  # deferred: the file may end sooner
            try:
                length = min(length, path.stat().st_size - int(elem.value_tell))
            except (OSError, TypeError):
                pass
    else:
        length = len(ds.PixelData or b"")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is not None and not syntax.is_transfer_syntax:
        raise Unusable("decode-failed", f"unknown transfer syntax {syntax}")
    if length == 0xFFFFFFFF or (syntax is not None and syntax.is_compressed):  # encapsulated
        try:
            size = path.stat().st_size
        except OSError:
            return
        frames = _frame_count(ds)
        if frames * 8 > size:
            raise Unusable("size-mismatch", f"{frames} frames claimed in a file of {size} bytes")
        return
    if length < expected:
        raise Unusable("truncated", f"pixel data truncated ({length} bytes, the header claims "
                                    f"{_shape_text(ds)} = {expected} bytes)")
    frame_bytes = expected // _frame_count(ds)
    if length - expected >= frame_bytes:
        raise Unusable("size-mismatch", f"pixel data holds {length} bytes, the header claims "
                                        f"{_shape_text(ds)} = {expected} bytes")


def _shape_text(ds: pydicom.Dataset) -> str:
    return (f"{_frame_count(ds)} frame(s) x {ds.get('Rows')} x {ds.get('Columns')} x "
            f"{int(ds.get('BitsAllocated', 16)) // 8} byte(s)")


def _int(ds: pydicom.Dataset, keyword: str, default: int | None = None) -> int:
    """Integer value of `keyword`, `default` if the tag is absent.

    Raises ValueError naming the tag when it is empty, not a number, or absent
    without a default.
    """
    if keyword not in ds:
        if default is None:
            raise ValueError(f"{keyword} missing")
        return default
    value = ds[keyword].value
    if value is None or value == "":
        raise ValueError(f"{keyword} is empty")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{keyword} is not a number ({value!r})") from None


def pixel_layout(ds: pydicom.Dataset) -> PixelLayout | None:
    """Where `ds` (read with deferred pixel data) holds its pixels, for the uncompressed
    little-endian 16-bit grey images that `_native_pixels` reads; None otherwise."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) or ds.get("BitsAllocated") != 16 \
            or int(ds.get("SamplesPerPixel", 1)) != 1:
        return None
    elem = ds.get_item(0x7FE00010, keep_deferred=True)  # PixelData, not read
    if not isinstance(elem, RawDataElement) or elem.length == 0xFFFFFFFF:  # encapsulated
        return None
    rows, cols, n = int(ds.Rows), int(ds.Columns), int(ds.get("NumberOfFrames", 1) or 1)
    if elem.length < rows * cols * n * 2:
        return None
    dtype = "<i2" if int(ds.get("PixelRepresentation", 0)) == 1 else "<u2"
    padding = ds.get("PixelPaddingValue")
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    return PixelLayout(
        offset=int(elem.value_tell), dtype=dtype, frames=n, rows=rows, columns=cols,
        bits_stored=int(ds.get("BitsStored", 16)),
        padding=None if padding is None else int(_as_stored(padding, np.dtype(dtype))),
        rescale=tuple(_rescale(ds, per_frame, shared, i) for i in range(n)))


def _frames_from_header(path: Path, ds: pydicom.Dataset) -> list[Frame]:
    """One Frame per image in `ds` (per-frame positions for enhanced CT)."""
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    orientation = _orientation(ds, shared)
    normal = np.cross(orientation[:3], orientation[3:])
    patient = str(ds.get("PatientID", "") or "") or str(ds.get("PatientName", "") or "") \
        or str(ds.get("StudyInstanceUID", "") or "") or f"folder:{path.parent}"
    series = str(ds.get("SeriesInstanceUID", "") or "") or f"folder:{path.parent}"
    description = " ".join(str(ds.get(k, "") or "") for k in
                           ("SeriesDescription", "StudyDescription", "ProtocolName")).upper()
    frames = []
    for i in range(n_frames):
        group = per_frame[i] if per_frame is not None and i < len(per_frame) else None
        position = _position(ds, group, shared)
        frames.append(Frame(
            path=str(path), frame=i, instance_uid=str(ds.get("SOPInstanceUID", "") or path),
            patient=patient, series=series,
            position=None if position is None else float(np.dot(position, normal)),
            time=_time(ds, group, i),
            instance=int(ds.get("InstanceNumber", 0) or 0),
            rows=_int(ds, "Rows"), columns=_int(ds, "Columns"),
            pixel_spacing=_pixel_spacing(ds, group, shared),
            slice_thickness=_float(_lookup(ds, group, shared, "PixelMeasuresSequence", "SliceThickness")),
            description=description,
            contrast_agent=str(ds.get("ContrastBolusAgent", "") or "").strip().upper(),
        ))
    return frames


def _first(ds, keyword):
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _lookup(ds, group, shared, sequence: str, keyword: str):
    """Value of `keyword` from the per-frame group, the shared group, or the top level."""
    for source in (group, shared):
        if source is not None and sequence in source and source[sequence].value:
            item = source[sequence].value[0]
            if keyword in item:
                return item[keyword].value
    return ds.get(keyword)


def _orientation(ds, shared) -> np.ndarray:
    value = _lookup(ds, None, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
    if value is None or len(value) != 6:
        return np.array([1.0, 0, 0, 0, 1.0, 0])
    return np.array([float(v) for v in value])


def _position(ds, group, shared) -> np.ndarray | None:
    """Position of the image in mm (x, y, z): ImagePositionPatient (per-frame, shared or
    top level), else SliceLocation (as z), else the retired ACR-NEMA ImagePosition
    (0020,0030); None when the header gives none of them."""
    value = _lookup(ds, group, shared, "PlanePositionSequence", "ImagePositionPatient")
    if value is None or len(value) != 3:
        location = _float(ds.get("SliceLocation"))
        if location is not None:
            return np.array([0.0, 0.0, location])
        value = ds.get("ImagePosition")  # retired (0020,0030), in pre-DICOM-3 files
        if value is None or len(value) != 3:
            return None
    return np.array([float(v) for v in value])


def _time(ds, group, index: int) -> float:
    """Order of the acquisition in time: temporal index, acquisition number, or clock time."""
    if group is not None and "FrameContentSequence" in group:
        item = group.FrameContentSequence[0]
        if "TemporalPositionIndex" in item:
            return float(item.TemporalPositionIndex)
        if item.get("FrameAcquisitionDateTime"):  # DT: YYYYMMDDHHMMSS.FFFFFF; the clock time orders a scan
            return _seconds(str(item.FrameAcquisitionDateTime)[8:].split("+")[0].split("-")[0])
    for keyword in ("TemporalPositionIndex", "TemporalPositionIdentifier"):
        if ds.get(keyword) is not None:
            return float(ds.get(keyword))
    for keyword in ("AcquisitionTime", "ContentTime"):
        value = str(ds.get(keyword, "") or "")
        if value:
            return _seconds(value)
    return float(ds.get("AcquisitionNumber", 0) or 0)


def _seconds(tm: str) -> float:
    """DICOM TM 'HHMMSS.FFFFFF' as seconds since midnight."""
    tm = tm.replace(":", "")
    hours, minutes = int(tm[0:2] or 0), int(tm[2:4] or 0)
    seconds = float(tm[4:] or 0)
    return hours * 3600 + minutes * 60 + seconds


def _pixel_spacing(ds, group, shared) -> tuple[float, float] | None:
    value = _lookup(ds, group, shared, "PixelMeasuresSequence", "PixelSpacing")
    if value is None or len(value) != 2:
        return None
    return float(value[0]), float(value[1])


def _float(value) -> float | None:
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def read_hu(path: str, frames: list[int], out_of_field_hu: float,
            layout: PixelLayout | None = None) -> list[np.ndarray]:
    """Decode frames of one file to HU (float32, rows x columns each).

    Padding (PixelPaddingValue) and out-of-field values (at or below
    `out_of_field_hu` after rescaling) become air (-1000 HU). With the file's
    `layout` from the header pass, the pixels are read straight from the file.
    Raises Unusable (a ValueError with a reason code) when the pixels cannot be
    decoded, do not match the header, or give HU that are not finite.
    """
    if layout is not None:
        stored = _read_layout(path, layout, frames)
        if stored is not None:
            return [_to_hu(pixels, *layout.rescale[i], layout.padding, out_of_field_hu)
                    for i, pixels in zip(frames, stored)]
        # the file is not what its header said (e.g. truncated): a full read explains
    ds = read_dataset(path, pixels=True)
    _check_usable(ds, Path(path))
    stack = _decode(ds, path)
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    padding = ds.get("PixelPaddingValue")
    if padding is not None:
        padding = _as_stored(padding, stack.dtype)
    return [_to_hu(stack[i], *_rescale(ds, per_frame, shared, i), padding, out_of_field_hu)
            for i in frames]


def _decode(ds: pydicom.Dataset, path: str) -> np.ndarray:
    """Frames x rows x columns of stored values, checked against the header's shape."""
    try:
        stack = _native_pixels(ds)
        if stack is None:
            if ds.file_meta.get("TransferSyntaxUID") in RETIRED_JPEG:
                ds = _decode_retired_jpeg(ds, path)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pixels = ds.pixel_array
            stack = pixels if _frame_count(ds) > 1 else pixels[None]
    except Unusable:
        raise
    except Exception as exc:  # noqa: BLE001 - decoders raise many types
        raise _decode_error(ds, exc) from None
    expected = (_frame_count(ds), int(ds.Rows), int(ds.Columns))
    if stack.shape != expected:
        raise Unusable("size-mismatch", f"pixel data decodes to shape {stack.shape}, the header "
                                        f"claims {expected} (BitsAllocated {ds.get('BitsAllocated')})")
    return stack


# Retired JPEG processes that pydicom's decoders (and GDCM) do not read; DCMTK's dcmdjpeg does.
RETIRED_JPEG = {
    "1.2.840.10008.1.2.4.53": "JPEG spectral selection, processes 6 & 8",
    "1.2.840.10008.1.2.4.55": "JPEG full progression, processes 10 & 12",
}


def _decode_retired_jpeg(ds: pydicom.Dataset, path: str) -> pydicom.Dataset:
    """`ds` decompressed by DCMTK's `dcmdjpeg` (a fresh Dataset), or Unusable naming the tool."""
    syntax = ds.file_meta.TransferSyntaxUID
    tool = shutil.which("dcmdjpeg")
    what = f"{RETIRED_JPEG[syntax]} ({syntax})"
    if tool is None:
        raise Unusable("retired-jpeg", f"retired transfer syntax {what}: pydicom cannot decode it; "
                                       f"install DCMTK (dcmdjpeg) to read it")
    with tempfile.TemporaryDirectory(prefix="tfgan-ct-dcmdjpeg-") as tmp:
        out = Path(tmp) / "decoded.dcm"
        done = subprocess.run([tool, str(path), str(out)], capture_output=True, text=True,
                              errors="replace", timeout=120)
        if done.returncode != 0 or not out.is_file():
            detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise Unusable("retired-jpeg", f"retired transfer syntax {what}: dcmdjpeg failed ({detail[0][:160]})")
        return read_dataset(out, pixels=True)
def _rescale(ds, per_frame, shared, index: int) -> tuple[float | None, float | None]:
    """(RescaleSlope, RescaleIntercept) of frame `index` (per-frame, shared or top level)."""
    group = per_frame[index] if per_frame is not None and index < len(per_frame) else None
    slope = _float(_lookup(ds, group, shared, "PixelValueTransformationSequence", "RescaleSlope"))
    intercept = _float(_lookup(ds, group, shared, "PixelValueTransformationSequence", "RescaleIntercept"))
    return slope, intercept


def _to_hu(stored: np.ndarray, slope, intercept, padding, out_of_field_hu: float) -> np.ndarray:
    """Stored values -> float32 HU, with padding and out-of-field pixels as air.

    Raises Unusable ("non-finite-hu") when the slope or intercept is NaN or infinite,
    or the HU overflow float32.
    """
    for name, value in (("RescaleSlope", slope), ("RescaleIntercept", intercept)):
        if value is not None and not math.isfinite(value):
            raise Unusable("non-finite-hu", f"{name} is {value}: HU would not be finite")
    hu = stored.astype(np.float32)
    if slope is not None and slope != 1:
        with np.errstate(over="ignore", invalid="ignore"):
            hu *= np.float32(slope)
        if not np.isfinite(hu).all():
            raise Unusable("non-finite-hu", f"RescaleSlope {slope} makes HU overflow")
    if intercept:
        hu += np.float32(intercept)
    outside = hu <= out_of_field_hu
    if padding is not None:
        outside |= stored == padding
    np.copyto(hu, np.float32(AIR_HU), where=outside)  # twice as fast as np.putmask
    return hu


def _read_layout(path: str, layout: PixelLayout, frames: list[int]) -> list[np.ndarray] | None:
    """The stored values of `frames` read from `path` at `layout`; None if the file is too short."""
    size = layout.rows * layout.columns
    itemsize = np.dtype(layout.dtype).itemsize
    out = []
    try:
        with open(path, "rb") as f:
            for i in frames:
                f.seek(layout.offset + i * size * itemsize)
                pixels = np.fromfile(f, layout.dtype, count=size)
                if pixels.size < size:
                    return None
                out.append(_sign_extend(pixels.reshape(layout.rows, layout.columns), layout.bits_stored))
    except OSError:
        return None
    return out


def _sign_extend(pixels: np.ndarray, bits: int) -> np.ndarray:
    """Signed values stored in fewer than 16 bits, sign-extended (as `pixel_array`)."""
    if pixels.dtype.kind == "i" and bits < 16:
        return (pixels << (16 - bits)) >> (16 - bits)
    return pixels


def _native_pixels(ds: pydicom.Dataset) -> np.ndarray | None:
    """Frames x rows x columns of uncompressed little-endian 16-bit grey pixels, read
    straight from the buffer (pydicom's general decoder costs more than the rest of a
    slice's reading); None for anything else, which goes through `pixel_array`.
    The result equals `pixel_array` (a test checks), including sign extension of
    signed values stored in fewer than 16 bits."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) or ds.get("BitsAllocated") != 16 \
            or int(ds.get("SamplesPerPixel", 1)) != 1:
        return None
    rows, cols, n = int(ds.Rows), int(ds.Columns), int(ds.get("NumberOfFrames", 1) or 1)
    data = ds.PixelData
    if len(data) < rows * cols * n * 2:
        raise ValueError(f"The number of bytes of pixel data is less than expected "
                         f"({len(data)} vs {rows * cols * n * 2} bytes)")
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    pixels = np.frombuffer(data, "<i2" if signed else "<u2", count=rows * cols * n).reshape(n, rows, cols)
    return _sign_extend(pixels, int(ds.get("BitsStored", 16)))


def _as_stored(value, dtype) -> int:
    """PixelPaddingValue as the stored pixel type (it is written with the pixel VR).

    A multi-valued padding (seen in archives as SS [-2000, -2000]) is taken when all
    its values agree; otherwise Unusable names it.
    """
    if isinstance(value, bytes):
        value = int.from_bytes(value[:2], "little", signed=np.dtype(dtype).kind == "i")
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        values = {int(v) for v in value}
        if len(values) != 1:
            raise Unusable("bad-header", f"PixelPaddingValue has several different values {sorted(values)}")
        value = values.pop()
    return np.array(int(value)).astype(dtype)


def _decode_error(ds: pydicom.Dataset, exc: Exception) -> Unusable:
    """Why pixel data could not be decoded, with its reason code."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    text = str(exc).split("\n")[0]
    if "less than expected" in text or "truncated" in text.lower():
        return Unusable("truncated", f"pixel data truncated ({text.split(' - ')[0]})")
    if syntax is not None and syntax.is_compressed:
        return Unusable("decode-failed", f"cannot decode {syntax.name} pixel data ({text[:160]})")
    return Unusable("decode-failed", f"pixel data unreadable ({text[:160]})")


def position_key(position: float | None) -> tuple[bool, float]:
    """Sort key for `Frame.position` that also takes None: known positions in order
    (mm along the normal), then the unknown ones, which the rest of a slice key
    (InstanceNumber, file, frame) orders. Use it wherever slices are sorted by
    position: None and a float cannot be compared."""
    return position is None, 0.0 if position is None else position


def merge_duplicates(frames: list[Frame], out_of_field_hu: float = -1500.0) -> list[Frame]:
    """One Frame per image: files holding the same image (same SOP instance, same
    patient, same pixels; e.g. a slice stored uncompressed and as JPEG 2000) become
    `duplicates` of the first one, tried in turn when the first cannot be decoded.

    Files that share a SOP Instance UID but belong to another patient or hold other
    pixels (archives and anonymisers do produce such collisions) are all kept, with a
    warning. Only such collisions are decoded here (HU as `read_hu` gives them).
    """
    groups: dict[tuple[str, int], list[Frame]] = defaultdict(list)
    for frame in sorted(frames, key=lambda f: (f.path, f.frame)):
        groups[(frame.instance_uid, frame.frame)].append(frame)
    kept = []
    for members in groups.values():
        images: list[Frame] = []
        for frame in members:
            same = next((image for image in images if _same_image(image, frame, out_of_field_hu)), None)
            if same is None:
                images.append(frame)
            elif frame.path not in same.duplicates:
                same.duplicates.append(frame.path)
        if len(images) > 1:
            log.warning("%s: %d files share one SOP Instance UID but hold different images (another "
                        "patient or other pixels); all are kept", ", ".join(relpath(f.path) for f in images),
                        len(images), extra=TERMINAL_ONLY)
        kept.extend(images)
    return kept


def _same_image(a: Frame, b: Frame, out_of_field_hu: float) -> bool:
    """Whether frames `a` and `b` (same SOP instance) are one image: same patient, same
    size and equal HU. When either cannot be decoded they count as one (the copy that
    decodes is used, the other reported when tried)."""
    if a.patient != b.patient or (a.rows, a.columns) != (b.rows, b.columns):
        return False
    try:
        hu_a = read_hu(a.path, [a.frame], out_of_field_hu, a.layout)[0]
        hu_b = read_hu(b.path, [b.frame], out_of_field_hu, b.layout)[0]
    except ValueError:
        return True
    return bool(np.array_equal(hu_a, hu_b))


def relpath(path: str) -> str:
    """Path relative to the working folder when shorter (for log lines)."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return rel if len(rel) < len(path) else path

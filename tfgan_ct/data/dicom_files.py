"""Finding DICOM files and judging whether each is usable CT; why a file is skipped.

`iter_files` walks the inputs (DICOMDIRs expanded), `read_dataset` opens a file
(legacy files without preamble too), `check_usable` rejects what is not a grey
CT image whose pixel data can hold what the header claims. A file that cannot
be used becomes a `Skipped` line with a stable reason code (`REASONS`).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tfgan_ct.errors import TfganError

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
    "not-a-file": "a device, pipe or socket, not a file",
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
        elif not item.exists() and not item.is_symlink():
            raise FileNotFoundError(f"{item}: no such file or folder")
        else:
            candidates = _regular_files([item], report)
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
        files.extend(_regular_files([Path(root, name) for name in names], report))
    return sorted(files)


def _regular_files(paths: list[Path], report) -> list[Path]:
    """The regular files among `paths`; links to nothing and devices, pipes or sockets
    (reading /dev/zero or a pipe would never end) are reported instead."""
    files = []
    for path in paths:
        if path.is_file():
            files.append(path)
        elif path.is_symlink() and not path.exists():
            report(Skipped(str(path), "symbolic link to nothing", "dangling-link"))
        else:
            report(Skipped(str(path), "not a regular file (a device, pipe or socket)", "not-a-file"))
    return files


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
    if "PhotometricInterpretation" not in ds and int_value(ds, "SamplesPerPixel", 1) == 1:
        ds.PhotometricInterpretation = "MONOCHROME2"
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else
            ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds



def check_usable(ds: pydicom.Dataset, path: Path) -> None:
    """Raise Unusable unless `ds` is a grey-scale CT image whose pixel data can hold
    what the header claims (checked before anything is allocated for it)."""
    modality = str(ds.get("Modality", "")).upper()
    sop_class = str(ds.get("SOPClassUID", ""))
    if modality != "CT" and sop_class not in CT_SOP_CLASSES:
        raise Unusable("not-ct", f"not CT (Modality {modality or 'missing'})")
    if "PixelData" not in ds:
        raise Unusable("no-pixels", "no pixel data")
    samples = int_value(ds, "SamplesPerPixel", 1)
    if samples != 1:
        raise Unusable("not-grey", f"not a grey-scale image (SamplesPerPixel {samples})")
    rows, columns, frames = int_value(ds, "Rows"), int_value(ds, "Columns"), frame_count(ds)
    if rows < MIN_SIZE or columns < MIN_SIZE:
        raise Unusable("too-small", f"image too small ({rows}x{columns}; at least {MIN_SIZE}x{MIN_SIZE})")
    if rows > MAX_SIDE or columns > MAX_SIDE:
        raise Unusable("too-large", f"image too large ({rows}x{columns}; at most {MAX_SIDE} a side)")
    if frames > MAX_FRAMES:
        raise Unusable("too-many-frames", f"{frames} frames claimed (at most {MAX_FRAMES} are read)")
    bits = int_value(ds, "BitsAllocated", 16)
    if bits not in (8, 16, 32):
        raise Unusable("bad-header", f"BitsAllocated {bits} (8, 16 or 32 expected)")
    stored = int_value(ds, "BitsStored", bits)
    if not 1 <= stored <= bits:
        raise Unusable("bad-header", f"BitsStored {stored} with BitsAllocated {bits}")
    _check_pixel_length(ds, path, (frames, rows, columns, bits // 8))


def frame_count(ds: pydicom.Dataset) -> int:
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


def _check_pixel_length(ds: pydicom.Dataset, path: Path, shape: tuple[int, int, int, int]) -> None:
    """Compare the claimed size of the pixels (`shape`: frames, rows, columns, bytes per
    value, as the header says) with what the file holds: native pixel data must hold
    that many bytes (not cut short, and not a whole frame more, e.g. 16-bit data under
    BitsAllocated 8); compressed data needs at least one 8-byte item per frame."""
    frames, rows, columns, itemsize = shape
    frame_bytes = rows * columns * itemsize
    expected = frames * frame_bytes
    claim = f"{frames} frame(s) x {rows} x {columns} x {itemsize} byte(s) = {expected} bytes"
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
        if frames * 8 > size:
            raise Unusable("size-mismatch", f"{frames} frames claimed in a file of {size} bytes")
        return
    if length < expected:
        raise Unusable("truncated", f"pixel data truncated ({length} bytes, the header claims {claim})")
    if length - expected >= frame_bytes:
        raise Unusable("size-mismatch", f"pixel data holds {length} bytes, the header claims {claim}")


# ---------------------------------------------------------------- header values


def int_value(ds: pydicom.Dataset, keyword: str, default: int | None = None) -> int:
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


def first_item(ds, keyword):
    """The first item of sequence `keyword` (e.g. SharedFunctionalGroupsSequence), or None."""
    seq = ds.get(keyword)
    return seq[0] if seq else None


def lookup(ds, group, shared, sequence: str, keyword: str):
    """Value of `keyword` from the per-frame group, the shared group, or the top level."""
    for source in (group, shared):
        if source is not None and sequence in source and source[sequence].value:
            item = source[sequence].value[0]
            if keyword in item:
                return item[keyword].value
    return ds.get(keyword)


def float_value(value) -> float | None:
    """`value` as a float; None when it is absent, empty or not a number."""
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def relpath(path: str) -> str:
    """Path relative to the working folder when shorter (for log lines)."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return rel if len(rel) < len(path) else path

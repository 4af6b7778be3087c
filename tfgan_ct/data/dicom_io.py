"""CT DICOM headers to `Frame`s, and one Frame per image across duplicate files.

The header pass (`frames_of`, run in worker processes) reads no pixel data and
gives one `Frame` per image (a multi-frame enhanced CT file gives one per
frame); the pixel pass (`read_hu`, in `dicom_pixels`) decodes them to HU.
Finding files and skip reasons are in `dicom_files`. Identifying values
(patient ID, UIDs) stay in memory for grouping; only salted hashes of them are
ever written out.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from tfgan_ct.data.dicom_files import (
    HEADER_ERRORS,
    REASONS,
    Skipped,
    Unusable,
    check_usable,
    first_item,
    float_value,
    int_value,
    iter_files,
    lookup,
    read_dataset,
    relpath,
    skipped,
)
from tfgan_ct.data.dicom_pixels import AIR_HU, PixelLayout, pixel_layout, read_hu
from tfgan_ct.logs import TERMINAL_ONLY

# Also the names other packages read from here (files and pixels live in their own modules).
__all__ = ["AIR_HU", "HEADER_ERRORS", "REASONS", "Frame", "PixelLayout", "Skipped", "Unusable", "frames_of",
           "frames_of_header", "iter_files", "merge_duplicates", "position_key", "read_dataset", "read_hu",
           "relpath", "skipped"]

log = logging.getLogger("tfgan_ct.data.dicom_io")


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
    derivation: str = ""            # DerivationDescription (how a derived image was made)



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
        check_usable(ds, path)
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



def frames_of_header(ds: pydicom.Dataset, name: str) -> list[Frame]:
    """The CT frames a header describes (e.g. from a PACS's metadata), `name` standing for its file.

    For rules that need headers only (`modality.classify`); the pixels are not checked (the
    file's own read does that). Raises one of HEADER_ERRORS for a malformed header value.
    """
    return _frames_from_header(Path(name), ds)


def _frames_from_header(path: Path, ds: pydicom.Dataset) -> list[Frame]:
    """One Frame per image in `ds` (per-frame positions for enhanced CT)."""
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    shared = first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    orientation = _orientation(ds, shared)
    normal = _cross(orientation[:3], orientation[3:])
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
            rows=int_value(ds, "Rows"), columns=int_value(ds, "Columns"),
            pixel_spacing=_pixel_spacing(ds, group, shared),
            slice_thickness=float_value(lookup(ds, group, shared, "PixelMeasuresSequence", "SliceThickness")),
            description=description,
            contrast_agent=str(ds.get("ContrastBolusAgent", "") or "").strip().upper(),
            derivation=str(ds.get("DerivationDescription", "") or ""),
        ))
    return frames


def _orientation(ds, shared) -> np.ndarray:
    value = lookup(ds, None, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
    if value is None or len(value) != 6:
        return np.array([1.0, 0, 0, 0, 1.0, 0])
    return np.array([float(v) for v in value])


def _cross(a, b) -> np.ndarray:
    """Cross product of two 3-vectors; the same values as `np.cross`, which costs more
    than the rest of a header's geometry for one pair."""
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def _position(ds, group, shared) -> np.ndarray | None:
    """Position of the image in mm (x, y, z): ImagePositionPatient (per-frame, shared or
    top level), else SliceLocation (as z), else the retired ACR-NEMA ImagePosition
    (0020,0030); None when the header gives none of them."""
    value = lookup(ds, group, shared, "PlanePositionSequence", "ImagePositionPatient")
    if value is None or len(value) != 3:
        location = float_value(ds.get("SliceLocation"))
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
    value = lookup(ds, group, shared, "PixelMeasuresSequence", "PixelSpacing")
    if value is None or len(value) != 2:
        return None
    return float(value[0]), float(value[1])


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

"""The derived DICOM image `tfgan-ct upscale` writes for one source image.

Clinical output, not training data: the image keeps the source's patient and
study (a viewer or PACS files it beside the original) and gets

- 4x Rows and Columns, PixelSpacing / 4, ImagePositionPatient moved to the
  centre of the new top-left pixel (the retired ACR-NEMA ImagePosition /
  ImageOrientation converted to the modern tags, never written back);
- new Series and SOP Instance UIDs (Study and FrameOfReference UIDs generated
  when the source has none; with a `SeriesUids.seed` they are derived from the
  source's UIDs and the seed, so writing the same series again gives the same
  UIDs and a PACS keeps one copy), ImageType DERIVED\\SECONDARY and the
  source's values 3 and on (AXIAL when it has none), a SeriesDescription and
  DerivationDescription naming the model, its version and its model card's
  hash, a SourceImageSequence and a ReferencedSeriesSequence naming the source
  series (how `tfgan-ct pacs` finds what it already made);
- the trust figures of the image (`trust.summary_text`) in ImageComments;
- the source's dates and times where valid DICOM, old ACR-NEMA forms
  (`1999.05.05`, `10:52:34`) rewritten, any other invalid value emptied (type
  2) or left out, never invented; missing type 2 attributes added empty;
- signed 16-bit HU pixels (slope 1, intercept 0), Explicit VR Little Endian,
  the model's window as WindowCenter/Width, no private tags.

Every file is read back (header and pixels) before it takes its name.
"""
from __future__ import annotations

import datetime
import re
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from tfgan_ct.config import Window
from tfgan_ct.data import dicom_io
from tfgan_ct.deploy import inference
from tfgan_ct.fileio import is_disk_full
from tfgan_ct.version import __version__

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_DROP = ("PixelPaddingValue", "PixelPaddingRangeLimit", "SmallestImagePixelValue", "LargestImagePixelValue",
         "IconImageSequence", "VOILUTSequence", "ModalityLUTSequence", "WindowCenterWidthExplanation",
         "PixelData")
# Retired ACR-NEMA geometry: converted to the modern tags (or dropped), never copied as is.
_RETIRED_GEOMETRY = ("ImagePosition", "ImageOrientation", "Location", "ImageLocation")
# Type 2 attributes of the CT Image IOD (PS3.3 A.3): present, possibly empty. Added empty when missing.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber", "PositionReferenceIndicator", "Manufacturer",
          "InstanceNumber", "SliceThickness", "KVP", "AcquisitionNumber")
# What DerivationDescription of every DICOM upscale writes starts with; recognises our series folders.
DERIVATION = "Super-resolved x"
# The two kinds of derived series: the super-resolved images, and (--uncertainty) their flip spread.
SR, SPREAD = "sr", "spread"
_SPREAD_TEXT = "; flip spread (HU) over 8 flips/rotations"
_NAMESPACE = uuid.UUID("6f1c2b0e-8f53-5b8e-9a52-7466616e2d63")  # of the derived UIDs (`name_uid`)


@dataclass
class SeriesUids:
    """UIDs of one derived series: its own, and those used when the source has none."""

    series: str
    frame_of_reference: str
    study: str
    seed: str | None = None                       # set: SOP Instance UIDs derived from the source's
    kind: str = SR                                # SR or SPREAD
    spread_series: str = ""                       # the flip-spread series' UID (--uncertainty)
    notes: set[str] = field(default_factory=set)  # geometry warnings, logged once per series

    @classmethod
    def new(cls, frame: dicom_io.Frame, header: pydicom.Dataset, study_uids: dict,
            seed: str | None = None) -> SeriesUids:
        """UIDs for the series of `frame` (first header `header`); `study_uids` maps each source
        study without a StudyInstanceUID to the one generated for it in this run.

        Without `seed` the UIDs are fresh. With one (e.g. naming the model) they are a hash of
        the seed and the source's SeriesInstanceUID (`name_uid`), so the same model writing the
        same series twice gives the same UIDs.
        """
        source = str(header.get("SeriesInstanceUID", "") or "")
        if seed is None or not source:
            return cls(series=generate_uid(), frame_of_reference=generate_uid(),
                       study=study_uids.setdefault(_study_key(frame, header), generate_uid()),
                       spread_series=generate_uid())
        return cls(series=name_uid(seed, SR, "series", source), frame_of_reference=name_uid(seed, "frame", source),
                   study=name_uid(seed, "study", source), seed=seed,
                   spread_series=name_uid(seed, SPREAD, "series", source))

    def spread(self) -> SeriesUids:
        """The UIDs of the flip-spread series that goes with this one (same study and frame)."""
        return replace(self, series=self.spread_series, kind=SPREAD)

    def instance(self, source_sop: str, frame: int = 0) -> str:
        """SOP Instance UID of the image derived from source image `source_sop` (frame `frame`)."""
        if self.seed and source_sop:
            return name_uid(self.seed, self.kind, "instance", source_sop, str(frame))
        return generate_uid()


def name_uid(*parts: str) -> str:
    """A UID made from `parts`: 2.25 and a name-based (SHA-1, version 5) UUID of them, as PS3.5
    B.2 allows. The same parts give the same UID; nothing of the parts can be read back."""
    return f"2.25.{uuid.uuid5(_NAMESPACE, chr(0).join(('tfgan-ct', *parts))).int}"


def _study_key(frame: dicom_io.Frame, header: pydicom.Dataset) -> tuple:
    """The source study of a series: its StudyInstanceUID, else patient + study ID, date and time."""
    uid = str(header.get("StudyInstanceUID", "") or "")
    if uid:
        return ("uid", uid)
    return ("patient", frame.patient, *(str(header.get(k, "") or "") for k in ("StudyID", "StudyDate", "StudyTime")))


def write_dicom(source: str, sr_hu: np.ndarray, path: Path, uids: SeriesUids,
                method: inference.Method, window: Window, comments: str | None = None) -> None:
    """One derived single-frame CT image at `path` (atomically), its header from file `source`.

    sr_hu: HU [4h, 4w] (rounded and clipped to int16); for a SPREAD series (`uids.kind`) the
    flip spread in HU, shown with a window of its own. `comments`: ImageComments (the trust
    figures). Raises dicom_io.Unusable (a ValueError with a reason code) for a multi-frame source
    or a file that cannot be written or read back; a full disk raises the OSError.
    """
    ds = dicom_io.read_dataset(source, pixels=False)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise dicom_io.Unusable("multi-frame-output", "multi-frame (enhanced) images cannot be written "
                                                      "back as DICOM yet; use --format npy or png")
    _derive_header(ds, uids, method, window)
    if comments:
        ds.ImageComments = comments
    pixels = np.clip(np.rint(sr_hu), -32768, 32767).astype("<i2")
    if uids.kind == SPREAD:
        top = float(max(np.percentile(pixels, 99.5), 1.0))
        window = Window(center=top / 2, width=top)
    _set_pixels(ds, pixels, window)
    _save_checked(ds, pixels, path)


def model_text(method: inference.Method) -> str:
    """The model as derived images name it: 'model ncct v3 (card 0123abcd...)' (card hash when known)."""
    card = method.metadata.get("card_sha256")
    return f"model {method.description}" + (f" (card {card})" if card else "")


def _derive_header(ds: pydicom.Dataset, uids: SeriesUids, method: inference.Method, window: Window) -> None:
    """Turn the source header `ds` into the derived image's (see the module docstring), pixels aside."""
    scale = method.scale
    source_sop = (str(ds.get("SOPClassUID", "") or CT_IMAGE_STORAGE), str(ds.get("SOPInstanceUID", "")))
    source_series = str(ds.get("SeriesInstanceUID", "") or "")
    for keyword in _DROP:
        if keyword in ds:
            delattr(ds, keyword)
    ds.remove_private_tags()
    for elem in [e for e in ds if e.tag.element == 0]:  # group lengths (ACR-NEMA): stale once edited
        del ds[elem.tag]
    ds.SOPClassUID = source_sop[0]
    ds.SOPInstanceUID = uids.instance(source_sop[1])
    ds.SeriesInstanceUID = uids.series
    if not str(ds.get("StudyInstanceUID", "") or "").strip():
        ds.StudyInstanceUID = uids.study
    if not str(ds.get("FrameOfReferenceUID", "") or "").strip():
        ds.FrameOfReferenceUID = uids.frame_of_reference
    spread = uids.kind == SPREAD
    ds.SeriesNumber = int(ds.get("SeriesNumber", 0) or 0) + (2000 if spread else 1000)
    ds.ImageType = _image_type(ds.get("ImageType"))
    what = f"tfgan-ct x{scale} {'spread' if spread else 'SR'} {method.description}"
    ds.SeriesDescription = f"{what} {ds.get('SeriesDescription', '') or ''}".strip()[:64]
    ds.DerivationDescription = (f"{DERIVATION}{scale} by tfgan-ct {__version__}, {model_text(method)} "
                                f"(window {window.center:g}/{window.width:g} HU)"
                                f"{_SPREAD_TEXT if spread else ''}")[:1024]
    if source_sop[1]:
        ref = pydicom.Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = source_sop
        ds.SourceImageSequence = [ref]
        if source_series:
            series = pydicom.Dataset()
            series.SeriesInstanceUID = source_series
            instance = pydicom.Dataset()
            instance.ReferencedSOPClassUID, instance.ReferencedSOPInstanceUID = source_sop
            series.ReferencedInstanceSequence = [instance]
            ds.ReferencedSeriesSequence = [series]
    note = _set_geometry(ds, scale)
    if note:
        uids.notes.add(note)
    now = datetime.datetime.now()
    ds.InstanceCreationDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = ds.ContentTime = now.strftime("%H%M%S")
    _fix_dates(ds)
    for keyword in _TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, None)


def _set_pixels(ds: pydicom.Dataset, pixels: np.ndarray, window: Window) -> None:
    """int16 HU `pixels` [rows, columns] as uncompressed signed 16-bit data, and the file meta."""
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, 0, "HU"
    ds.WindowCenter, ds.WindowWidth = f"{window.center:g}", f"{window.width:g}"
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.preamble = b"\0" * 128


def _save_checked(ds: pydicom.Dataset, pixels: np.ndarray, path: Path) -> None:
    """Save `ds` under a temporary name, read it back, then rename it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        ds.save_as(tmp, enforce_file_format=True, implicit_vr=False, little_endian=True)
    except Exception as exc:  # noqa: BLE001 - a header pydicom cannot write is reported per file
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and is_disk_full(exc):
            raise  # the whole series (and run) stops, not this image
        raise dicom_io.Unusable("write-failed", f"cannot write the derived image "
                                                f"({type(exc).__name__}: {exc})") from None
    try:
        _check_reads_back(tmp, pixels)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_reads_back(path: Path, pixels: np.ndarray) -> None:
    """Read the DICOM just written at `path` with pydicom; ValueError unless its pixel_array
    equals `pixels` (int16 [rows, columns])."""
    try:
        back = pydicom.dcmread(path)
        array = back.pixel_array
    except Exception as exc:  # noqa: BLE001 - whatever pydicom raises, the file is not usable
        raise dicom_io.Unusable("write-failed", f"the derived image does not read back "
                                                f"({type(exc).__name__}: {exc}); not written") from None
    if array.shape != pixels.shape or not np.array_equal(array, pixels):
        raise dicom_io.Unusable("write-failed", f"the derived image reads back as "
                                                f"{'x'.join(map(str, array.shape))} pixels that differ from "
                                                f"the {pixels.shape[0]}x{pixels.shape[1]} written; not written")


def _image_type(source) -> list[str]:
    """DERIVED\\SECONDARY and the source's values 3 and on; value 3 AXIAL when the source has
    none (the CT Image module needs AXIAL or LOCALIZER there)."""
    rest = [str(v).strip() for v in _values(source)[2:]]
    if not rest or not rest[0]:
        rest = ["AXIAL", *rest[1:]]
    return ["DERIVED", "SECONDARY", *rest]


# Dates, times and date-times that are type 2 in the CT Image IOD: kept (empty) when invalid.
_TYPE2_DATES = ("StudyDate", "StudyTime", "PatientBirthDate", "ContentDate", "ContentTime")
_DA = re.compile(r"(\d{4})(\d{2})(\d{2})")
_DA_ACR_NEMA = re.compile(r"(\d{4})\.(\d{2})\.(\d{2})")  # 1999.05.05
_TM = re.compile(r"(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?")
_TM_ACR_NEMA = re.compile(r"(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?")  # 10:52:34.530000
_DT = re.compile(r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{6}(?:\.\d{1,6})?|\d{2}|\d{4}))?)?)?"
                 r"(?:[+-](\d{2})(\d{2}))?")


def _fix_dates(ds: pydicom.Dataset) -> None:
    """Make every DA, TM and DT value of `ds` (and its sequences) valid DICOM: old ACR-NEMA forms
    (YYYY.MM.DD, HH:MM:SS.frac) rewritten, any other invalid value emptied (type 2) or removed.
    Never invents a value."""
    for elem in list(ds):
        if elem.VR == "SQ":
            for item in elem.value or []:
                _fix_dates(item)
            continue
        if elem.VR not in ("DA", "TM", "DT") or elem.value is None or elem.value == "":
            continue
        values = [str(v) for v in _values(elem.value)]
        fixed = [_valid_date(v, elem.VR) for v in values]
        if all(v is not None for v in fixed):
            if fixed != values:
                elem.value = fixed if len(fixed) > 1 else fixed[0]
        elif elem.keyword in _TYPE2_DATES:
            elem.value = None
        else:
            del ds[elem.tag]


def _valid_date(value: str, vr: str) -> str | None:
    """`value` of VR DA, TM or DT as valid DICOM (the ACR-NEMA DA/TM forms rewritten), else None."""
    value = value.strip(" \0")
    if not value:
        return value
    if vr == "DA":
        match = _DA.fullmatch(value) or _DA_ACR_NEMA.fullmatch(value)
        return "".join(match.groups()) if match and _calendar_ok(*map(int, match.groups())) else None
    if vr == "TM":
        match = _TM.fullmatch(value) or _TM_ACR_NEMA.fullmatch(value)
        if not match or not _clock_ok(*match.groups()[:3]):
            return None
        hh, mm, ss, frac = match.groups()
        return "".join(g for g in (hh, mm, ss) if g is not None) + (f".{frac}" if frac else "")
    match = _DT.fullmatch(value)
    if not match:
        return None
    year, month, day, time, offset_h, offset_m = match.groups()
    if month is not None and not _calendar_ok(int(year), int(month), int(day or 1)):
        return None
    if time is not None and _valid_date(time, "TM") != time:
        return None
    if offset_h is not None and (int(offset_h) > 14 or int(offset_m) > 59):
        return None
    return value


def _clock_ok(hh: str, mm: str | None, ss: str | None) -> bool:
    """Whether hours, minutes and seconds (60: a leap second) are on the clock."""
    return int(hh) <= 23 and (mm is None or int(mm) <= 59) and (ss is None or int(ss) <= 60)


def _calendar_ok(year: int, month: int, day: int) -> bool:
    """Whether year-month-day is a real calendar date."""
    try:
        datetime.date(year, month, day)
    except ValueError:
        return False
    return True


def _values(value) -> list[str]:
    """A DICOM value as a list: a single-valued element is a str (or number), not a sequence of letters."""
    if value is None or value == "":
        return []
    if isinstance(value, (str, bytes, int, float)):
        return [value]
    return list(value)


def _numbers(value, count: int) -> list[float] | None:
    """`count` numbers from a multi-valued element, else None."""
    values = _values(value)
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(np.isfinite(numbers)) else None


def _set_geometry(ds: pydicom.Dataset, scale: int) -> str | None:
    """PixelSpacing / scale, and ImagePositionPatient moved to the new first pixel's centre.

    The retired ACR-NEMA ImagePosition / ImageOrientation stand in for missing
    ImagePositionPatient / ImageOrientationPatient and are never written back.
    Returns a warning for the log when the geometry written is less than the source suggested.
    """
    note = None
    retired = [k for k in _RETIRED_GEOMETRY if k in ds]
    if retired:
        position = _numbers(ds.get("ImagePosition"), 3)
        orientation = _numbers(ds.get("ImageOrientation"), 6)
        if "ImagePositionPatient" not in ds and "ImageOrientationPatient" not in ds:
            if position and orientation:
                ds.ImagePositionPatient = [f"{v:.6g}" for v in position]
                ds.ImageOrientationPatient = [f"{v:.6g}" for v in orientation]
                note = ("only the retired ACR-NEMA ImagePosition/ImageOrientation in the source; "
                        "converted to ImagePositionPatient/ImageOrientationPatient")
            else:
                note = "the source has no usable geometry (no ImagePositionPatient/ImageOrientationPatient)"
        for keyword in retired:
            delattr(ds, keyword)
    spacing = _numbers(ds.get("PixelSpacing"), 2)
    if not spacing:
        return note
    row_mm, col_mm = spacing
    ds.PixelSpacing = [f"{row_mm / scale:.6g}", f"{col_mm / scale:.6g}"]
    position = _numbers(ds.get("ImagePositionPatient"), 3)
    orientation = _numbers(ds.get("ImageOrientationPatient"), 6)
    if position and orientation:
        along_row, along_col = np.array(orientation[:3], float), np.array(orientation[3:], float)
        # Old pixel centres sit at integer indices; new pixel i covers old (i + 0.5) / scale - 0.5.
        shift = 0.5 / scale - 0.5
        new = np.array(position, float) + shift * (col_mm * along_row + row_mm * along_col)
        ds.ImagePositionPatient = [f"{v:.6g}" for v in new]
    return note


def derived_by_us(path: Path) -> bool:
    """Whether DICOM file `path` is one `upscale` wrote (header only)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["DerivationDescription"])
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False
    return is_our_derivation(str(ds.get("DerivationDescription", "") or ""))


def is_our_derivation(text: str) -> bool:
    """Whether a DerivationDescription is the one `upscale` writes."""
    return text.startswith(DERIVATION) and " by tfgan-ct " in text


def derivation_kind(text: str) -> str | None:
    """SR or SPREAD for a DerivationDescription `upscale` wrote, None for any other."""
    if not is_our_derivation(text):
        return None
    return SPREAD if _SPREAD_TEXT in text else SR

"""`tfgan-ct upscale`: a DICOM series in, a x4 super-resolved DICOM series out.

This is clinical output, not training data: the new series keeps the
source's patient and study (a viewer or PACS files it beside the original),
and gets

- 4x Rows and Columns, PixelSpacing / 4, ImagePositionPatient moved to the
  centre of the new top-left pixel;
- new Series and SOP Instance UIDs, ImageType DERIVED\\SECONDARY and the
  source's values 3 and on (AXIAL when it has none: the CT Image IOD needs a
  third value), a SeriesDescription and DerivationDescription naming the model
  and version, a SourceImageSequence pointing at each source image;
- the source's dates and times where they are valid DICOM; old ACR-NEMA forms
  (`1999.05.05`, `10:52:34`) rewritten as DICOM; any other invalid value left
  empty (type 2 attributes: StudyDate, StudyTime, PatientBirthDate) or left
  out, never replaced by an invented date; the type 2 attributes of the CT
  Image IOD that the source lacks added empty;
- signed 16-bit HU pixels (RescaleSlope 1, RescaleIntercept 0), uncompressed
  (Explicit VR Little Endian), and the model's window as WindowCenter/Width;
- no private tags (they describe the source pixels, not these).

The model sees the [0, 1] image of its window. Outside that window it has
nothing to say: pixels whose bicubic upscale lies below the window floor or
above its ceiling (air, bone) take the bicubic HU value, all others the
model's (`--outside-window bicubic`, the default); `--outside-window clip`
keeps the model's output everywhere, clipped to the window.

`--format png` writes windowed 8-bit PNGs and `--format npy` one float32 HU
array [slices, 4h, 4w] per series, for quick looks, with `slices.json` naming
the source image of each array index and the images left out. Every series
is written in a hidden staging folder and renamed when complete; each DICOM
written is read back (header and pixels) before that, and a source image with
non-finite HU, a model output that is not finite or a DICOM that does not read
back is skipped with the reason. Staging left in `--out` by an interrupted run
is removed at the start. A disk that fills up stops the run with one line; the
incomplete series is removed, the series written before it stay.

`--overwrite` replaces only series folders this command wrote (every file in
them an image, array or sidecar of `upscale`, the DICOM derived by tfgan-ct),
never a folder that holds an input, and a run whose `--out` holds an input
replaces nothing.

Each series' folder is named after its source series, never with an
identifier in clear: `<SeriesNumber>_<description>_<hash>_x4`, the hash being
the first 8 hex digits of SHA-256 of the source series' grouping key
(patient and SeriesInstanceUID). A rerun of the same source finds its own
folder (replaced only with `--overwrite`); another source never does.

Sources without a StudyInstanceUID (old ACR-NEMA files) get one generated per
source patient and study, shared by all their series in the run, and a
FrameOfReferenceUID per series when they have none. The retired ACR-NEMA
geometry (ImagePosition, ImageOrientation) is converted to
ImagePositionPatient / ImageOrientationPatient and shifted like them; the
retired tags are not written.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from tqdm import tqdm

from tfgan_ct.data import dicom_io, resize
from tfgan_ct.deploy import inference
from tfgan_ct.config import Config, Window
from tfgan_ct.fileio import (OutputError, atomic_write_bytes, atomic_write_text, check_replaceable,
                             is_disk_full, remove_stale_staging, staged_directory)
from tfgan_ct.version import __version__
from tfgan_ct.errors import TfganError
from tfgan_ct.stages import CT_MODALITIES

log = logging.getLogger(__name__)

FORMATS = ("dicom", "png", "npy")
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
_DERIVATION = "Super-resolved x"
_OUR_FILES = re.compile(r"IM\d{5}\.(?:dcm|png)|sr_hu\.npy|slices\.json")


# Reason codes of images skipped by upscale itself (beside dicom_io.REASONS of the reading).
REASONS = {
    "non-finite-hu": "the source image has NaN or infinite HU",
    "empty-image": "the source image or the model output is empty or of the wrong size",
    "model-output": "the model's output is not finite (NaN or infinite)",
    "multi-frame-output": "a multi-frame image cannot be written back as DICOM yet",
    "write-failed": "the derived DICOM cannot be written or does not read back",
}


class UpscaleError(TfganError, RuntimeError):
    """Nothing usable in the input, or an output that cannot be written."""


@dataclass
class Summary:
    """What an upscale run did."""

    series: list[Path] = field(default_factory=list)
    images: int = 0
    skipped: list[dicom_io.Skipped] = field(default_factory=list)
    existing: list[Path] = field(default_factory=list)  # series left out: output exists, no --overwrite
    failed: list[str] = field(default_factory=list)     # series left out for another reason (one line each)
    refused: list[str] = field(default_factory=list)    # --overwrite would replace what is not ours (why)


def model_window(method: inference.Method, cfg: Config, override: Window | None = None) -> Window:
    """The HU window the model was trained on (its export's metadata), or `override`.

    A natural-image model has no CT window; it is run on the NCCT window of
    the config, with a warning.
    """
    if override is not None:
        return override
    stage = method.metadata.get("stage")
    if stage not in CT_MODALITIES:
        window = cfg.modalities.ncct.window
        level = logging.INFO if method.name == inference.BICUBIC else logging.WARNING
        log.log(level, "%s: no CT window of its own; using the NCCT window (center %g, width %g); "
                "set another with --window C,W", method.description, window.center, window.width)
        return window
    saved = method.metadata.get("window")
    return Window.from_dict(saved) if saved else cfg.modalities.get(stage).window


def super_resolve_hu(method: inference.Method, hu: np.ndarray, window: Window, outside: str = "bicubic",
                     tile: int = 0, tile_pad: int = 16) -> np.ndarray:
    """HU image [h, w] -> float32 HU [4h, 4w] through the model's [0, 1] window.

    Raises ValueError when the model's output is not finite (a diverged model), before clipping
    could hide an infinity.
    """
    unit = window.to_unit(hu.astype(np.float32))
    sr = np.clip(_checked(inference.upscale_image(method, unit, tile, tile_pad), "model output"), 0.0, 1.0)
    sr_hu = window.from_unit(sr)
    if outside == "bicubic":
        bicubic = resize.upscale(hu, method.scale).astype(np.float32)
        sr_hu = np.where(window.contains(bicubic), sr_hu, bicubic)
    elif outside != "clip":
        raise ValueError(f"outside must be 'bicubic' or 'clip', got {outside!r}")
    return sr_hu.astype(np.float32)


def upscale(inputs, out: str | Path, method: inference.Method, cfg: Config, fmt: str = "dicom",
            window: Window | None = None, outside: str = "bicubic", tile: int = 0, tile_pad: int = 16,
            overwrite: bool = False, progress: bool = True) -> Summary:
    """Super-resolve every CT series found in `inputs` into `out`, one folder per series.

    Stale staging of interrupted runs in `out` is removed first. Unusable images are skipped by
    name (`Summary.skipped`); series folders that exist are left out, or with `overwrite` replaced
    when `upscale` made them (others are refused, `Summary.refused`). Raises UpscaleError when
    nothing was written, when `overwrite` would replace folders in an `out` that holds an input,
    and when the disk fills up (the incomplete series removed).
    """
    inputs = list(inputs)
    if fmt not in FORMATS:
        raise UpscaleError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    window = model_window(method, cfg, window)
    out = Path(out)
    remove_stale_staging(out)  # before reading: a killed run's images must not become inputs; logs each
    summary = Summary()
    series, files = _find_series(inputs, summary)
    if not series:
        raise UpscaleError("no usable CT images in the input" +
                           (f" ({len(summary.skipped)} file(s) skipped)" if summary.skipped else ""))
    names = _folder_names(series)
    inputs = [Path(p).resolve() for p in [*inputs, *files]]
    if overwrite:
        _check_out_holds_no_input(out, [out / name for name in names.values()], inputs)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UpscaleError(f"cannot make the output folder {out}: {exc.strerror or exc}") from None
    total = sum(len(f) for f in series.values())
    study_uids: dict[tuple, str] = {}
    with tqdm(total=total, desc="upscaling", unit="slice", disable=not progress) as bar:
        for key, frames in series.items():
            folder = _write_series(frames, out / names[key], method, cfg, fmt, window, outside, tile, tile_pad,
                                   overwrite, summary, bar, study_uids, inputs)
            if folder is not None:
                summary.series.append(folder)
    if not summary.series:
        raise UpscaleError(_nothing_written(summary, out))
    return summary


def _nothing_written(summary: Summary, out: Path) -> str:
    """Why no series was written, for the final error."""
    if summary.refused and not summary.failed and not summary.existing:
        return "nothing written: " + "\n  ".join(summary.refused)
    if summary.existing and not summary.failed:
        names = ", ".join(p.name for p in summary.existing[:5]) + (" ..." if len(summary.existing) > 5 else "")
        return (f"nothing written: the output of every series already exists in {out} ({names}); "
                f"use --overwrite to replace it")
    parts = [f"{len(summary.skipped)} file(s) skipped"]
    if summary.existing:
        parts.append(f"{len(summary.existing)} series already in {out} (use --overwrite to replace them)")
    if summary.refused:
        parts.append(f"{len(summary.refused)} series folder(s) not replaced")
    message = f"no series could be upscaled ({'; '.join(parts)})"
    return message + "".join(f"\n  {line}" for line in [*summary.failed, *summary.refused])


def _check_out_holds_no_input(out: Path, finals: list[Path], inputs: list[Path]) -> None:
    """With --overwrite: refuse an `--out` that holds an input (resolved `inputs`) when a series
    folder in it exists and would be replaced (e.g. an earlier output read again as input)."""
    if not any(final.exists() for final in finals):
        return
    real = out.resolve()
    for item in inputs:
        if item == real or real in item.parents:
            raise UpscaleError(f"{out} holds the input {item}; --overwrite would replace series folders in "
                               f"it: choose an output folder outside the input (nothing was written)")


def _is_our_series(folder: Path) -> bool:
    """Whether every entry of `folder` is a file `upscale` writes: IM*.dcm derived by tfgan-ct
    (its DerivationDescription), IM*.png, sr_hu.npy or slices.json. Recognised from the files
    themselves, so no marker file lands in a folder a PACS may import."""
    for entry in folder.iterdir():
        if entry.is_symlink() or not entry.is_file() or not _OUR_FILES.fullmatch(entry.name):
            return False
        if entry.suffix == ".dcm" and not _derived_by_us(entry):
            return False
    return True


def _derived_by_us(path: Path) -> bool:
    """Whether DICOM file `path` is one `upscale` wrote (header only)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["DerivationDescription"])
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False
    text = str(ds.get("DerivationDescription", "") or "")
    return text.startswith(_DERIVATION) and " by tfgan-ct " in text


def _find_series(inputs, summary: Summary) -> tuple[dict[tuple[str, str], list[dicom_io.Frame]], list[Path]]:
    """CT frames of `inputs` grouped by (patient, series) and sorted, and every input file found."""
    walk: list[dicom_io.Skipped] = []
    try:
        paths = list(dicom_io.iter_files(inputs, walk))
    except FileNotFoundError as exc:
        raise UpscaleError(str(exc)) from None
    for item in walk:  # unreadable folders, dangling links, broken DICOMDIRs
        _skip(summary, item)
    frames = []
    for path in paths:
        result = dicom_io.frames_of(path)
        if isinstance(result, dicom_io.Skipped):
            _skip(summary, result)
        else:
            frames.extend(result)
    groups: dict[tuple[str, str], list[dicom_io.Frame]] = defaultdict(list)
    for frame in dicom_io.merge_duplicates(frames):
        groups[(frame.patient, frame.series)].append(frame)
    for members in groups.values():
        members.sort(key=lambda f: (f.instance, dicom_io.position_key(f.position), f.time, f.path, f.frame))
    return dict(sorted(groups.items())), paths


def _skip(summary: Summary, item: dicom_io.Skipped) -> None:
    """Report a file left out, once (one line naming it and the reason), and count it."""
    if any(s.path == item.path for s in summary.skipped):
        return  # a multi-frame file is reported once, not per frame
    log.warning("skipped %s: [%s] %s", dicom_io.relpath(item.path), item.code, item.reason)
    summary.skipped.append(item)


def _write_series(frames, final: Path, method, cfg: Config, fmt: str, window: Window, outside: str,
                  tile: int, tile_pad: int, overwrite: bool, summary: Summary, bar, study_uids: dict,
                  inputs: list[Path]):
    """Write one series in a staging folder and rename it to `final`; None if nothing could be written.

    `study_uids` maps a source study with no StudyInstanceUID to the one generated for it in this run;
    `inputs` (resolved files and folders) are never replaced. A full disk or another write error
    raises UpscaleError after the staging folder is removed.
    """
    if final.exists() and not overwrite:
        log.error("%s already exists (use --overwrite to replace it); series left out", final)
        summary.existing.append(final)
        bar.update(len(frames))
        return None
    try:
        check_replaceable(final, _inputs_under(final, inputs), _is_our_series, "a series folder of upscale")
    except OutputError as exc:
        log.error("%s; series left out", exc)
        summary.refused.append(str(exc))
        bar.update(len(frames))
        return None
    try:
        header = dicom_io.read_dataset(frames[0].path, pixels=False)
        uids = _Uids(series=generate_uid(), frame_of_reference=generate_uid(),
                     study=study_uids.setdefault(_study_key(frames[0], header), generate_uid()))
        written = _fill_series(frames, final, method, cfg, fmt, window, outside, tile, tile_pad, summary, bar,
                               uids)
    except (_SeriesFailed, ValueError) as exc:  # ValueError: the first header no longer reads
        reason = str(exc.args[0])
        log.error("%s: %s; series left out", final.name, reason)
        summary.failed.append(f"{final.name}: {reason}")
        return None
    except OSError as exc:
        raise UpscaleError(_write_error(exc, final, summary)) from None
    summary.images += written
    log.info("%s: %d image(s)", final, written)
    return final


def _inputs_under(final: Path, inputs: list[Path]) -> list[Path]:
    """The resolved `inputs` that lie in `final` (what check_replaceable must protect), cheaply."""
    real = final.resolve()
    return [item for item in inputs if item == real or real in item.parents]


def _write_error(exc: OSError, final: Path, summary: Summary) -> str:
    """One line for a series that could not be written (disk full or another OS error)."""
    done = (f"; the {len(summary.series)} series written before it are complete" if summary.series
            else "")
    if is_disk_full(exc):
        return (f"no space left on the device while writing {final}: the incomplete series was removed"
                f"{done}; free some space and run again")
    return f"cannot write {final} ({exc.strerror or exc}): the incomplete series was removed{done}"


@dataclass
class _Uids:
    """UIDs of one derived series: its own, and those used when the source has none."""

    series: str
    frame_of_reference: str
    study: str
    notes: set[str] = field(default_factory=set)  # geometry warnings, logged once per series


def _study_key(frame: dicom_io.Frame, header: pydicom.Dataset) -> tuple:
    """The source study of a series: its StudyInstanceUID, else patient + study ID, date and time."""
    uid = str(header.get("StudyInstanceUID", "") or "")
    if uid:
        return ("uid", uid)
    return ("patient", frame.patient, *(str(header.get(k, "") or "") for k in ("StudyID", "StudyDate", "StudyTime")))


def _fill_series(frames, final: Path, method, cfg: Config, fmt: str, window: Window, outside: str,
                 tile: int, tile_pad: int, summary: Summary, bar, uids: _Uids) -> int:
    """Write the series' images into a staging folder that becomes `final`; the count written."""
    if fmt == "npy":
        _check_one_size(frames)
    stack, slices, left_out, written = [], [], [], 0
    with staged_directory(final, overwrite=True) as stage:
        for index, frame in enumerate(frames, start=1):
            bar.update()
            try:
                hu, path = _read_frame(frame, cfg)
            except _Unreadable as exc:
                for item in exc.args[0]:
                    _skip(summary, item)
                left_out.append(_slice_record(index, frame, reason=exc.args[0][0].reason))
                continue
            try:
                sr_hu = _super_resolve_checked(method, hu, window, outside, tile, tile_pad)
                if fmt == "dicom":
                    _write_dicom(path, sr_hu, stage / f"IM{index:05d}.dcm", uids, method, window)
            except ValueError as exc:
                _skip(summary, dicom_io.skipped(path, exc))
                left_out.append(_slice_record(index, frame, reason=str(exc)))
                continue
            if fmt == "png":
                atomic_write_bytes(stage / f"IM{index:05d}.png", _png(sr_hu, window))
            elif fmt == "npy":
                if stack and sr_hu.shape != stack[0].shape:
                    raise _SeriesFailed(_sizes_message([*(a.shape for a in stack), sr_hu.shape], scaled=True))
                slices.append({"index": len(stack), **_slice_record(index, frame)})
                stack.append(sr_hu)
            written += 1
        for note in sorted(uids.notes):
            log.warning("%s: %s", final.name, note)
        if not written:
            raise _SeriesFailed("no image of this series could be upscaled")
        if fmt == "npy":
            _save_npy(stage / "sr_hu.npy", np.stack(stack))
            atomic_write_text(stage / "slices.json", json.dumps(
                {"array": "sr_hu.npy", "shape": [len(stack), *stack[0].shape], "slices": slices,
                 "left_out": left_out}, indent=1) + "\n")
    return written


def _super_resolve_checked(method: inference.Method, hu: np.ndarray, window: Window, outside: str,
                           tile: int, tile_pad: int) -> np.ndarray:
    """super_resolve_hu of a checked source image (HU [h, w]), its output checked too: float32 HU
    [4h, 4w], finite. ValueError (the skip reason) for non-finite or empty input or output."""
    _checked(hu, "source image")
    sr_hu = super_resolve_hu(method, hu, window, outside, tile, tile_pad)
    return _checked(sr_hu, "model output", (method.scale * hu.shape[0], method.scale * hu.shape[1]))


def _slice_record(index: int, frame: dicom_io.Frame, reason: str | None = None) -> dict:
    """Where an npy slice came from: its place in the sorted source series, InstanceNumber, position."""
    record = {"source_index": index, "instance_number": frame.instance,
              "position_mm": None if frame.position is None else round(frame.position, 4)}
    if reason is not None:
        record.update(file=Path(frame.path).name, frame=frame.frame, reason=reason)
    return record


def _check_one_size(frames) -> None:
    """--format npy stacks the series: every image must have the same size."""
    sizes = [(f.rows, f.columns) for f in frames]
    if len(set(sizes)) > 1:
        raise _SeriesFailed(_sizes_message(sizes, scaled=False))


def _sizes_message(shapes, scaled: bool) -> str:
    counts: dict[tuple, int] = defaultdict(int)
    for shape in shapes:
        counts[tuple(shape)] += 1
    listed = ", ".join(f"{r}x{c}: {n}" for (r, c), n in sorted(counts.items()))
    what = "upscaled images" if scaled else "images"
    return (f"{what} of different sizes ({listed} image(s)); --format npy stacks one series into one "
            f"array and needs a single size: use --format dicom or png for this series")


class _SeriesFailed(Exception):
    """Raised inside the staging block to discard a series; args[0] says why."""


def _read_frame(frame: dicom_io.Frame, cfg: Config) -> tuple[np.ndarray, str]:
    """HU [h, w] of a frame and the file it came from (a duplicate when the first cannot be read)."""
    errors = []
    for path in [frame.path, *frame.duplicates]:
        try:
            return dicom_io.read_hu(path, [frame.frame], cfg.convert.out_of_field_hu)[0], path
        except ValueError as exc:
            errors.append(dicom_io.skipped(path, exc))
        except dicom_io.HEADER_ERRORS as exc:  # a malformed header value (e.g. a two-valued padding)
            errors.append(dicom_io.Skipped(path, f"unusable header ({type(exc).__name__}: {exc})", "bad-header"))
    raise _Unreadable(errors)


def _checked(image: np.ndarray, what: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """`image` ([h, w], HU or [0, 1]) if it is a non-empty, finite 2-D image (of `shape` when given);
    else dicom_io.Unusable (a ValueError with a REASONS code) saying what is wrong with the `what`."""
    if image.ndim != 2 or image.size == 0:
        raise dicom_io.Unusable("empty-image", f"{what} is empty or not 2-D "
                                               f"(shape {'x'.join(map(str, image.shape))})")
    if shape is not None and image.shape != tuple(shape):
        raise dicom_io.Unusable("empty-image", f"{what} is {image.shape[0]}x{image.shape[1]}, "
                                               f"expected {shape[0]}x{shape[1]}")
    bad = int(image.size - np.count_nonzero(np.isfinite(image)))
    if bad:
        source = what == "source image"
        hint = " (RescaleSlope/RescaleIntercept not finite?)" if source else ""
        raise dicom_io.Unusable("non-finite-hu" if source else "model-output",
                                f"{what} has {bad} non-finite (NaN or infinite) value(s){hint}; not upscaled")
    return image


class _Unreadable(Exception):
    """No copy of a frame could be decoded; args[0] lists (path, reason) per copy."""


def _folder_names(series: dict[tuple[str, str], list[dicom_io.Frame]]) -> dict[tuple[str, str], str]:
    """Output folder of each series, derived from its source series only (stable across runs)."""
    return {key: _folder_name(dicom_io.read_dataset(frames[0].path, pixels=False), key)
            for key, frames in series.items()}


def _folder_name(header: pydicom.Dataset, key: tuple[str, str]) -> str:
    """`<SeriesNumber>_<description>_<hash>_x4`; the hash is of the source series' grouping key
    (patient and SeriesInstanceUID), so the same UID under two patients gets two folders, whichever
    of them a run holds. No identifier appears in clear."""
    description = str(header.get("SeriesDescription", "") or "series")
    slug = re.sub(r"[^A-Za-z0-9]+", "_", description).strip("_")[:40] or "series"
    digest = hashlib.sha256("\0".join(key).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    try:
        number = f"{int(float(str(header.get('SeriesNumber', '')).strip())):03d}_"
    except (TypeError, ValueError):
        number = ""  # no series number: the hash alone keeps the name unique
    return f"{number}{slug}_{digest}_x4"


def _write_dicom(source: str, sr_hu: np.ndarray, path: Path, uids: _Uids,
                 method: inference.Method, window: Window) -> None:
    """One derived single-frame CT image at `path` (atomically), its header from file `source`."""
    ds = dicom_io.read_dataset(source, pixels=False)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise dicom_io.Unusable("multi-frame-output", "multi-frame (enhanced) images cannot be written "
                                                      "back as DICOM yet; use --format npy or png")
    scale = method.scale
    source_sop = (str(ds.get("SOPClassUID", "") or CT_IMAGE_STORAGE), str(ds.get("SOPInstanceUID", "")))
    for keyword in _DROP:
        if keyword in ds:
            delattr(ds, keyword)
    ds.remove_private_tags()
    for elem in [e for e in ds if e.tag.element == 0]:  # group lengths (ACR-NEMA): stale once edited
        del ds[elem.tag]
    ds.SOPClassUID = source_sop[0]
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = uids.series
    if not str(ds.get("StudyInstanceUID", "") or "").strip():
        ds.StudyInstanceUID = uids.study
    if not str(ds.get("FrameOfReferenceUID", "") or "").strip():
        ds.FrameOfReferenceUID = uids.frame_of_reference
    ds.SeriesNumber = int(ds.get("SeriesNumber", 0) or 0) + 1000
    ds.ImageType = _image_type(ds.get("ImageType"))
    what = f"tfgan-ct x{scale} SR {method.description}"
    ds.SeriesDescription = f"{what} {ds.get('SeriesDescription', '') or ''}".strip()[:64]
    ds.DerivationDescription = (f"{_DERIVATION}{scale} by tfgan-ct {__version__}, model "
                                f"{method.description} (window {window.center:g}/{window.width:g} HU)")[:1024]
    if source_sop[1]:
        ref = pydicom.Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = source_sop
        ds.SourceImageSequence = [ref]
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
    pixels = np.clip(np.rint(sr_hu), -32768, 32767).astype("<i2")
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


def _png(sr_hu: np.ndarray, window: Window) -> bytes:
    import io

    from PIL import Image

    unit = window.to_unit(sr_hu.astype(np.float32))
    buffer = io.BytesIO()
    Image.fromarray(np.round(unit * 255).astype(np.uint8), "L").save(buffer, "PNG")
    return buffer.getvalue()


def _save_npy(path: Path, array: np.ndarray) -> None:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array.astype(np.float32))
    atomic_write_bytes(path, buffer.getvalue())

"""`tfgan-ct upscale`: a DICOM series in, a x4 super-resolved DICOM series out.

This is clinical output, not training data: the new series keeps the
source's patient and study (a viewer or PACS files it beside the original),
and gets

- 4x Rows and Columns, PixelSpacing / 4, ImagePositionPatient moved to the
  centre of the new top-left pixel;
- new Series and SOP Instance UIDs, ImageType DERIVED\\SECONDARY, a
  SeriesDescription and DerivationDescription naming the model and version,
  a SourceImageSequence pointing at each source image;
- signed 16-bit HU pixels (RescaleSlope 1, RescaleIntercept 0), uncompressed
  (Explicit VR Little Endian), and the model's window as WindowCenter/Width;
- no private tags (they describe the source pixels, not these).

The model sees the [0, 1] image of its window. Outside that window it has
nothing to say: pixels whose bicubic upscale lies below the window floor or
above its ceiling (air, bone) take the bicubic HU value, all others the
model's (`--outside-window bicubic`, the default); `--outside-window clip`
keeps the model's output everywhere, clipped to the window.

`--format png` writes windowed 8-bit PNGs and `--format npy` one float32 HU
array [slices, 4h, 4w] per series, for quick looks. Every series is written
in a hidden staging folder and renamed when complete.
"""
from __future__ import annotations

import datetime
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

from tfgan_ct import dicom_io, inference, resize
from tfgan_ct.config import Config, Window
from tfgan_ct.fileio import atomic_write_bytes, staged_directory
from tfgan_ct.version import __version__

log = logging.getLogger(__name__)

FORMATS = ("dicom", "png", "npy")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_DROP = ("PixelPaddingValue", "PixelPaddingRangeLimit", "SmallestImagePixelValue", "LargestImagePixelValue",
         "IconImageSequence", "VOILUTSequence", "ModalityLUTSequence", "WindowCenterWidthExplanation",
         "PixelData")


class UpscaleError(RuntimeError):
    """Nothing usable in the input, or an output that cannot be written."""


@dataclass
class Summary:
    """What an upscale run did."""

    series: list[Path] = field(default_factory=list)
    images: int = 0
    skipped: list[dicom_io.Skipped] = field(default_factory=list)


def model_window(method: inference.Method, cfg: Config, override: Window | None = None) -> Window:
    """The HU window the model was trained on (its export's metadata), or `override`.

    A natural-image model has no CT window; it is run on the NCCT window of
    the config, with a warning.
    """
    if override is not None:
        return override
    stage = method.metadata.get("stage")
    if stage == "natural" or stage not in ("ncct", "ctp", "cta"):
        window = cfg.modalities.ncct.window
        level = logging.INFO if method.name == inference.BICUBIC else logging.WARNING
        log.log(level, "%s: no CT window of its own; using the NCCT window (center %g, width %g); "
                "set another with --window C,W", method.description, window.center, window.width)
        return window
    saved = method.metadata.get("window")
    return Window(saved["center"], saved["width"]) if saved else cfg.modalities.get(stage).window


def super_resolve_hu(method: inference.Method, hu: np.ndarray, window: Window, outside: str = "bicubic",
                     tile: int = 0, tile_pad: int = 16) -> np.ndarray:
    """HU image [h, w] -> float32 HU [4h, 4w] through the model's [0, 1] window."""
    unit = np.clip((hu - window.floor) / window.width, 0.0, 1.0).astype(np.float32)
    sr = np.clip(inference.upscale_image(method, unit, tile, tile_pad), 0.0, 1.0)
    sr_hu = sr * np.float32(window.width) + np.float32(window.floor)
    if outside == "bicubic":
        bicubic = resize.upscale(hu, method.scale).astype(np.float32)
        keep = (bicubic < window.floor) | (bicubic > window.floor + window.width)
        sr_hu = np.where(keep, bicubic, sr_hu)
    elif outside != "clip":
        raise ValueError(f"outside must be 'bicubic' or 'clip', got {outside!r}")
    return sr_hu.astype(np.float32)


def upscale(inputs, out: str | Path, method: inference.Method, cfg: Config, fmt: str = "dicom",
            window: Window | None = None, outside: str = "bicubic", tile: int = 0, tile_pad: int = 16,
            overwrite: bool = False, progress: bool = True) -> Summary:
    """Super-resolve every CT series found in `inputs` into `out`, one folder per series."""
    if fmt not in FORMATS:
        raise UpscaleError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    window = model_window(method, cfg, window)
    summary = Summary()
    series = _find_series(inputs, summary)
    if not series:
        raise UpscaleError("no usable CT images in the input" +
                           (f" ({len(summary.skipped)} file(s) skipped)" if summary.skipped else ""))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    total = sum(len(f) for f in series.values())
    bar = tqdm(total=total, desc="upscaling", unit="slice", disable=not progress)
    for number, frames in enumerate(series.values(), start=1):
        folder = _write_series(frames, out, number, method, cfg, fmt, window, outside, tile, tile_pad,
                               overwrite, summary, bar)
        if folder is not None:
            summary.series.append(folder)
    bar.close()
    if not summary.series:
        raise UpscaleError(f"no series could be upscaled ({len(summary.skipped)} file(s) skipped)")
    return summary


def _find_series(inputs, summary: Summary) -> dict[tuple[str, str], list[dicom_io.Frame]]:
    try:
        paths = list(dicom_io.iter_files(inputs))
    except FileNotFoundError as exc:
        raise UpscaleError(str(exc)) from None
    frames = []
    for path in paths:
        result = dicom_io.frames_of(path)
        if isinstance(result, dicom_io.Skipped):
            _skip(summary, result.path, result.reason)
        else:
            frames.extend(result)
    groups: dict[tuple[str, str], list[dicom_io.Frame]] = defaultdict(list)
    for frame in dicom_io.merge_duplicates(frames):
        groups[(frame.patient, frame.series)].append(frame)
    for members in groups.values():
        members.sort(key=lambda f: (f.instance, dicom_io.position_key(f.position), f.time, f.path, f.frame))
    return dict(sorted(groups.items()))


def _skip(summary: Summary, path: str, reason: str) -> None:
    if any(s.path == path for s in summary.skipped):
        return  # a multi-frame file is reported once, not per frame
    log.warning("skipped %s: %s", dicom_io.relpath(path), reason)
    summary.skipped.append(dicom_io.Skipped(path, reason))


def _write_series(frames, out: Path, number: int, method, cfg: Config, fmt: str, window: Window,
                  outside: str, tile: int, tile_pad: int, overwrite: bool, summary: Summary, bar):
    """Write one series in a staging folder and rename it; None if nothing in it could be written."""
    header = dicom_io.read_dataset(frames[0].path, pixels=False)
    final = out / _folder_name(header, number)
    if final.exists() and not overwrite:
        log.error("%s already exists (use --overwrite to replace it); series left out", final)
        bar.update(len(frames))
        return None
    try:
        written = _fill_series(frames, final, method, cfg, fmt, window, outside, tile, tile_pad, summary, bar)
    except _Empty:
        log.error("%s: no image of this series could be upscaled; series left out", final.name)
        return None
    summary.images += written
    log.info("%s: %d image(s)", final, written)
    return final


def _fill_series(frames, final: Path, method, cfg: Config, fmt: str, window: Window, outside: str,
                 tile: int, tile_pad: int, summary: Summary, bar) -> int:
    """Write the series' images into a staging folder that becomes `final`; the count written."""
    series_uid = generate_uid()
    stack, written = [], 0
    with staged_directory(final, overwrite=True) as stage:
        for index, frame in enumerate(frames, start=1):
            bar.update()
            try:
                hu, path = _read_frame(frame, cfg)
            except _Unreadable as exc:
                for failed, reason in exc.args[0]:
                    _skip(summary, failed, reason)
                continue
            sr_hu = super_resolve_hu(method, hu, window, outside, tile, tile_pad)
            if fmt == "dicom":
                try:
                    _write_dicom(path, sr_hu, stage / f"IM{index:05d}.dcm", series_uid, method, window)
                except ValueError as exc:
                    _skip(summary, frame.path, str(exc))
                    continue
            elif fmt == "png":
                atomic_write_bytes(stage / f"IM{index:05d}.png", _png(sr_hu, window))
            else:
                stack.append(sr_hu)
            written += 1
        if fmt == "npy" and stack:
            _save_npy(stage / "sr_hu.npy", np.stack(stack))
        if not written:
            raise _Empty()
    return written


class _Empty(Exception):
    """Raised inside the staging block to discard a series with no image written."""


def _read_frame(frame: dicom_io.Frame, cfg: Config) -> tuple[np.ndarray, str]:
    """HU [h, w] of a frame and the file it came from (a duplicate when the first cannot be read)."""
    errors = []
    for path in [frame.path, *frame.duplicates]:
        try:
            return dicom_io.read_hu(path, [frame.frame], cfg.convert.out_of_field_hu)[0], path
        except ValueError as exc:
            errors.append((path, str(exc)))
    raise _Unreadable(errors)


class _Unreadable(Exception):
    """No copy of a frame could be decoded; args[0] lists (path, reason) per copy."""


def _folder_name(header: pydicom.Dataset, number: int) -> str:
    description = str(header.get("SeriesDescription", "") or "series")
    slug = re.sub(r"[^A-Za-z0-9]+", "_", description).strip("_")[:40] or "series"
    return f"{number:03d}_{slug}_x4"


def _write_dicom(source: str, sr_hu: np.ndarray, path: Path, series_uid: str,
                 method: inference.Method, window: Window) -> None:
    """One derived single-frame CT image at `path` (atomically), its header from file `source`."""
    ds = dicom_io.read_dataset(source, pixels=False)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise ValueError("multi-frame (enhanced) images cannot be written back as DICOM yet; "
                         "use --format npy or png")
    scale = method.scale
    source_sop = (str(ds.get("SOPClassUID", "") or CT_IMAGE_STORAGE), str(ds.get("SOPInstanceUID", "")))
    for keyword in _DROP:
        if keyword in ds:
            delattr(ds, keyword)
    ds.remove_private_tags()
    ds.SOPClassUID = source_sop[0]
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = int(ds.get("SeriesNumber", 0) or 0) + 1000
    old_type = list(ds.get("ImageType", []) or [])
    ds.ImageType = ["DERIVED", "SECONDARY", *old_type[2:]]
    what = f"tfgan-ct x{scale} SR {method.description}"
    ds.SeriesDescription = f"{what} {ds.get('SeriesDescription', '') or ''}".strip()[:64]
    ds.DerivationDescription = (f"Super-resolved x{scale} by tfgan-ct {__version__}, model "
                                f"{method.description} (window {window.center:g}/{window.width:g} HU)")[:1024]
    if source_sop[1]:
        ref = pydicom.Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = source_sop
        ds.SourceImageSequence = [ref]
    _set_geometry(ds, scale)
    now = datetime.datetime.now()
    ds.InstanceCreationDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = ds.ContentTime = now.strftime("%H%M%S")
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
        tmp.replace(path)
    except Exception as exc:  # noqa: BLE001 - a header pydicom cannot write is reported per file
        tmp.unlink(missing_ok=True)
        raise ValueError(f"cannot write the derived image ({type(exc).__name__}: {exc})") from None


def _set_geometry(ds: pydicom.Dataset, scale: int) -> None:
    """PixelSpacing / scale, and ImagePositionPatient moved to the new first pixel's centre."""
    spacing = ds.get("PixelSpacing")
    if not spacing:
        return
    row_mm, col_mm = float(spacing[0]), float(spacing[1])
    ds.PixelSpacing = [f"{row_mm / scale:.6g}", f"{col_mm / scale:.6g}"]
    position, orientation = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if position and orientation and len(position) == 3 and len(orientation) == 6:
        along_row, along_col = np.array(orientation[:3], float), np.array(orientation[3:], float)
        # Old pixel centres sit at integer indices; new pixel i covers old (i + 0.5) / scale - 0.5.
        shift = 0.5 / scale - 0.5
        new = np.array(position, float) + shift * (col_mm * along_row + row_mm * along_col)
        ds.ImagePositionPatient = [f"{v:.6g}" for v in new]


def _png(sr_hu: np.ndarray, window: Window) -> bytes:
    import io

    from PIL import Image

    unit = np.clip((sr_hu - window.floor) / window.width, 0, 1)
    buffer = io.BytesIO()
    Image.fromarray(np.round(unit * 255).astype(np.uint8), "L").save(buffer, "PNG")
    return buffer.getvalue()


def _save_npy(path: Path, array: np.ndarray) -> None:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array.astype(np.float32))
    atomic_write_bytes(path, buffer.getvalue())

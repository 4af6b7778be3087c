"""Decoding CT pixels to HU: float32 (rows x columns) per frame, padding and
out-of-field pixels as air, RescaleSlope/Intercept per frame for enhanced CT.
For conversion, frames whose HU are whole numbers (slope 1, a whole intercept:
nearly every CT) can come back as int16 HU instead, the same values without the
float passes (`read_hu(..., whole=True)`).

Each file is parsed once: for uncompressed little-endian 16-bit images (the
usual CT archive) the header pass notes where the pixels lie (`PixelLayout`),
and `read_hu` reads them from there without parsing the DICOM again; anything
else (compressed, big endian, truncated, ...) is read in full by pydicom.
"""
from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tfgan_ct.data.dicom_files import Unusable, check_usable, first_item, float_value, frame_count, lookup, read_dataset

AIR_HU = -1000.0


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
    shared = first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    return PixelLayout(
        offset=int(elem.value_tell), dtype=dtype, frames=n, rows=rows, columns=cols,
        bits_stored=int(ds.get("BitsStored", 16)),
        padding=None if padding is None else int(_as_stored(padding, np.dtype(dtype))),
        rescale=tuple(_rescale(ds, per_frame, shared, i) for i in range(n)))



def read_hu(path: str, frames: list[int], out_of_field_hu: float,
            layout: PixelLayout | None = None, whole: bool = False) -> list[np.ndarray]:
    """Decode frames of one file to HU (float32, rows x columns each).

    Padding (PixelPaddingValue) and out-of-field values (at or below
    `out_of_field_hu` after rescaling) become air (-1000 HU). With the file's
    `layout` from the header pass, the pixels are read straight from the file.
    `whole`: a frame whose HU are whole numbers within int16 comes back as int16
    HU (equal to the float32 HU; see `_whole_hu`).
    Raises Unusable (a ValueError with a reason code) when the pixels cannot be
    decoded, do not match the header, or give HU that are not finite.
    """
    to_hu = _to_whole_or_float_hu if whole else _to_hu
    if layout is not None:
        stored = _read_layout(path, layout, frames)
        if stored is not None:
            return [to_hu(pixels, *layout.rescale[i], layout.padding, out_of_field_hu)
                    for i, pixels in zip(frames, stored)]
        # the file is not what its header said (e.g. truncated): a full read explains
    ds = read_dataset(path, pixels=True)
    check_usable(ds, Path(path))
    stack = _decode(ds, path)
    shared = first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    padding = ds.get("PixelPaddingValue")
    if padding is not None:
        padding = _as_stored(padding, stack.dtype)
    return [to_hu(stack[i], *_rescale(ds, per_frame, shared, i), padding, out_of_field_hu)
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
            stack = pixels if frame_count(ds) > 1 else pixels[None]
    except Unusable:
        raise
    except Exception as exc:  # noqa: BLE001 - decoders raise many types
        raise _decode_error(ds, exc) from None
    expected = (frame_count(ds), int(ds.Rows), int(ds.Columns))
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
    slope = float_value(lookup(ds, group, shared, "PixelValueTransformationSequence", "RescaleSlope"))
    intercept = float_value(lookup(ds, group, shared, "PixelValueTransformationSequence", "RescaleIntercept"))
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


def _to_whole_or_float_hu(stored: np.ndarray, slope, intercept, padding, out_of_field_hu: float) -> np.ndarray:
    """`_whole_hu` where it applies, else `_to_hu` (float32)."""
    hu = _whole_hu(stored, slope, intercept, padding, out_of_field_hu)
    return _to_hu(stored, slope, intercept, padding, out_of_field_hu) if hu is None else hu


def _whole_hu(stored: np.ndarray, slope, intercept, padding, out_of_field_hu: float) -> np.ndarray | None:
    """int16 HU, equal value for value to `_to_hu`'s float32 HU, when those are whole numbers
    within int16: integer stored values, slope 1 (or none) and a whole intercept. None otherwise.

    The float path is exact for such values (all below 2**24 in magnitude), so the
    two agree; this one makes no float copies of the slice.
    """
    if stored.dtype.kind not in "iu" or stored.dtype.itemsize > 2 or slope not in (None, 1.0):
        return None
    shift = 0 if intercept is None else intercept
    if not math.isfinite(shift) or shift != int(shift) or stored.size == 0:
        return None
    shift = int(shift)
    if int(stored.min()) + shift < -32768 or int(stored.max()) + shift > 32767:
        return None
    # int16 arithmetic wraps modulo 2**16; the true sums lie within int16 (checked
    # above), so the wrapped ones are those sums even where a uint16 value wrapped.
    hu = stored.astype(np.int16)
    if shift:
        hu += np.int16((shift + 32768) % 65536 - 32768)
    limit = math.floor(out_of_field_hu)
    outside = hu <= min(limit, 32767) if limit >= -32768 else np.zeros(hu.shape, bool)
    if padding is not None:
        outside |= stored == padding
    np.copyto(hu, np.int16(AIR_HU), where=outside)
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

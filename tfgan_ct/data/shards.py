"""TFRecord shards of `tf.train.Example` records, and the dataset manifest.

One record is a training patch or a whole validation/test slice:

| feature      | type          | content                                             |
|--------------|---------------|-----------------------------------------------------|
| hr           | bytes         | int16 little-endian HU, height x width              |
| lr           | bytes         | float32 little-endian HU, (height/scale) x (width/scale), |
|              |               | the MATLAB-style bicubic of the *whole* masked slice |
| mask         | bytes         | brain mask, height x width bits packed 8 per byte,  |
|              |               | first pixel in the high bit (`numpy.packbits`);     |
|              |               | format version 1 stored one uint8 0/1 per pixel     |
| height/width | int64         | HR size in pixels                                   |
| scale        | int64         | 4                                                   |
| modality     | bytes         | ncct, ctp, cta or natural                           |
| split        | bytes         | train, validation or test                           |
| patient      | bytes         | salted hash of the patient (never the ID itself)    |
| series       | bytes         | salted hash of the series                           |
| slice_index  | int64         | position of the slice in its series                 |
| patch_y/x    | int64         | top-left HR pixel of the patch (0, 0 for slices)    |
| pixel_spacing| float x 2     | HR pixel spacing in mm (row, column); 0 if unknown  |

Pixels outside the brain mask hold the modality window's floor.

Format versions (the manifest's `format_version`): 1 stored the mask as one
byte per pixel; 2 packs it into bits (smaller records, so less to read and
checksum; see docs/benchmarks.md). Readers accept both.
"""
from __future__ import annotations

import functools
import hashlib
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import google_crc32c
import numpy as np

from tfgan_ct.fileio import default_mode
from tfgan_ct.protowire import field, varint

FORMAT = "tfgan-ct-shards"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class RecordMeta:
    """Non-pixel fields of one record."""

    modality: str
    split: str
    patient: str
    series: str
    slice_index: int
    patch_y: int = 0
    patch_x: int = 0
    pixel_spacing: tuple[float, float] = (0.0, 0.0)


def encode(hr: np.ndarray, lr: np.ndarray, mask: np.ndarray, meta: RecordMeta, scale: int) -> bytes:
    """Serialise one record. hr: int16 HU (H, W); lr: float32 HU (H/scale, W/scale); mask: bool (H, W).

    The `tf.train.Example` protobuf is written directly (fields in a fixed
    order, so output is byte-for-byte reproducible) without importing
    TensorFlow, which lets the conversion workers encode in parallel.
    `decode_numpy` and `tf.io.parse_example` read it back.

    Every length prefix is known in advance, so the record is one `join` of
    short headers and the pixel buffers themselves: the pixels are copied once
    (a whole 512x512 slice is 0.8 MB, and each copy of it costs page faults).
    The headers and the small features repeat from record to record and are
    made once (`_entry_head`, `_entry`).
    """
    if hr.shape[0] != lr.shape[0] * scale or hr.shape[1] != lr.shape[1] * scale:
        raise ValueError(f"LR shape {lr.shape} is not HR shape {hr.shape} / {scale}")
    buffers = (("hr", _buffer(hr, "<i2")), ("lr", _buffer(lr, "<f4")), ("mask", pack_mask(mask)))
    small = (_entry("height", _INT, hr.shape[0]), _entry("width", _INT, hr.shape[1]),
             _entry("scale", _INT, scale),
             _entry("modality", _BYTES, meta.modality), _entry("split", _BYTES, meta.split),
             _entry("patient", _BYTES, meta.patient), _entry("series", _BYTES, meta.series),
             _entry("slice_index", _INT, meta.slice_index),
             _entry("patch_y", _INT, meta.patch_y), _entry("patch_x", _INT, meta.patch_x),
             _entry("pixel_spacing", _FLOAT, tuple(meta.pixel_spacing)))
    parts: list = []
    for key, buffer in buffers:
        parts += (_entry_head(key, buffer.nbytes), buffer)
    parts += small
    length = sum(p.nbytes if isinstance(p, np.ndarray) else len(p) for p in parts)
    return b"".join([varint(1 << 3 | 2) + varint(length), *parts])  # Example.features = 1


# Feature kinds: Feature.bytes_list = 1, float_list = 2 (packed), int64_list = 3 (packed)
_BYTES, _FLOAT, _INT = 1, 2, 3


def _buffer(array: np.ndarray, dtype) -> np.ndarray:
    """`array` as a C-contiguous array of `dtype` (no copy when it is one already)."""
    return np.ascontiguousarray(array, dtype=dtype)


@functools.lru_cache(maxsize=64)
def _entry_head(key: str, size: int) -> bytes:
    """Everything of the map entry {key: Feature(bytes_list=[value])} (Features.feature = 1)
    that comes before a `size`-byte value, which follows it in the record."""
    value_list = varint(1 << 3 | 2) + varint(size)                    # BytesList.value = 1
    feature = varint(_BYTES << 3 | 2) + varint(len(value_list) + size)
    entry_value = varint(2 << 3 | 2) + varint(len(feature) + len(value_list) + size)  # value = 2
    key_field = field(1, key.encode())                                    # key = 1
    entry_length = len(key_field) + len(entry_value) + len(feature) + len(value_list) + size
    return varint(1 << 3 | 2) + varint(entry_length) + key_field + entry_value + feature + value_list


@functools.lru_cache(maxsize=4096)
def _entry(key: str, kind: int, value) -> bytes:
    """The whole map entry {key: Feature} of a small feature: text (bytes_list), an int
    (int64_list) or a tuple of floats (float_list, float32)."""
    if kind == _BYTES:
        payload = field(1, value.encode())
    elif kind == _INT:
        payload = field(1, varint(int(value)))
    else:
        payload = field(1, np.asarray(value, "<f4").tobytes())
    return field(1, field(1, key.encode()) + field(2, field(kind, payload)))


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """Brain mask (H, W), bool or 0/1, -> ceil(H*W/8) uint8 bytes, 8 pixels per byte
    in row-major order, first pixel in the high bit."""
    return np.packbits(np.asarray(mask, bool), axis=None)


def unpack_mask(raw: bytes, height: int, width: int) -> np.ndarray:
    """The stored mask as bool (height, width): bit-packed (format 2) or one byte
    per pixel (format 1), told apart by the length."""
    data = np.frombuffer(raw, np.uint8)
    if data.size != height * width:
        data = np.unpackbits(data, count=height * width)
    return data.reshape(height, width).astype(bool)


def decode_numpy(record: bytes) -> dict:
    """Parse one serialised record into numpy arrays and Python values (tests, tools)."""
    import tensorflow as tf

    ex = tf.train.Example.FromString(record).features.feature
    h, w, s = (ex[k].int64_list.value[0] for k in ("height", "width", "scale"))
    out = {
        "hr": np.frombuffer(ex["hr"].bytes_list.value[0], "<i2").reshape(h, w),
        "lr": np.frombuffer(ex["lr"].bytes_list.value[0], "<f4").reshape(h // s, w // s),
        "mask": unpack_mask(ex["mask"].bytes_list.value[0], h, w),
        "pixel_spacing": tuple(ex["pixel_spacing"].float_list.value),
    }
    for key in ("modality", "split", "patient", "series"):
        out[key] = ex[key].bytes_list.value[0].decode()
    for key in ("height", "width", "scale", "slice_index", "patch_y", "patch_x"):
        out[key] = int(ex[key].int64_list.value[0])
    return out


def read_records(path: str | Path) -> list[dict]:
    """All records of one shard, decoded with `decode_numpy`."""
    import tensorflow as tf

    return [decode_numpy(r.numpy()) for r in tf.data.TFRecordDataset(str(path))]


class ShardWriter:
    """Writes records of one split and modality into `<split>-<modality>-NNNNN.tfrecord`
    files of `shard_size` records (one modality per file, so a training stage
    picks its files without reading the others).

    Records come serialised (`write`) or already in TFRecord framing (`write_framed`,
    as conversion workers frame them). Each shard is written under a temporary name,
    hashed as it is written, and renamed when full or on `close()`, so a shard file
    under its final name is always complete. No TensorFlow is needed.
    """

    def __init__(self, folder: Path, split: str, modality: str, shard_size: int):
        self.folder, self.split, self.modality = Path(folder), split, modality
        self.shard_size = shard_size
        self.shards: list[dict] = []
        self._file: ShardFile | None = None

    def write(self, record: bytes) -> None:
        """Append one serialised record, starting a new shard when the current one is full."""
        self.write_framed(*framed(record))

    def write_framed(self, *pieces) -> None:
        """Append one record given in TFRecord framing (bytes or memoryviews: the whole framed
        record, or the pieces `framed` gives)."""
        if self._file is None:
            self._file = ShardFile(self.folder / shard_name(self.split, self.modality, len(self.shards)),
                                   self.modality)
        self._file.write(*pieces)
        if self._file.count >= self.shard_size:
            self._finish()

    def close(self) -> list[dict]:
        """Finish the open shard; returns [{'file', 'modality', 'records', 'sha256'}, ...]."""
        if self._file is not None:
            self._finish()
        return self.shards

    def _finish(self) -> None:
        self.shards.append(self._file.finish())
        self._file = None


class ShardFile:
    """One shard being written: framed records appended to a temporary file in the shard's
    folder and hashed on the way; `finish` renames it to `path`, `discard` removes it."""

    def __init__(self, path: Path, modality: str):
        self.path, self.modality = Path(path), modality
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            os.fchmod(fd, default_mode(0o666))
            self._f = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            Path(self._tmp).unlink(missing_ok=True)
            raise
        self._digest, self.count = hashlib.sha256(), 0

    def write(self, *pieces) -> None:
        """Append one framed record, in one or more pieces (bytes or memoryviews; no copy made)."""
        for piece in pieces:
            self._digest.update(piece)
            self._f.write(piece)
        self.count += 1

    def finish(self) -> dict:
        """Close, rename into place; the manifest entry {'file', 'modality', 'records', 'sha256'}."""
        try:
            self._f.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.discard()
            raise
        return {"file": self.path.name, "modality": self.modality, "records": self.count,
                "sha256": self._digest.hexdigest()}

    def discard(self) -> None:
        self._f.close()
        Path(self._tmp).unlink(missing_ok=True)


def shard_name(split: str, modality: str, index: int) -> str:
    """File name of shard number `index` (from 0) of one split and modality."""
    return f"{split}-{modality}-{index:05d}.tfrecord"


def framed(record: bytes) -> list[bytes]:
    """One serialised record in TFRecord framing, as the pieces of the file: length
    (uint64 little-endian), masked CRC-32C of the length, the record, masked CRC-32C
    of the record. The same bytes as `tf.io.TFRecordWriter` writes, without TensorFlow
    (CRC-32C from `google-crc32c`)."""
    length = struct.pack("<Q", len(record))
    return [length, struct.pack("<I", _masked_crc32c(length)), record, struct.pack("<I", _masked_crc32c(record))]


def _masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of `data` (uint32)."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def write_shard(path: Path, modality: str, records: Iterable[bytes]) -> dict:
    """Write `records` as one complete shard at `path` (under a temporary name, renamed
    when complete); its manifest entry, as `ShardWriter.close` gives them."""
    shard = ShardFile(path, modality)
    try:
        for record in records:
            shard.write(*framed(record))
    except BaseException:
        shard.discard()
        raise
    return shard.finish()

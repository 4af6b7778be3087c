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
    """
    if hr.shape[0] != lr.shape[0] * scale or hr.shape[1] != lr.shape[1] * scale:
        raise ValueError(f"LR shape {lr.shape} is not HR shape {hr.shape} / {scale}")
    features = [
        ("hr", _bytes_feature(_buffer(hr, "<i2"))),
        ("lr", _bytes_feature(_buffer(lr, "<f4"))),
        ("mask", _bytes_feature(pack_mask(mask))),
        ("height", _int_feature(hr.shape[0])), ("width", _int_feature(hr.shape[1])),
        ("scale", _int_feature(scale)),
        ("modality", _bytes_feature(meta.modality.encode())), ("split", _bytes_feature(meta.split.encode())),
        ("patient", _bytes_feature(meta.patient.encode())), ("series", _bytes_feature(meta.series.encode())),
        ("slice_index", _int_feature(meta.slice_index)),
        ("patch_y", _int_feature(meta.patch_y)), ("patch_x", _int_feature(meta.patch_x)),
        ("pixel_spacing", _float_feature(meta.pixel_spacing)),
    ]
    # Example.features = 1 {Features.feature map entries = 1 {key = 1, value = 2}}
    entries = [_nest(1, [_key(key), _nest(2, [value])]) for key, value in features]
    parts: list = []
    _flatten(_nest(1, entries), parts)
    return b"".join(parts)


# A protobuf message under construction: (length in bytes, its pieces), where a
# piece is bytes, a buffer (numpy array) or another such message.
_Message = tuple


def _buffer(array: np.ndarray, dtype) -> np.ndarray:
    """`array` as a C-contiguous array of `dtype` (no copy when it is one already)."""
    return np.ascontiguousarray(array, dtype=dtype)


def _nest(number: int, pieces: list) -> _Message:
    """A length-delimited protobuf field (wire type 2) around `pieces`."""
    length = sum(p[0] if isinstance(p, tuple) else p.nbytes if isinstance(p, np.ndarray) else len(p)
                 for p in pieces)
    header = varint(number << 3 | 2) + varint(length)
    return len(header) + length, [header, *pieces]


def _flatten(message: _Message, out: list) -> None:
    for piece in message[1]:
        if isinstance(piece, tuple):
            _flatten(piece, out)
        else:
            out.append(piece)


@functools.lru_cache(maxsize=64)
def _key(key: str) -> bytes:
    return field(1, key.encode())


def _bytes_feature(value) -> _Message:
    return _nest(1, [_nest(1, [value])])                    # Feature.bytes_list = 1 {value = 1}


def _float_feature(values) -> _Message:
    return _nest(2, [field(1, np.asarray(values, "<f4").tobytes())])  # float_list = 2, packed


def _int_feature(value: int) -> _Message:
    return _nest(3, [field(1, varint(int(value)))])       # int64_list = 3, packed


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

    Each shard is written under a temporary name and renamed when full or on
    `close()`, so a shard file under its final name is always complete.
    """

    def __init__(self, folder: Path, split: str, modality: str, shard_size: int):
        self.folder, self.split, self.modality = Path(folder), split, modality
        self.shard_size = shard_size
        self.shards: list[dict] = []
        self._writer = None
        self._count = 0

    def write(self, record: bytes) -> None:
        """Append one serialised record, starting a new shard when the current one is full."""
        import tensorflow as tf

        if self._writer is None:
            self._tmp = self.folder / f".{self._name()}.tmp"
            self._writer = tf.io.TFRecordWriter(str(self._tmp))
            self._count = 0
        self._writer.write(record)
        self._count += 1
        if self._count >= self.shard_size:
            self._finish()

    def close(self) -> list[dict]:
        """Finish the open shard; returns [{'file', 'modality', 'records', 'sha256'}, ...]."""
        if self._writer is not None:
            self._finish()
        return self.shards

    def _name(self) -> str:
        return shard_name(self.split, self.modality, len(self.shards))

    def _finish(self) -> None:
        self._writer.close()
        self._writer = None
        final = self.folder / self._name()
        os.replace(self._tmp, final)
        self.shards.append({"file": final.name, "modality": self.modality, "records": self._count,
                            "sha256": file_sha256(final)})


def shard_name(split: str, modality: str, index: int) -> str:
    """File name of shard number `index` (from 0) of one split and modality."""
    return f"{split}-{modality}-{index:05d}.tfrecord"


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def framed(record: bytes) -> list[bytes]:
    """One serialised record in TFRecord framing, as the pieces of the file: length
    (uint64 little-endian), masked CRC-32C of the length, the record, masked CRC-32C
    of the record. The same bytes as `tf.io.TFRecordWriter` writes, without TensorFlow
    (CRC-32C from `google-crc32c`, part of the beam extra)."""
    length = struct.pack("<Q", len(record))
    return [length, struct.pack("<I", _masked_crc32c(length)), record, struct.pack("<I", _masked_crc32c(record))]


def _masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of `data` (uint32)."""
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def write_shard(path: Path, modality: str, records: Iterable[bytes]) -> dict:
    """Write `records` as one complete shard at `path` without TensorFlow (under a temporary
    name, renamed when complete); its manifest entry, as `ShardWriter.close` gives them."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    digest, count = hashlib.sha256(), 0
    try:
        os.fchmod(fd, default_mode(0o666))
        with os.fdopen(fd, "wb") as f:
            for record in records:
                for piece in framed(record):
                    digest.update(piece)
                    f.write(piece)
                count += 1
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"file": path.name, "modality": modality, "records": count, "sha256": digest.hexdigest()}

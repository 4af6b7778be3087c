"""The protobuf wire format, for the few messages the package writes by hand.

TFRecord examples (`data.shards`), TensorFlow Serving warm-up requests
(`deploy.serving.artefacts`) and the gRPC Predict messages (`deploy.serving.messages`)
are written and read as bytes directly, so that none needs TensorFlow's protobuf
classes: varints and length-delimited fields suffice.
"""
from __future__ import annotations


def varint(value: int) -> bytes:
    """Protobuf base-128 varint (negative int64 as its 64-bit two's complement)."""
    value &= (1 << 64) - 1
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """Length-delimited field `number` (wire type 2) holding `payload`."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def varint_field(number: int, value: int) -> bytes:
    """Varint field `number` (wire type 0) holding `value` (int, enum or bool)."""
    return varint(number << 3) + varint(value)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the varint at `data[pos]`; ValueError when it runs past the end."""
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def field_parts(number: int, parts: list[bytes]) -> list[bytes]:
    """`field(number, b"".join(parts))` as a list of pieces, so that big payloads (tensors) are
    copied once, by the final join, however deeply they are nested."""
    return [varint(number << 3 | 2) + varint(sum(len(part) for part in parts)), *parts]


def fields(data: bytes | memoryview) -> list[tuple[int, int, int | memoryview]]:
    """The top-level fields of a serialised message: [(number, wire type, value)], value an int for
    varints and fixed-width fields, a memoryview (no copy) for length-delimited ones. ValueError for
    malformed data or the deprecated group wire types."""
    data = memoryview(data)
    out, pos = [], 0
    while pos < len(data):
        key, pos = read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = read_varint(data, pos)
        elif wire == 2:
            size, pos = read_varint(data, pos)
            if pos + size > len(data):
                raise ValueError("truncated length-delimited field")
            value, pos = data[pos:pos + size], pos + size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if pos + width > len(data):
                raise ValueError("truncated fixed-width field")
            value, pos = int.from_bytes(data[pos:pos + width], "little"), pos + width
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.append((number, wire, value))
    return out

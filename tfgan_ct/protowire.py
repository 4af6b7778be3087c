"""The protobuf wire format, for the few messages the package writes by hand.

TFRecord examples (`data.shards`) and TensorFlow Serving warm-up requests
(`deploy.serving.artefacts`) are written as bytes directly, so that neither needs
TensorFlow's protobuf classes: a varint and a length-delimited field suffice.
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

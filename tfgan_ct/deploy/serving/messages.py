"""The TensorFlow Serving gRPC messages the client and the stand-in exchange, as bytes.

Written and read with `tfgan_ct.protowire` against the field numbers of
`tensorflow_serving/apis/{predict,model,get_model_status}.proto` and
`tensorflow/core/framework/{tensor,tensor_shape}.proto`, so that a host
without TensorFlow (whose protobuf classes `tensorflow-serving-api` imports)
can talk to TensorFlow Serving over gRPC with `grpcio` alone. Tensors travel
as raw little-endian bytes (`TensorProto.tensor_content`); answers that use
the repeated `float_val` field instead are read too. The tests check every
message against the official classes of `tensorflow-serving-api`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tfgan_ct.protowire import field, field_parts, fields, varint_field

PREDICT = "/tensorflow.serving.PredictionService/Predict"
GET_MODEL_STATUS = "/tensorflow.serving.ModelService/GetModelStatus"
DT_FLOAT = 1
STATES = {0: "UNKNOWN", 10: "START", 20: "LOADING", 30: "AVAILABLE", 40: "UNLOADING", 50: "END"}


@dataclass(frozen=True)
class ModelSpec:
    """Which model, version (None: the newest) and signature a request is for."""

    name: str
    version: int | None = None
    signature: str = "serving_default"


def encode_spec(spec: ModelSpec) -> bytes:
    """ModelSpec: name 1, version 2 (google.protobuf.Int64Value, its value 1), signature_name 3."""
    out = field(1, spec.name.encode())
    if spec.version is not None:
        out += field(2, varint_field(1, spec.version))
    return out + (field(3, spec.signature.encode()) if spec.signature else b"")


def decode_spec(data: bytes | memoryview) -> ModelSpec:
    name, version, signature = "", None, ""
    for number, _, value in fields(data):
        if number == 1:
            name = bytes(value).decode()
        elif number == 2:
            version = next((v for n, _, v in fields(value) if n == 1), 0)
        elif number == 3:
            signature = bytes(value).decode()
    return ModelSpec(name, version, signature or "serving_default")


def tensor_parts(array: np.ndarray) -> list[bytes]:
    """TensorProto of a float32 array, in pieces: dtype 1, tensor_shape 2 (dim 2 {size 1}),
    tensor_content 4 (the raw little-endian bytes, not copied again until the message is joined)."""
    array = np.ascontiguousarray(array, dtype="<f4")
    shape = b"".join(field(2, varint_field(1, size)) for size in array.shape)
    return [varint_field(1, DT_FLOAT) + field(2, shape), *field_parts(4, [array.tobytes()])]


def encode_tensor(array: np.ndarray) -> bytes:
    """TensorProto of a float32 array (see `tensor_parts`)."""
    return b"".join(tensor_parts(array))


def decode_tensor(data: bytes | memoryview) -> np.ndarray:
    """A float32 TensorProto as an array (from tensor_content or float_val); ValueError otherwise.
    The array may share memory with `data` (read-only)."""
    dtype, shape, content, values = None, [], None, []
    for number, wire, value in fields(data):
        if number == 1:
            dtype = value
        elif number == 2:
            shape = [next((v for n, _, v in fields(dim) if n == 1), 0)
                     for n, _, dim in fields(value) if n == 2]
        elif number == 4:
            content = value
        elif number == 5:   # float_val: packed (wire 2) or one fixed32 per value (wire 5)
            values.append(np.frombuffer(value, "<f4") if wire == 2
                          else np.array([value], "<u4").view("<f4"))
    if dtype != DT_FLOAT:
        raise ValueError(f"tensor of dtype {dtype}, expected DT_FLOAT (1)")
    if content is not None and len(content) % 4:
        raise ValueError(f"tensor_content of {len(content)} bytes is not whole float32 values")
    flat = np.frombuffer(content, "<f4") if content is not None else \
        (np.concatenate(values) if values else np.zeros(0, "<f4"))
    count = int(np.prod(shape)) if shape else 1
    if flat.size == 1 and count > 1:
        flat = np.full(count, flat[0], "<f4")   # TensorFlow's short form: one value fills the tensor
    if flat.size != count:
        raise ValueError(f"tensor holds {flat.size} values for shape {shape}")
    return flat.astype(np.float32, copy=False).reshape(shape)


def _map_entry(number: int, key: str, array: np.ndarray) -> list[bytes]:
    """A map<string, TensorProto> entry as field `number`: key 1, value 2."""
    return field_parts(number, [field(1, key.encode()), *field_parts(2, tensor_parts(array))])


def _decode_map(entries: list) -> dict[str, np.ndarray]:
    out = {}
    for entry in entries:
        parts = {n: v for n, _, v in fields(entry)}
        out[bytes(parts.get(1, b"")).decode()] = decode_tensor(parts.get(2, b""))
    return out


def encode_predict_request(spec: ModelSpec, inputs: dict[str, np.ndarray]) -> bytes:
    """PredictRequest: model_spec 1, inputs 2 (map<string, TensorProto>)."""
    return b"".join([field(1, encode_spec(spec)), *(p for k, v in inputs.items() for p in _map_entry(2, k, v))])


def decode_predict_request(data: bytes) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    parsed = fields(data)
    spec = next((decode_spec(v) for n, _, v in parsed if n == 1), ModelSpec(""))
    return spec, _decode_map([v for n, _, v in parsed if n == 2])


def encode_predict_response(spec: ModelSpec, outputs: dict[str, np.ndarray]) -> bytes:
    """PredictResponse: outputs 1 (map<string, TensorProto>), model_spec 2."""
    return b"".join([*(p for k, v in outputs.items() for p in _map_entry(1, k, v)), field(2, encode_spec(spec))])


def decode_predict_response(data: bytes) -> dict[str, np.ndarray]:
    return _decode_map([v for n, _, v in fields(data) if n == 1])


def encode_status_request(spec: ModelSpec) -> bytes:
    """GetModelStatusRequest: model_spec 1 (no signature)."""
    return field(1, encode_spec(ModelSpec(spec.name, spec.version, "")))


def decode_status_request(data: bytes) -> ModelSpec:
    return next((decode_spec(v) for n, _, v in fields(data) if n == 1), ModelSpec(""))


def encode_status_response(versions: list[tuple[int, str]]) -> bytes:
    """GetModelStatusResponse: model_version_status 1 {version 1, state 2, status 3 {error_code 1}}."""
    codes = {name: code for code, name in STATES.items()}
    return b"".join(field(1, varint_field(1, version) + varint_field(2, codes[state]) + field(3, b""))
                    for version, state in versions)


def decode_status_response(data: bytes) -> list[dict]:
    """[{"version": int, "state": "AVAILABLE", ...}] as the REST API gives them."""
    out = []
    for number, _, value in fields(data):
        if number == 1:
            parts = {n: v for n, _, v in fields(value)}
            out.append({"version": str(parts.get(1, 0)), "state": STATES.get(parts.get(2, 0), "UNKNOWN")})
    return out

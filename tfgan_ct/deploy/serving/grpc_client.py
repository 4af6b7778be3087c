"""A client for TensorFlow Serving's gRPC API (`grpcio` and numpy only, no TensorFlow).

`--server grpc://HOST:8500` (or `grpcs://` for TLS) in `upscale`, `evaluate` and
`pacs` uses it through `tfgan_ct.deploy.inference`. Images travel as raw
float32 bytes in `TensorProto.tensor_content` (`messages`), not as JSON text.
Calls have a deadline; UNAVAILABLE (the server starting or restarting) is
retried with bounded backoff; every other failure becomes one ServingError
line naming the server, e.g. for NOT_FOUND (no such model or version) and
INVALID_ARGUMENT (a wrong signature or input).
"""
from __future__ import annotations

import threading
import time
from urllib.parse import urlsplit

import grpc
import numpy as np

import tfgan_ct.deploy.serving.messages as messages
from tfgan_ct.deploy.layout import SIGNATURES
from tfgan_ct.deploy.serving.client import checked_answer, lr_batch
from tfgan_ct.deploy.serving.errors import ServingError

SCHEMES = ("grpc", "grpcs")
RETRIES = (0.5, 1.0, 2.0, 4.0)     # seconds before each retry on UNAVAILABLE
_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
_channels: dict[str, grpc.Channel] = {}
_lock = threading.Lock()


def is_grpc(url: str) -> bool:
    """Whether `url` names a gRPC endpoint (grpc:// or grpcs://)."""
    return urlsplit(url).scheme in SCHEMES


def _channel(url: str) -> grpc.Channel:
    """One channel per URL for the process (gRPC channels are meant to be shared)."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.hostname or not parts.port:
        raise ServingError(f"{url}: a gRPC server is grpc://HOST:PORT (or grpcs:// for TLS), e.g. "
                           f"grpc://localhost:8500")
    with _lock:
        if url not in _channels:
            target = f"{parts.hostname}:{parts.port}"
            _channels[url] = (grpc.secure_channel(target, grpc.ssl_channel_credentials(), _OPTIONS)
                              if parts.scheme == "grpcs" else grpc.insecure_channel(target, _OPTIONS))
        return _channels[url]


def _call(url: str, method: str, request: bytes, timeout: float, what: str, sleep=time.sleep) -> bytes:
    """One unary call with raw bytes; retries UNAVAILABLE, then raises ServingError (one line)."""
    stub = _channel(url).unary_unary(method)   # no (de)serialisers: bytes in, bytes out
    for attempt, delay in enumerate([*RETRIES, None], start=1):
        try:
            return stub(request, timeout=timeout)
        except grpc.RpcError as exc:
            code, detail = exc.code(), next(iter((exc.details() or "").splitlines()), "")
            if code == grpc.StatusCode.UNAVAILABLE and delay is not None:
                sleep(delay)
                continue
            raise ServingError(_message(url, what, code, detail, timeout, attempt)) from None
    raise AssertionError("unreachable")


def _message(url: str, what: str, code, detail: str, timeout: float, attempts: int) -> str:
    if code == grpc.StatusCode.UNAVAILABLE:
        return (f"cannot reach TensorFlow Serving at {url} after {attempts} attempts ({detail or 'unavailable'}; "
                f"is the server running with its gRPC port there?)")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{url}: {what}: no answer within {timeout:g} s"
    if code == grpc.StatusCode.NOT_FOUND:
        return f"{url}: {what}: not found ({detail})"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return f"{url}: {what}: invalid request ({detail})"
    return f"{url}: {what}: {code.name} ({detail})"


def predict(url: str, model: str, lr: np.ndarray, signature: str = "serving_default",
            version: int | None = None, timeout: float = 120.0) -> np.ndarray:
    """Super-resolve `lr` with `model` served at `url` over gRPC (PredictionService/Predict).

    lr: float32 [b, h, w, 1] ([0, 1] for serving_default, HU for `hu`). Returns float32
    [b, 4h, 4w, 1] in the same units; `version` None asks for the newest served version.
    Raises ServingError naming the server when it cannot be reached, refuses the request or
    answers with another shape.
    """
    lr = lr_batch(lr)
    names = SIGNATURES.get(signature, ("lr", "sr"))
    spec = messages.ModelSpec(model, version, signature)
    what = f"Predict {model}" + (f" version {version}" if version is not None else "")
    answer = _call(url, messages.PREDICT, messages.encode_predict_request(spec, {names[0]: lr}), timeout, what)
    try:
        outputs = messages.decode_predict_response(answer)
    except ValueError as exc:
        raise ServingError(f"{url}: {what}: unreadable answer ({exc})") from None
    sr = outputs[names[1]] if names[1] in outputs else next(iter(outputs.values()), None)
    return checked_answer(sr, lr, f"{url}: {what}")


def model_status(url: str, model: str, version: int | None = None, timeout: float = 10.0) -> dict:
    """ModelService/GetModelStatus as the REST API answers it: {"model_version_status": [...]}."""
    answer = _call(url, messages.GET_MODEL_STATUS, messages.encode_status_request(messages.ModelSpec(model, version)),
                   timeout, f"GetModelStatus {model}")
    return {"model_version_status": messages.decode_status_response(answer)}

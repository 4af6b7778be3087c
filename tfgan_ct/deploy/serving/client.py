"""A client for TensorFlow Serving's REST predict API (standard library and numpy only).

`tfgan-ct upscale/evaluate --server URL` use it through `tfgan_ct.deploy.inference`.
Images are float32 [b, h, w, 1]: [0, 1] of the window for `serving_default`,
HU for `hu`; the answer is [b, 4h, 4w, 1] in the same units.
"""
from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import numpy as np

from tfgan_ct.deploy.layout import SIGNATURES
from tfgan_ct.deploy.serving.errors import ServingError

SCALE = 4


def predict(url: str, model: str, lr: np.ndarray, signature: str = "serving_default",
            version: int | None = None, timeout: float = 120.0, request_format: str = "inputs") -> np.ndarray:
    """Super-resolve `lr` with the model `model` served at `url` (TF Serving REST API).

    lr: float32 [b, h, w, 1] ([0, 1] for serving_default, HU for `hu`).
    Returns float32 [b, 4h, 4w, 1] in the same units. `request_format` is
    "inputs" (columnar) or "instances" (row); `version` None asks for the
    newest served version. Raises ServingError naming the URL when the server
    cannot be reached, answers with an error, or returns another shape.
    """
    lr = lr_batch(lr)
    endpoint = f"{url.rstrip('/')}/v1/models/{model}" + (f"/versions/{int(version)}" if version is not None else "")
    body = {"signature_name": signature}
    if request_format == "inputs":
        name = SIGNATURES.get(signature, (None,))[0]
        body["inputs"] = {name: lr.tolist()} if name else lr.tolist()
    elif request_format == "instances":
        body["instances"] = lr.tolist()
    else:
        raise ValueError(f"request_format must be 'inputs' or 'instances', not {request_format!r}")
    answer = _post_json(f"{endpoint}:predict", body, timeout)
    result = answer.get("outputs", answer.get("predictions"))
    if isinstance(result, dict):                                     # several outputs: pick ours
        result = result.get(SIGNATURES.get(signature, (None, None))[1], result)
    if result is None:
        raise ServingError(f"{endpoint}:predict: the answer has neither 'outputs' nor 'predictions'")
    try:
        sr = np.asarray(result, np.float32)
    except (TypeError, ValueError):
        raise ServingError(f"{endpoint}:predict: the answer is not a numeric array") from None
    return checked_answer(sr, lr, f"{endpoint}:predict")


def lr_batch(lr) -> np.ndarray:
    """`lr` as float32 [b, h, w, 1] (what both transports send); ValueError for another shape."""
    lr = np.asarray(lr, np.float32)
    if lr.ndim != 4 or lr.shape[-1] != 1 or 0 in lr.shape:
        raise ValueError(f"lr must be [batch, height, width, 1], got shape {lr.shape}")
    return lr


def checked_answer(sr: np.ndarray | None, lr: np.ndarray, where: str) -> np.ndarray:
    """`sr` when it is the [b, 4h, 4w, 1] answer to `lr` [b, h, w, 1]; else ServingError naming `where`."""
    expected = (lr.shape[0], SCALE * lr.shape[1], SCALE * lr.shape[2], 1)
    if sr is None or sr.shape != expected:
        raise ServingError(f"{where} returned shape {None if sr is None else sr.shape}, expected {expected}")
    return sr


def model_status(url: str, model: str, timeout: float = 10.0) -> dict:
    """TF Serving's model status (GET /v1/models/<model>): {"model_version_status": [...]}."""
    return _request_json(urllib.request.Request(f"{url.rstrip('/')}/v1/models/{model}"), timeout)


def _post_json(endpoint: str, body: dict, timeout: float) -> dict:
    """POST `body` as JSON to `endpoint`; the decoded JSON answer."""
    data = json.dumps(body).encode()
    request = urllib.request.Request(endpoint, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    return _request_json(request, timeout)


def _request_json(request: urllib.request.Request, timeout: float) -> dict:
    """Send `request`, return the decoded JSON object; errors as ServingError naming the URL."""
    where = request.full_url
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")
        try:
            detail = json.loads(detail).get("error", detail)
        except (ValueError, AttributeError):
            pass
        raise ServingError(f"{where}: HTTP {exc.code}: {detail}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ConnectionRefusedError):
            reason = "connection refused (is the server running on that host and port?)"
        raise ServingError(f"cannot reach TensorFlow Serving at {where}: {reason}") from None
    except (TimeoutError, socket.timeout):
        raise ServingError(f"{where}: no answer within {timeout} s") from None
    except (ConnectionError, OSError) as exc:
        raise ServingError(f"{where}: {exc}") from None
    try:
        answer = json.loads(raw)
    except ValueError:
        raise ServingError(f"{where}: the answer is not JSON ({raw[:200]!r})") from None
    if not isinstance(answer, dict):
        raise ServingError(f"{where}: the answer is not a JSON object")
    return answer

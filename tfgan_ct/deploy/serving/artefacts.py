"""TensorFlow Serving deployment: models.config, warm-up requests, a REST client, a stand-in server.

The exports under `saved_models/<stage>/<version>/` already have the layout
TensorFlow Serving reads (see `tfgan_ct.deploy.export`). This module adds what a
deployment needs around them:

* `models_config`   the text-format `ModelServerConfig` (`--model_config_file`)
                    with one model per exported stage;
* `write_warmup`    `assets.extra/tf_serving_warmup_requests`, the requests
                    TF Serving runs when it loads a version, so the first real
                    request does not pay for graph setup;
* `predict`         a client for TF Serving's REST predict API (standard library);
* `make_standin`    a STAND-IN for tests and demos that answers the same REST
                    requests from the same SavedModels with plain TensorFlow.
                    It is not TF Serving: no batching, no gRPC, no version
                    policy beyond "newest", no hot reload. Deploy with the
                    official `tensorflow/serving` image (tools/serving/README.md).

Images are float32 [batch, h, w, 1] in [0, 1] (the modality window mapped to
0..1) for `serving_default` (`lr` -> `sr`, x4 in h and w), and HU for the
`hu` signature (`lr_hu` -> `sr_hu`).

Command line (stand-in and config file only; training and conversion are in `tfgan-ct`):

    python -m tfgan_ct.deploy.serving config  --models-dir saved_models --base-path /models
    python -m tfgan_ct.deploy.serving standin --models-dir saved_models --port 8501
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import tempfile
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from tfgan_ct.fileio import default_mode
from tfgan_ct.protowire import field
from tfgan_ct.errors import TfganError
from tfgan_ct.stages import STAGES


WARMUP_FILE = "tf_serving_warmup_requests"
WARMUP_SIZES = ((1, 32, 32), (1, 128, 128))   # (batch, LR height, LR width): a patch, a 512-slice's LR
SIGNATURES = {"serving_default": ("lr", "sr"), "hu": ("lr_hu", "sr_hu")}   # signature: (input, output)
SCALE = 4


class ServingError(TfganError, RuntimeError):
    """A deployment problem: no export, server unreachable, or an error answered by the server."""


# --------------------------------------------------------------------------- models.config

def versions(stage_dir: Path) -> list[int]:
    """Integer versions under saved_models/<stage> that hold a saved_model.pb, sorted.

    The rule of `tfgan_ct.deploy.export.versions`, repeated here so that writing
    models.config does not import TensorFlow.
    """
    if not stage_dir.is_dir():
        return []
    return sorted(int(p.name) for p in stage_dir.iterdir()
                  if p.is_dir() and p.name.isdigit() and (p / "saved_model.pb").is_file())


def exported_stages(models_dir: str | Path) -> dict[str, list[int]]:
    """Stages under `models_dir` that have at least one complete export: {stage: [versions]}.

    Known stages come in chain order (natural, ncct, ctp, cta), others after them by name.
    """
    models_dir = Path(models_dir)
    found = {p.name: versions(p) for p in models_dir.iterdir()
             if p.is_dir() and not p.name.startswith(".")} if models_dir.is_dir() else {}
    order = sorted(found, key=lambda s: (STAGES.index(s) if s in STAGES else len(STAGES), s))
    return {stage: found[stage] for stage in order if found[stage]}


def models_config(models_dir: str | Path, base_path: str | None = None) -> str:
    """Text-format `ModelServerConfig` with one model per exported stage under `models_dir`.

    Each model is named after its stage; `base_path` is `<base_path>/<stage>`
    (e.g. "/models" where the container mounts saved_models) or, when
    `base_path` is None, the absolute path of `models_dir/<stage>` on this
    machine. TF Serving then serves each stage's newest integer version.
    Raises ServingError when no stage has an export.
    """
    stages = exported_stages(models_dir)
    if not stages:
        raise no_export_error(models_dir)
    blocks = []
    for stage in stages:
        path = f"{base_path.rstrip('/')}/{stage}" if base_path else str((Path(models_dir) / stage).resolve())
        blocks.append("  config {\n"
                      f"    name: {_quote(stage)}\n"
                      f"    base_path: {_quote(path)}\n"
                      '    model_platform: "tensorflow"\n'
                      "  }\n")
    return "model_config_list {\n" + "".join(blocks) + "}\n"


def no_export_error(models_dir: str | Path) -> ServingError:
    """The error for a models folder without any complete export."""
    return ServingError(f"no export found under {Path(models_dir).resolve()} (expected <stage>/<version>/"
                        f"saved_model.pb); make one with `tfgan-ct train --stage ncct --data DIR`")


def _quote(text: str) -> str:
    """A protobuf text-format string literal."""
    if any(ord(c) < 32 for c in text):
        raise ServingError(f"control character in {text!r}")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --------------------------------------------------------------------------- warm-up requests

def warmup_record(shape: tuple[int, int, int, int], model_name: str | None = None,
                  signature: str = "serving_default") -> bytes:
    """One serialised `tensorflow.serving.PredictionLog` holding a PredictRequest.

    The request asks `signature` for zeros (float32, `shape` = [b, h, w, 1],
    the window's floor) under the signature's input name. The protobuf is
    written directly (as `tfgan_ct.data.shards` writes tf.train.Example) so that
    exporting needs no `tensorflow-serving-api`, whose releases pin TensorFlow.
    """
    import tensorflow as tf

    tensor = tf.make_tensor_proto(np.zeros(shape, np.float32)).SerializeToString()
    spec = (field(1, model_name.encode()) if model_name else b"") + field(3, signature.encode())
    entry = field(1, SIGNATURES[signature][0].encode()) + field(2, tensor)   # map entry: key 1, value 2
    request = field(1, spec) + field(2, entry)          # PredictRequest: model_spec 1, inputs 2
    return field(6, field(1, request))                  # PredictionLog.predict_log 6 {PredictLog.request 1}


def write_warmup(export_dir: str | Path, sizes=WARMUP_SIZES, model_name: str | None = None) -> Path:
    """Write `<export_dir>/assets.extra/tf_serving_warmup_requests`; returns its path.

    A TFRecord file of PredictionLog records, one per (batch, height, width) in
    `sizes` (LR pixels), each a serving_default request with zeros in `lr`
    [batch, height, width, 1]. Written under a temporary name, then renamed.
    """
    import tensorflow as tf

    folder = Path(export_dir) / "assets.extra"
    folder.mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{WARMUP_FILE}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        with tf.io.TFRecordWriter(tmp) as writer:
            for batch, height, width in sizes:
                writer.write(warmup_record((batch, height, width, 1), model_name))
        os.chmod(tmp, default_mode(0o666))  # mkstemp makes it owner-only; the server may run as another user
        os.replace(tmp, folder / WARMUP_FILE)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return folder / WARMUP_FILE


# --------------------------------------------------------------------------- REST client

def predict(url: str, model: str, lr: np.ndarray, signature: str = "serving_default",
            version: int | None = None, timeout: float = 120.0, request_format: str = "inputs") -> np.ndarray:
    """Super-resolve `lr` with the model `model` served at `url` (TF Serving REST API).

    lr: float32 [b, h, w, 1] ([0, 1] for serving_default, HU for `hu`).
    Returns float32 [b, 4h, 4w, 1] in the same units. `request_format` is
    "inputs" (columnar) or "instances" (row); `version` None asks for the
    newest served version. Raises ServingError naming the URL when the server
    cannot be reached, answers with an error, or returns another shape.
    """
    lr = np.asarray(lr, np.float32)
    if lr.ndim != 4 or lr.shape[-1] != 1 or 0 in lr.shape:
        raise ValueError(f"lr must be [batch, height, width, 1], got shape {lr.shape}")
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
    expected = (lr.shape[0], SCALE * lr.shape[1], SCALE * lr.shape[2], 1)
    if sr.shape != expected:
        raise ServingError(f"{endpoint}:predict returned shape {sr.shape}, expected {expected}")
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


# --------------------------------------------------------------------------- stand-in server

@dataclass
class LoadedModel:
    """One stage's newest export, loaded with plain TensorFlow."""

    name: str
    version: int
    path: Path
    signatures: dict          # signature name -> concrete function
    module: object            # the loaded SavedModel (keeps the variables alive)


def load_models(models_dir: str | Path) -> dict[str, LoadedModel]:
    """{stage: LoadedModel} for the newest version of every exported stage under `models_dir`."""
    import tensorflow as tf

    stages = exported_stages(models_dir)
    if not stages:
        raise no_export_error(models_dir)
    loaded = {}
    for stage, available in stages.items():
        path = Path(models_dir) / stage / str(available[-1])
        module = tf.saved_model.load(str(path))
        loaded[stage] = LoadedModel(stage, available[-1], path, dict(module.signatures), module)
    return loaded


class RequestError(Exception):
    """A request the stand-in refuses; becomes {"error": message} with `status`."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


_ROUTE = re.compile(r"/v1/models/([^/:]+)(?:/versions/(\d+))?(?::(predict))?")


def run_predict(model: LoadedModel, body: dict) -> dict:
    """Answer one REST predict body ({"signature_name", "inputs" | "instances"}) like TF Serving.

    Columnar "inputs" -> {"outputs": value}; row "instances" -> {"predictions": [per instance]}.
    A signature with one input accepts the value unnamed; one output is returned unnamed.
    """
    import tensorflow as tf

    if not isinstance(body, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, "request body must be a JSON object")
    name = body.get("signature_name", "serving_default")
    function = model.signatures.get(name)
    if function is None:
        raise RequestError(HTTPStatus.BAD_REQUEST, f'Serving signature name: "{name}" not found in signature def '
                                                   f"(available: {', '.join(sorted(model.signatures))})")
    specs = function.structured_input_signature[1]            # {input name: TensorSpec}
    if ("inputs" in body) == ("instances" in body):
        raise RequestError(HTTPStatus.BAD_REQUEST, 'request must have exactly one of "inputs" or "instances"')
    if "inputs" in body:                                    # columnar: {name: value} or a lone value
        values = body["inputs"]
        if not isinstance(values, dict) and len(specs) == 1:
            values = {next(iter(specs)): values}
    else:                                                   # row: [{name: value}, ...] or [value, ...]
        rows = body["instances"]
        if not isinstance(rows, list) or not rows:
            raise RequestError(HTTPStatus.BAD_REQUEST, '"instances" must be a non-empty list')
        if all(isinstance(row, dict) for row in rows):
            values = {key: [row.get(key) for row in rows] for key in specs}
        else:
            values = {next(iter(specs)): rows} if len(specs) == 1 else None
    if not isinstance(values, dict) or set(values) != set(specs):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"signature {name!r} takes inputs {sorted(specs)}")
    tensors = {}
    for key, spec in specs.items():
        try:
            array = np.asarray(values[key], spec.dtype.as_numpy_dtype)
        except (TypeError, ValueError) as exc:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"input {key!r}: not a {spec.dtype.name} array ({exc})")
        if not spec.shape.is_compatible_with(array.shape):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"input {key!r}: shape {list(array.shape)} does not match "
                                                       f"{spec.shape.as_list()} (None = any)")
        tensors[key] = tf.constant(array)
    try:
        outputs = {k: v.numpy() for k, v in function(**tensors).items()}
    except (tf.errors.OpError, ValueError, TypeError) as exc:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"running {name!r}: {str(exc).splitlines()[0]}")
    if "inputs" in body:
        return {"outputs": next(iter(outputs.values())).tolist() if len(outputs) == 1
                else {k: v.tolist() for k, v in outputs.items()}}
    if len(outputs) == 1:
        return {"predictions": next(iter(outputs.values())).tolist()}
    batch = len(next(iter(outputs.values())))
    return {"predictions": [{k: v[i].tolist() for k, v in outputs.items()} for i in range(batch)]}


def version_status(model: LoadedModel) -> dict:
    """TF Serving's GetModelStatus answer for the one loaded version."""
    return {"model_version_status": [{"version": str(model.version), "state": "AVAILABLE",
                                      "status": {"error_code": "OK", "error_message": ""}}]}


class _StandinHandler(BaseHTTPRequestHandler):
    """HTTP routing of the stand-in: GET status, POST predict; errors as {"error": ...}."""

    server_version = "tfgan-ct-standin"
    max_body = 1 << 30   # bytes

    def do_GET(self):  # noqa: N802 (http.server naming)
        def handle(model, predict):
            if predict:
                raise RequestError(HTTPStatus.METHOD_NOT_ALLOWED, "predict needs POST")
            return version_status(model)
        self._answer(handle)

    def do_POST(self):  # noqa: N802
        def handle(model, predict):
            if not predict:
                raise RequestError(HTTPStatus.METHOD_NOT_ALLOWED, "POST is for <model>:predict")
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= self.max_body:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"request body of {length} bytes")
            try:
                body = json.loads(self.rfile.read(length))
            except ValueError as exc:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"JSON Parse error: {exc}")
            return run_predict(model, body)
        self._answer(handle)

    def _answer(self, handle):
        try:
            route = _ROUTE.fullmatch(self.path.split("?")[0])
            if not route:
                raise RequestError(HTTPStatus.NOT_FOUND, f"Malformed request: {self.command} {self.path}")
            name, version, predict = route.groups()
            model = self.server.models.get(name)
            if model is None or (version is not None and int(version) != model.version):
                request = f"Specific({name}, {version})" if version else f"Latest({name})"
                raise RequestError(HTTPStatus.NOT_FOUND, f"Servable not found for request: {request}")
            status, answer = HTTPStatus.OK, handle(model, predict)
        except RequestError as exc:
            status, answer = exc.status, {"error": str(exc)}
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # noqa: A002 (http.server signature)
        if not self.server.quiet:
            super().log_message(format, *args)


class StandinServer(ThreadingHTTPServer):
    """STAND-IN for TensorFlow Serving's REST API (tests and demos only; see the module docstring)."""

    daemon_threads = True

    def __init__(self, models: dict[str, LoadedModel], host: str, port: int, quiet: bool):
        super().__init__((host, port), _StandinHandler)
        self.models, self.quiet = models, quiet

    @property
    def url(self) -> str:
        """http://host:port of the bound socket (the real port when 0 was asked for)."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def make_standin(models_dir: str | Path, host: str = "127.0.0.1", port: int = 8501,
                 quiet: bool = True) -> StandinServer:
    """Load every stage's newest export and bind the stand-in (port 0: any free port).

    The caller runs `serve_forever()` (e.g. in a thread), then `shutdown()` and `server_close()`.
    """
    return StandinServer(load_models(models_dir), host, port, quiet)


def start_standin(models_dir: str | Path, host: str = "127.0.0.1", port: int = 0) -> StandinServer:
    """`make_standin` serving from a daemon thread; returns the server (see its `url`)."""
    server = make_standin(models_dir, host, port)
    threading.Thread(target=server.serve_forever, name="tfgan-ct-standin", daemon=True).start()
    return server


def main(argv=None) -> int:
    """`python -m tfgan_ct.deploy.serving config|standin ...`."""
    parser = argparse.ArgumentParser(prog="python -m tfgan_ct.deploy.serving", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    config = commands.add_parser("config", help="print or write models.config for TensorFlow Serving")
    config.add_argument("--models-dir", default="saved_models")
    config.add_argument("--base-path", default=None,
                        help="model path prefix as the server sees it, e.g. /models (default: absolute local path)")
    config.add_argument("--out", default=None, help="write here instead of printing")
    standin = commands.add_parser("standin", help="STAND-IN REST server for tests and demos (not TF Serving)")
    standin.add_argument("--models-dir", default="saved_models")
    standin.add_argument("--host", default="127.0.0.1")
    standin.add_argument("--port", type=int, default=8501)
    args = parser.parse_args(argv)
    try:
        if args.command == "config":
            text = models_config(args.models_dir, args.base_path)
            if args.out:
                from tfgan_ct.fileio import atomic_write_text
                atomic_write_text(Path(args.out), text)
                Path(args.out).chmod(0o644)  # the server may run as another user
                print(f"wrote {args.out}")
            else:
                print(text, end="")
            return 0
        server = make_standin(args.models_dir, args.host, args.port, quiet=False)
    except ServingError as exc:
        parser.exit(2, f"error: {exc}\n")
    models = ", ".join(f"{m.name} v{m.version}" for m in server.models.values())
    print(f"stand-in for TensorFlow Serving (tests and demos only) at {server.url}: {models}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

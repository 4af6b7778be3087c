"""A STAND-IN for TensorFlow Serving's REST API, for tests and demos only.

TensorFlow Serving cannot run everywhere (no registry package, Docker may be
missing), so this small HTTP server answers the same REST requests
(`GET /v1/models/<name>`, `POST /v1/models/<name>[/versions/<n>]:predict` in
the columnar and row formats, errors as {"error": ...}) from the newest
export of every stage, loaded with plain `tf.saved_model.load`, and with a
gRPC port the gRPC Predict and GetModelStatus calls (`standin_grpc`). It is
not TF Serving: no batching, warm-up, version policy beyond "newest", hot
reload or monitoring. Deploy with the official `tensorflow/serving` image
(tools/serving/README.md).
"""
from __future__ import annotations

import json
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tfgan_ct.deploy.serving.loaded import (
    LoadedModel,
    RequestError,
    find_model,
    load_models,
    run_signature,
    signature,
)

_ROUTE = re.compile(r"/v1/models/([^/:]+)(?:/versions/(\d+))?(?::(predict))?")


def run_predict(model: LoadedModel, body: dict) -> dict:
    """Answer one REST predict body ({"signature_name", "inputs" | "instances"}) like TF Serving.

    Columnar "inputs" -> {"outputs": value}; row "instances" -> {"predictions": [per instance]}.
    A signature with one input accepts the value unnamed; one output is returned unnamed.
    """
    if not isinstance(body, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, "request body must be a JSON object")
    name = body.get("signature_name", "serving_default")
    specs = signature(model, name).structured_input_signature[1]            # {input name: TensorSpec}
    values = _request_values(body, specs)
    return _answer(run_signature(model, name, values), columnar="inputs" in body)


def _request_values(body: dict, specs: dict):
    """{input name: value} of a request body, columnar ("inputs") or row ("instances"); None or
    another mapping when it does not name the inputs of `specs` (the caller says so)."""
    if ("inputs" in body) == ("instances" in body):
        raise RequestError(HTTPStatus.BAD_REQUEST, 'request must have exactly one of "inputs" or "instances"')
    if "inputs" in body:                                    # columnar: {name: value} or a lone value
        values = body["inputs"]
        return {next(iter(specs)): values} if not isinstance(values, dict) and len(specs) == 1 else values
    rows = body["instances"]                                # row: [{name: value}, ...] or [value, ...]
    if not isinstance(rows, list) or not rows:
        raise RequestError(HTTPStatus.BAD_REQUEST, '"instances" must be a non-empty list')
    if all(isinstance(row, dict) for row in rows):
        return {key: [row.get(key) for row in rows] for key in specs}
    return {next(iter(specs)): rows} if len(specs) == 1 else None


def _answer(outputs: dict, columnar: bool) -> dict:
    """TF Serving's answer for `outputs` {name: array [b, ...]}: {"outputs": ...} to a columnar
    request, {"predictions": [per instance]} to a row request; one output is given unnamed."""
    if columnar:
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
                raise RequestError(HTTPStatus.BAD_REQUEST, f"JSON Parse error: {exc}") from None
            return run_predict(model, body)
        self._answer(handle)

    def _answer(self, handle):
        try:
            route = _ROUTE.fullmatch(self.path.split("?")[0])
            if not route:
                raise RequestError(HTTPStatus.NOT_FOUND, f"Malformed request: {self.command} {self.path}")
            name, version, predict = route.groups()
            model = find_model(self.server.models, name, None if version is None else int(version))
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
    """STAND-IN for TensorFlow Serving's REST API, and with `grpc_port` its gRPC API (tests and
    demos only; see the module docstring)."""

    daemon_threads = True

    def __init__(self, models: dict[str, LoadedModel], host: str, port: int, quiet: bool,
                 grpc_port: int | None = None):
        super().__init__((host, port), _StandinHandler)
        self.models, self.quiet = models, quiet
        self.grpc, self.grpc_url = None, None
        if grpc_port is not None:
            from tfgan_ct.deploy.serving.standin_grpc import start as start_grpc

            try:
                self.grpc, bound = start_grpc(models, host, grpc_port)
            except BaseException:
                super().server_close()
                raise
            self.grpc_url = f"grpc://{host}:{bound}"

    @property
    def url(self) -> str:
        """http://host:port of the bound socket (the real port when 0 was asked for)."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def server_close(self) -> None:
        """Close the REST socket and stop the gRPC server."""
        if self.grpc is not None:
            self.grpc.stop(grace=1).wait()
        super().server_close()


def make_standin(models_dir: str | Path, host: str = "127.0.0.1", port: int = 8501,
                 quiet: bool = True, grpc_port: int | None = None) -> StandinServer:
    """Load every stage's newest export and bind the stand-in (port 0: any free port; `grpc_port`
    None: no gRPC). The caller runs `serve_forever()` (e.g. in a thread), then `shutdown()` and
    `server_close()`.
    """
    return StandinServer(load_models(models_dir), host, port, quiet, grpc_port)


def start_standin(models_dir: str | Path, host: str = "127.0.0.1", port: int = 0,
                  grpc_port: int | None = None) -> StandinServer:
    """`make_standin` serving from a daemon thread; returns the server (see `url`, `grpc_url`)."""
    server = make_standin(models_dir, host, port, grpc_port=grpc_port)
    threading.Thread(target=server.serve_forever, name="tfgan-ct-standin", daemon=True).start()
    return server


def serve(server: StandinServer, announce) -> None:
    """Announce `server` with `announce(line)`, serve until interrupted (Ctrl-C), then close it."""
    models = ", ".join(f"{m.name} v{m.version}" for m in server.models.values())
    where = server.url + (f" and {server.grpc_url}" if server.grpc_url else "")
    announce(f"stand-in for TensorFlow Serving (tests and demos only) at {where}: {models}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

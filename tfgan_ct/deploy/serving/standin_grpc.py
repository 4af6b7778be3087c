"""The gRPC side of the STAND-IN for TensorFlow Serving (tests and demos only).

Answers `tensorflow.serving.PredictionService/Predict` and
`tensorflow.serving.ModelService/GetModelStatus` from the same loaded
SavedModels as the REST stand-in (`loaded.run_signature`), with the messages
read and written by `messages` and grpcio's generic handlers. Errors use TF
Serving's status codes: NOT_FOUND for an unknown model or version,
INVALID_ARGUMENT for a wrong signature or input. Not TensorFlow Serving:
deploy with the `tensorflow/serving` image.
"""
from __future__ import annotations

from concurrent import futures
from http import HTTPStatus

import grpc

import tfgan_ct.deploy.serving.messages as messages
from tfgan_ct.deploy.serving.loaded import LoadedModel, RequestError, find_model, run_signature

_CODES = {HTTPStatus.NOT_FOUND: grpc.StatusCode.NOT_FOUND, HTTPStatus.BAD_REQUEST: grpc.StatusCode.INVALID_ARGUMENT}


def _handler(models: dict[str, LoadedModel], answer):
    """A raw-bytes unary handler: `answer(models, request bytes) -> response bytes`, RequestError
    and malformed messages turned into gRPC status codes."""
    def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            return answer(models, request)
        except RequestError as exc:
            context.abort(_CODES.get(exc.status, grpc.StatusCode.INTERNAL), str(exc))
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {exc}")
    return grpc.unary_unary_rpc_method_handler(handle)


def _predict(models: dict[str, LoadedModel], request: bytes) -> bytes:
    spec, inputs = messages.decode_predict_request(request)
    model = find_model(models, spec.name, spec.version)
    outputs = run_signature(model, spec.signature, inputs)
    return messages.encode_predict_response(messages.ModelSpec(model.name, model.version, spec.signature), outputs)


def _status(models: dict[str, LoadedModel], request: bytes) -> bytes:
    spec = messages.decode_status_request(request)
    return messages.encode_status_response([(find_model(models, spec.name, spec.version).version, "AVAILABLE")])


def start(models: dict[str, LoadedModel], host: str = "127.0.0.1", port: int = 0,
          workers: int = 4) -> tuple[grpc.Server, int]:
    """Start a gRPC server for `models` on host:port (0: any free port); (server, bound port).
    Stop it with `server.stop(grace)`."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)])
    server.add_generic_rpc_handlers([
        grpc.method_handlers_generic_handler("tensorflow.serving.PredictionService",
                                             {"Predict": _handler(models, _predict)}),
        grpc.method_handlers_generic_handler("tensorflow.serving.ModelService",
                                             {"GetModelStatus": _handler(models, _status)}),
    ])
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise OSError(f"cannot listen on {host}:{port} for gRPC")
    server.start()
    return server, bound

"""TensorFlow Serving over gRPC: the hand-written messages against the official protos of
`tensorflow-serving-api`, the client and the official stubs against the loopback stand-in
(TensorFlow Serving itself cannot run here), and `upscale --server grpc://` without TensorFlow."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import grpc
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tfgan_ct.cli import main
from tfgan_ct.deploy import inference
from tfgan_ct.deploy.serving import grpc_client, messages, standin
from tfgan_ct.deploy.serving.errors import ServingError

from helpers import SMALL_CONFIG

LR = np.random.default_rng(0).random((2, 12, 10, 1)).astype(np.float32)


@pytest.fixture(scope="module")
def server(tiny_export):
    """The stand-in serving the tiny ncct export over REST and gRPC (any free ports)."""
    running = standin.start_standin(tiny_export, grpc_port=0)
    yield running
    running.shutdown()
    running.server_close()


def test_request_matches_the_official_protos():
    data = messages.encode_predict_request(messages.ModelSpec("ncct", 3, "hu"), {"lr": LR})
    request = predict_pb2.PredictRequest.FromString(data)
    assert (request.model_spec.name, request.model_spec.version.value, request.model_spec.signature_name) == \
        ("ncct", 3, "hu")
    np.testing.assert_array_equal(tf.make_ndarray(request.inputs["lr"]), LR)
    assert request.inputs["lr"].tensor_content               # raw bytes, not repeated floats
    latest = predict_pb2.PredictRequest.FromString(messages.encode_predict_request(messages.ModelSpec("cta"), {}))
    assert not latest.model_spec.HasField("version") and latest.model_spec.signature_name == "serving_default"
    spec, inputs = messages.decode_predict_request(request.SerializeToString())
    assert spec == messages.ModelSpec("ncct", 3, "hu") and np.array_equal(inputs["lr"], LR)


def test_responses_in_either_tensor_form_are_read():
    response = predict_pb2.PredictResponse()
    response.outputs["sr"].CopyFrom(tf.make_tensor_proto(LR))                 # tensor_content
    response.outputs["other"].dtype = tf.float32.as_datatype_enum             # float_val, packed
    response.outputs["other"].tensor_shape.dim.add().size = 3
    response.outputs["other"].float_val.extend([1.5, -2.0, 3.25])
    decoded = messages.decode_predict_response(response.SerializeToString())
    np.testing.assert_array_equal(decoded["sr"], LR)
    np.testing.assert_array_equal(decoded["other"], [1.5, -2.0, 3.25])
    ours = predict_pb2.PredictResponse.FromString(
        messages.encode_predict_response(messages.ModelSpec("ncct", 1, "serving_default"), {"sr": LR}))
    np.testing.assert_array_equal(tf.make_ndarray(ours.outputs["sr"]), LR)
    status = get_model_status_pb2.GetModelStatusResponse.FromString(
        messages.encode_status_response([(4, "AVAILABLE")]))
    assert status.model_version_status[0].version == 4 and status.model_version_status[0].state == 30
    assert messages.decode_status_response(status.SerializeToString()) == [{"version": "4", "state": "AVAILABLE"}]
    with pytest.raises(ValueError):
        messages.decode_predict_response(response.SerializeToString()[:-3])  # truncated


def test_official_stubs_against_the_standin(server):
    channel = grpc.insecure_channel(server.grpc_url.removeprefix("grpc://"))
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "ncct"
    request.inputs["lr"].CopyFrom(tf.make_tensor_proto(LR))
    answer = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=60)
    assert tf.make_ndarray(answer.outputs["sr"]).shape == (2, 48, 40, 1)
    assert answer.model_spec.version.value == 1
    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "ncct"
    status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(status_request, timeout=60)
    assert [(s.version, s.state) for s in status.model_version_status] == [(1, 30)]
    request.model_spec.name = "nope"
    with pytest.raises(grpc.RpcError) as err:
        prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=60)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_client_gives_what_the_local_model_and_rest_give(server, tiny_export):
    local = inference.load("ncct", tiny_export).predict(LR)
    over_grpc = grpc_client.predict(server.grpc_url, "ncct", LR)
    over_rest = inference.load("ncct", server=server.url).predict(LR)
    np.testing.assert_array_equal(over_grpc, local)       # raw float32 bytes: exact
    np.testing.assert_allclose(over_rest, local, atol=1e-6)
    assert grpc_client.model_status(server.grpc_url, "ncct") == \
        {"model_version_status": [{"version": "1", "state": "AVAILABLE"}]}
    method = inference.load("ncct", server=server.grpc_url)
    np.testing.assert_array_equal(method.predict(LR), local)


def test_errors_are_one_clear_line(server, monkeypatch):
    url = server.grpc_url
    cases = [({"model": "nope"}, r"Predict nope: not found \(Servable not found for request: Latest\(nope\)\)"),
             ({"version": 9}, r"Predict ncct version 9: not found \(.*Specific\(ncct, 9\)"),
             ({"signature": "zzz"}, r"invalid request \(Serving signature name: \"zzz\" not found")]
    for change, pattern in cases:
        kwargs = {"model": "ncct", **change}
        with pytest.raises(ServingError, match=pattern) as err:
            grpc_client.predict(url, kwargs.pop("model"), LR, **kwargs)
        assert "\n" not in str(err.value) and url in str(err.value)
    with pytest.raises(ServingError, match="grpc://HOST:PORT"):
        grpc_client.predict("grpc://no-port-here", "ncct", LR)
    monkeypatch.setattr(grpc_client, "RETRIES", (0.01, 0.01))
    down = f"grpc://127.0.0.1:{_free_port()}"
    with pytest.raises(ServingError, match=r"cannot reach TensorFlow Serving at .* after 3 attempts"):
        grpc_client.predict(down, "ncct", LR, timeout=5)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _upscale_args(source, out, url) -> list[str]:
    return ["upscale", str(source), "--out", str(out), "--server", url, "--model", "ncct", "--format", "npy",
            "--no-progress", "--config", str(SMALL_CONFIG), "--window", "40,80"]


@pytest.mark.slow
def test_upscale_over_grpc_equals_rest_and_needs_no_tensorflow(server, phantom_dir, tmp_path):
    """The same series over gRPC (in a process where TensorFlow and Keras cannot be imported, as on
    a thin deployment host) and over REST: the same HU array."""
    source = phantom_dir / "patient02" / "01_ncct"
    rest = CliRunner().invoke(main, _upscale_args(source, tmp_path / "rest", server.url))
    assert rest.exit_code == 0, rest.output
    blocker = textwrap.dedent("""
        import importlib.abc, sys
        class NoTensorFlow(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("tensorflow", "keras", "tensorboard"):
                    raise ImportError(f"{name} is not installed on this host")
        sys.meta_path.insert(0, NoTensorFlow())
        from tfgan_ct.cli import main
        main()
    """)
    run = subprocess.run([sys.executable, "-c", blocker, *_upscale_args(source, tmp_path / "grpc", server.grpc_url)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    [a] = list((tmp_path / "rest").glob("*/sr_hu.npy"))
    [b] = list((tmp_path / "grpc").glob("*/sr_hu.npy"))
    np.testing.assert_allclose(np.load(a), np.load(b), atol=1e-3)

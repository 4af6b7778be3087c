"""TensorFlow Serving deployment: models.config, warm-up requests, SavedModel CLI, REST client and stand-in.

TF Serving itself cannot run here; its own protos (`tensorflow-serving-api`)
check what the project writes, and the REST client is checked against the
stand-in server, which answers from the same SavedModels.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfgan_ct.config import Window
from tfgan_ct.deploy import export, layout, serving
from tfgan_ct.deploy.serving import artefacts, client
from tfgan_ct.model.discriminator import build_discriminator
from tfgan_ct.model.generator import build_generator

from helpers import REPO

model_server_config_pb2 = pytest.importorskip("tensorflow_serving.config.model_server_config_pb2")
prediction_log_pb2 = pytest.importorskip("tensorflow_serving.apis.prediction_log_pb2")
from google.protobuf import text_format  # noqa: E402 (after the importorskip)

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}


def tiny_export(models_dir: Path, stage: str, seed: int) -> Path:
    """Export a 1-block, 8-feature generator (and a 32-pixel discriminator) as the next version of `stage`."""
    keras.utils.set_random_seed(seed)
    return export.export_stage(build_generator(1, 8, 4), build_discriminator(32, features=8), models_dir,
                               stage, Window(40.0, 80.0), 4, {"parent": None})


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """saved_models with ncct versions 1 and 2 (different weights) and cta version 1 (a copy of ncct 1)."""
    root = tmp_path_factory.mktemp("serving") / "saved_models"
    tiny_export(root, "ncct", seed=1)
    tiny_export(root, "ncct", seed=2)
    shutil.copytree(root / "ncct/1", root / "cta/1")
    (root / "ctp/1").mkdir(parents=True)          # no saved_model.pb: not an export
    (root / "ncct/.partial-x").mkdir()             # an interrupted export
    return root


@pytest.fixture(scope="module")
def standin(models_dir):
    server = serving.start_standin(models_dir)
    yield server
    server.shutdown()
    server.server_close()


def direct(export_dir: Path, x: np.ndarray, signature="serving_default") -> np.ndarray:
    """The SavedModel's answer without any server."""
    name_in, name_out = layout.SIGNATURES[signature]
    model = tf.saved_model.load(str(export_dir))
    return model.signatures[signature](**{name_in: tf.constant(x)})[name_out].numpy()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- models.config

def test_models_config_parses_as_model_server_config(models_dir):
    config = text_format.Parse(serving.models_config(models_dir, "/models/"),
                               model_server_config_pb2.ModelServerConfig())
    models = config.model_config_list.config
    assert [(m.name, m.base_path, m.model_platform) for m in models] == [
        ("ncct", "/models/ncct", "tensorflow"), ("cta", "/models/cta", "tensorflow")]

    local = text_format.Parse(serving.models_config(models_dir), model_server_config_pb2.ModelServerConfig())
    assert [m.base_path for m in local.model_config_list.config] == [
        str((models_dir / "ncct").resolve()), str((models_dir / "cta").resolve())]


def test_folder_rules_and_models_config_import_no_tensorflow(models_dir, tmp_path):
    """layout and `tfgan-ct serve config` work without loading TensorFlow (a fast, light config step)."""
    code = ("import sys\n"
            "from pathlib import Path\n"
            "import tfgan_ct.deploy.layout as layout\n"
            "from tfgan_ct.cli import main\n"
            f"assert layout.versions(Path({str(models_dir / 'ncct')!r})) == [1, 2]\n"
            f"main(['serve', 'config', '--models-dir', {str(models_dir)!r}, '--out', {str(tmp_path / 'm.config')!r}],"
            " standalone_mode=False)\n"
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TensorFlow imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    assert text_format.Parse((tmp_path / "m.config").read_text(), model_server_config_pb2.ModelServerConfig())
    assert stat.S_IMODE((tmp_path / "m.config").stat().st_mode) == 0o644
    assert [layout.versions(models_dir / stage) for stage in ("ncct", "cta", "ctp")] == [[1, 2], [1], []]


def test_serve_config_prints_models_config(models_dir):
    from click.testing import CliRunner

    from tfgan_ct.cli import main

    result = CliRunner().invoke(main, ["serve", "config", "--models-dir", str(models_dir), "--base-path", "/m"])
    assert result.exit_code == 0, result.output
    assert result.output == serving.models_config(models_dir, "/m")
    missing = CliRunner().invoke(main, ["serve", "config", "--models-dir", str(models_dir / "none")])
    assert missing.exit_code == 1 and "no export found" in missing.output


def test_models_config_without_exports_says_so(tmp_path):
    (tmp_path / "ncct" / "1").mkdir(parents=True)
    with pytest.raises(serving.ServingError, match=r"no export found under .*tfgan-ct train"):
        serving.models_config(tmp_path)
    with pytest.raises(serving.ServingError, match="no export found"):
        serving.models_config(tmp_path / "missing")
    with pytest.raises(serving.ServingError, match="no export found"):
        serving.make_standin(tmp_path)


def test_make_models_config_tool(models_dir, tmp_path):
    out = tmp_path / "models.config"
    result = subprocess.run([sys.executable, str(REPO / "tools/serving/make_models_config.py"),
                             "--models-dir", str(models_dir), "--out", str(out)],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    config = text_format.Parse(out.read_text(), model_server_config_pb2.ModelServerConfig())
    assert [m.base_path for m in config.model_config_list.config] == ["/models/ncct", "/models/cta"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


# --------------------------------------------------------------------------- warm-up requests

def read_warmup(path: Path) -> list:
    return [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(path))]


def test_export_writes_warmup_requests_tf_serving_reads(models_dir):
    path = models_dir / "ncct/2/assets.extra/tf_serving_warmup_requests"
    logs = read_warmup(path)
    assert len(logs) == len(artefacts.WARMUP_SIZES)
    for log, (b, h, w) in zip(logs, artefacts.WARMUP_SIZES):
        assert log.WhichOneof("log_type") == "predict_log"
        request = log.predict_log.request
        assert request.model_spec.name == "ncct" and request.model_spec.signature_name == "serving_default"
        assert list(request.inputs) == ["lr"]
        tensor = request.inputs["lr"]
        assert tensor.dtype == tf.float32.as_datatype_enum
        array = tf.make_ndarray(tensor)
        assert array.shape == (b, h, w, 1) and array.dtype == np.float32 and not array.any()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(path.parent) == ["tf_serving_warmup_requests"]


def test_write_warmup_sizes_and_replaces_atomically(tmp_path):
    serving.write_warmup(tmp_path, sizes=((1, 8, 8),))
    path = serving.write_warmup(tmp_path, sizes=((2, 16, 12), (1, 4, 4)))
    shapes = [tuple(tf.make_ndarray(log.predict_log.request.inputs["lr"]).shape) for log in read_warmup(path)]
    assert shapes == [(2, 16, 12, 1), (1, 4, 4, 1)]
    assert not read_warmup(path)[0].predict_log.request.model_spec.name
    assert os.listdir(path.parent) == [path.name]


# --------------------------------------------------------------------------- SavedModel CLI

@pytest.mark.slow
def test_saved_model_cli_runs_serving_default(models_dir, tmp_path):
    # TF 2.21's --input_exprs only takes Python literals (no np.zeros(...)), so the input goes in a .npy.
    x = np.random.default_rng(0).random((1, 8, 8, 1)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    cli = shutil.which("saved_model_cli") or "saved_model_cli"
    result = subprocess.run([cli, "run", "--dir", str(models_dir / "ncct/2"), "--tag_set", "serve",
                             "--signature_def", "serving_default", "--inputs", f"lr={tmp_path / 'x.npy'}",
                             "--outdir", str(tmp_path / "out")],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    sr = np.load(tmp_path / "out/sr.npy")
    assert sr.shape == (1, 32, 32, 1)
    np.testing.assert_allclose(sr, direct(models_dir / "ncct/2", x), atol=1e-6)


# --------------------------------------------------------------------------- REST client and stand-in

@pytest.mark.parametrize("request_format", ["inputs", "instances"])
def test_rest_client_matches_the_savedmodel(standin, models_dir, request_format):
    x = np.random.default_rng(1).random((2, 6, 5, 1)).astype(np.float32)
    sr = serving.predict(standin.url, "ncct", x, request_format=request_format)
    assert sr.shape == (2, 24, 20, 1) and sr.dtype == np.float32
    np.testing.assert_array_equal(sr, direct(models_dir / "ncct/2", x))          # the newest version
    assert not np.array_equal(sr, direct(models_dir / "ncct/1", x))


def test_hu_signature_version_and_status(standin, models_dir):
    x_hu = np.random.default_rng(2).uniform(-100, 150, (1, 4, 4, 1)).astype(np.float32)
    sr_hu = serving.predict(standin.url + "/", "cta", x_hu, signature="hu", version=1)
    np.testing.assert_array_equal(sr_hu, direct(models_dir / "cta/1", x_hu, "hu"))
    assert serving.model_status(standin.url, "ncct")["model_version_status"] == [
        {"version": "2", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]


def test_raw_rest_body_in_tf_serving_format(standin):
    """The documented curl body: named row instances; answer {"predictions": [b x 4h x 4w x 1]}."""
    body = {"signature_name": "serving_default", "instances": [{"lr": np.zeros((2, 3, 1)).tolist()}]}
    request = urllib.request.Request(f"{standin.url}/v1/models/ncct:predict", data=json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.load(response)
    assert np.asarray(answer["predictions"]).shape == (1, 8, 12, 1)


def test_errors_name_the_url_and_the_problem(standin, monkeypatch):
    x = np.zeros((1, 4, 4, 1), np.float32)
    with pytest.raises(serving.ServingError, match=r"/v1/models/nope:predict: HTTP 404: Servable not found "
                                                   r"for request: Latest\(nope\)"):
        serving.predict(standin.url, "nope", x)
    with pytest.raises(serving.ServingError, match=r"versions/1:predict: HTTP 404: .*Specific\(ncct, 1\)"):
        serving.predict(standin.url, "ncct", x, version=1)                     # only the newest is served
    with pytest.raises(serving.ServingError, match=r'HTTP 400: Serving signature name: "sr" not found'):
        serving.predict(standin.url, "ncct", x, signature="sr")
    with pytest.raises(ValueError, match=r"lr must be \[batch, height, width, 1\], got shape \(4, 4\)"):
        serving.predict(standin.url, "ncct", np.zeros((4, 4)))
    for body, message in ((b"{not json", "JSON Parse error"),
                          (b'{"inputs": [[1.0, 2.0]]}', "shape [1, 2] does not match [None, None, None, 1]"),
                          (b'{"inputs": {"x": 1}}', "takes inputs ['lr']")):
        request = urllib.request.Request(f"{standin.url}/v1/models/ncct:predict", data=body)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=60)
        assert caught.value.code == 400 and message in json.load(caught.value)["error"]

    monkeypatch.setattr(client, "SCALE", 2)           # a client expecting another scale
    with pytest.raises(serving.ServingError, match=r"ncct:predict returned shape \(1, 16, 16, 1\), "
                                                   r"expected \(1, 8, 8, 1\)"):
        serving.predict(standin.url, "ncct", x)
    monkeypatch.undo()

    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(serving.ServingError, match=rf"cannot reach TensorFlow Serving at {down}/v1/models/"
                                                   r"ncct:predict: connection refused"):
        serving.predict(down, "ncct", x)


@pytest.mark.slow
def test_standin_command_line(models_dir):
    """`tfgan-ct serve standin` prints its URLs (REST and gRPC), answers on both, and stops on SIGTERM."""
    from tfgan_ct.deploy.serving import grpc_client

    process = subprocess.Popen([sys.executable, "-m", "tfgan_ct.cli", "serve", "standin", "--models-dir",
                                str(models_dir), "--port", "0", "--grpc-port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
    try:
        line = process.stdout.readline()
        assert "stand-in for TensorFlow Serving" in line and "ncct v2, cta v1" in line, line
        rest, grpc_url = line.split(" at ")[1].split(": ")[0].split(" and ")
        assert serving.predict(rest, "ncct", np.zeros((1, 2, 2, 1), np.float32)).shape == (1, 8, 8, 1)
        assert grpc_url.startswith("grpc://")
        assert grpc_client.predict(grpc_url, "cta", np.zeros((1, 2, 2, 1), np.float32)).shape == (1, 8, 8, 1)
    finally:
        process.terminate()
        process.wait(timeout=60)

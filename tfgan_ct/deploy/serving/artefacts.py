"""What TensorFlow Serving reads beside the exports: models.config and warm-up requests.

`models_config` is the text-format `ModelServerConfig` (`--model_config_file`)
with one model per exported stage; it imports no TensorFlow. `write_warmup`
writes `assets.extra/tf_serving_warmup_requests`, the requests TF Serving runs
when it loads a version so that the first real request does not pay for graph
setup; the protobufs are written as bytes, so exporting needs no
`tensorflow-serving-api` (whose releases pin TensorFlow).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from tfgan_ct.deploy.layout import SIGNATURES, exported_stages
from tfgan_ct.deploy.serving.errors import ServingError, no_export_error
from tfgan_ct.fileio import atomic_write_text, default_mode
from tfgan_ct.protowire import field

WARMUP_FILE = "tf_serving_warmup_requests"
WARMUP_SIZES = ((1, 32, 32), (1, 128, 128))   # (batch, LR height, LR width): a patch, a 512-slice's LR


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


def _quote(text: str) -> str:
    """A protobuf text-format string literal."""
    if any(ord(c) < 32 for c in text):
        raise ServingError(f"control character in {text!r}")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_models_config(models_dir: str | Path, base_path: str | None, out: str | Path) -> str:
    """Write `models_config(models_dir, base_path)` to `out` atomically, readable by all
    (the server may run as another user); returns the text written."""
    text = models_config(models_dir, base_path)
    atomic_write_text(Path(out), text)
    Path(out).chmod(0o644)
    return text


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

"""The stand-in's models: each stage's newest export loaded with plain TensorFlow, and one
signature run on request values, with TF Serving's errors (shared by the REST and gRPC sides)."""
from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import numpy as np

from tfgan_ct.deploy.layout import exported_stages
from tfgan_ct.deploy.serving.errors import no_export_error


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


def find_model(models: dict[str, LoadedModel], name: str, version: int | None) -> LoadedModel:
    """The served model `name` (at `version`, None: the newest); RequestError (NOT_FOUND, in
    TF Serving's words) when it is not served."""
    model = models.get(name)
    if model is None or (version is not None and version != model.version):
        request = f"Specific({name}, {version})" if version is not None else f"Latest({name})"
        raise RequestError(HTTPStatus.NOT_FOUND, f"Servable not found for request: {request}")
    return model


def signature(model: LoadedModel, name: str):
    """The concrete function of signature `name`; RequestError (BAD_REQUEST) when there is none."""
    function = model.signatures.get(name)
    if function is None:
        raise RequestError(HTTPStatus.BAD_REQUEST, f'Serving signature name: "{name}" not found in signature def '
                                                   f"(available: {', '.join(sorted(model.signatures))})")
    return function


def run_signature(model: LoadedModel, name: str, values) -> dict[str, np.ndarray]:
    """Run signature `name` of `model` on `values` ({input name: array-like}); {output name: array}.
    RequestError (BAD_REQUEST) for a wrong signature, input name, type or shape."""
    import tensorflow as tf

    function = signature(model, name)
    specs = function.structured_input_signature[1]
    if not isinstance(values, dict) or set(values) != set(specs):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"signature {name!r} takes inputs {sorted(specs)}")
    tensors = {}
    for key, spec in specs.items():
        try:
            array = np.asarray(values[key], spec.dtype.as_numpy_dtype)
        except (TypeError, ValueError) as exc:
            raise RequestError(HTTPStatus.BAD_REQUEST,
                               f"input {key!r}: not a {spec.dtype.name} array ({exc})") from None
        if not spec.shape.is_compatible_with(array.shape):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"input {key!r}: shape {list(array.shape)} does not match "
                                                       f"{spec.shape.as_list()} (None = any)")
        tensors[key] = tf.constant(array)
    try:
        return {k: v.numpy() for k, v in function(**tensors).items()}
    except (tf.errors.OpError, ValueError, TypeError) as exc:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"running {name!r}: {str(exc).splitlines()[0]}") from None

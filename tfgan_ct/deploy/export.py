"""SavedModel export of a trained stage, and warm start from such an export.

Folder layout and metadata: `tfgan_ct.deploy.layout`. Signatures:
    serving_default: lr  float32 [b, h, w, 1] in [0, 1]  ->  sr [b, 4h, 4w, 1] in [0, 1]
    hu:              lr_hu float32 [b, h, w, 1] in HU    ->  sr_hu [b, 4h, 4w, 1] in HU
Variable collections `generator_variables` and `discriminator_variables` carry
both networks for the next stage's warm start; their Keras variable paths are
listed, in the same order, in the metadata (`variable_paths`), because the
TensorFlow names of nested Keras variables are not unique.

An export is written in a staging folder (`fileio.make_staging`) and renamed
to its version when complete, so TensorFlow Serving never sees half an export.
Exports always compute in float32 (RRDB networks overflow in float16).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import keras
import tensorflow as tf

from tfgan_ct import fileio
from tfgan_ct.config import Window
from tfgan_ct.deploy.layout import METADATA, ExportError, next_version, read_metadata, resolve, versions  # noqa: F401 - re-exported: export.resolve, export.versions
from tfgan_ct.deploy.model_card import write_model_card
from tfgan_ct.deploy.serving.artefacts import write_warmup

log = logging.getLogger("tfgan_ct.deploy.export")

RENAME_ATTEMPTS = 5                 # version numbers tried before export_stage gives up


def export_stage(generator: keras.Model, discriminator: keras.Model, models_dir: str | Path,
                 stage: str, window: Window, scale: int, metadata: dict) -> Path:
    """Write the next version of `stage` under `models_dir` atomically; returns its folder.

    The generator is exported in float32 whatever its dtype policy (`float32_copy`).
    Raises ExportError, naming `models_dir/stage`, when the disk is full; the
    staging folder is removed then (as on any error).
    """
    stage_dir = Path(models_dir) / stage
    staging = None
    try:
        stage_dir.mkdir(parents=True, exist_ok=True)
        fileio.remove_stale_staging(stage_dir)
        staging = fileio.make_staging(stage_dir, "export")
        generator = float32_copy(generator)
        _write_saved_model(generator, discriminator, staging / "model", window)
        write_warmup(staging / "model", model_name=stage)
        info = {**metadata, "stage": stage, "version": None, "scale": scale, "window": window.as_dict(),
                "signatures": {"serving_default": "lr [b,h,w,1] in [0,1] -> sr [b,4h,4w,1]",
                               "hu": "lr_hu [b,h,w,1] HU -> sr_hu [b,4h,4w,1] HU"},
                "variable_paths": {"generator": [v.path for v in generator.variables],
                                   "discriminator": [v.path for v in discriminator.variables]}}
        return _publish(staging / "model", stage_dir, info)
    except ExportError:
        raise
    except Exception as exc:
        if fileio.is_disk_full(exc):
            raise ExportError(f"cannot export {stage} to {stage_dir}: no space left on the disk "
                              f"({type(exc).__name__}: {_first_line(exc)}); nothing was kept there, free "
                              f"some space and run the command again") from None
        raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (TensorFlow's run over several), or its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _publish(model: Path, stage_dir: Path, info: dict) -> Path:
    """Write the metadata `info` and the model card into the SavedModel folder `model`, with the next
    free version of `stage_dir`, and rename the folder to that version; returns its new path."""
    for _ in range(RENAME_ATTEMPTS):
        version = next_version(stage_dir)
        info["version"] = version
        (model / METADATA).write_text(json.dumps(info, indent=2) + "\n")
        write_model_card(model, info)           # MODEL_CARD.md, renamed with the rest
        target = stage_dir / str(version)
        try:
            os.rename(model, target)
            return target
        except OSError:
            if not os.path.lexists(target):
                raise
            # another export took this version number meanwhile; take the next
    raise ExportError(f"cannot export {info['stage']}: {target} already exists ({RENAME_ATTEMPTS} version "
                      f"numbers tried); move away the integer-named entries in {stage_dir} that are "
                      f"not complete exports, and check that no other export writes there")


def _layers(model: keras.layers.Layer):
    """`model` and every layer nested in it (Keras 3 `_flatten_layers`, depth first)."""
    return list(model._flatten_layers(include_self=True, recursive=True))


def float32_copy(model: keras.Model) -> keras.Model:
    """`model` itself when every layer computes in float32; otherwise a float32 copy of it
    (`float32_clone`) holding the same weights. Serving a mixed_float16 network in float16
    overflows (RRDB features exceed 65504)."""
    if all(layer.compute_dtype == "float32" for layer in _layers(model)):
        return model
    copy = float32_clone(model)
    copy.set_weights(model.get_weights())
    return copy


def float32_clone(model: keras.Model) -> keras.Model:
    """A clone of the functional `model` built under the float32 policy (nested layers too), with
    its own, freshly initialised variables under the same variable paths, so that weights (and an
    export of it) match the original's by name. ExportError when a layer of the clone still
    computes in another dtype or the paths differ."""
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        copy = keras.models.clone_model(
            model, clone_function=lambda layer: layer.__class__.from_config({**layer.get_config(),
                                                                              "dtype": "float32"}))
    finally:
        keras.mixed_precision.set_global_policy(policy)
    mixed = [layer.name for layer in _layers(copy) if layer.compute_dtype != "float32"]
    paths, here = [v.path for v in copy.variables], [v.path for v in model.variables]
    if mixed:
        raise ExportError(f"cannot export {model.name} in float32: layers {', '.join(mixed)} of its copy "
                          f"still compute in another dtype")
    if paths != here:
        raise ExportError(f"cannot export {model.name} in float32: its copy's variable paths differ "
                          f"(first: {next(a for a, b in zip(paths + [None], here + [None]) if a != b)!r})")
    return copy


def _write_saved_model(generator: keras.Model, discriminator: keras.Model, path: Path,
                       window: Window) -> None:
    """SavedModel at `path`: both signatures (see the module docstring) and both variable collections."""
    archive = keras.export.ExportArchive()
    archive.track(generator)
    archive.track(discriminator)

    def serve(lr):
        sr = tf.cast(generator(lr, training=False), tf.float32)
        return {"sr": tf.clip_by_value(sr, 0.0, 1.0)}

    def serve_hu(lr_hu):
        return {"sr_hu": window.from_unit(serve(window.to_unit(lr_hu))["sr"])}

    archive.add_endpoint("serving_default", serve,
                         input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32, name="lr")])
    archive.add_endpoint("hu", serve_hu,
                         input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32, name="lr_hu")])
    archive.add_variable_collection("generator_variables", generator.variables)
    archive.add_variable_collection("discriminator_variables", discriminator.variables)
    archive.write_out(str(path), verbose=False)


def load_saved_model(path: Path):
    """`tf.saved_model.load` of the export at `path`, with any failure as one ExportError line.

    A truncated or damaged variables file, a garbled saved_model.pb or missing
    files all raise ExportError naming the export and the reason.
    """
    if not (Path(path) / "saved_model.pb").is_file():
        raise ExportError(f"{path}: no saved_model.pb there (not an export, or an incomplete copy)")
    try:
        return tf.saved_model.load(str(path))
    except Exception as exc:  # noqa: BLE001 - TensorFlow raises IndexError, OpError, ValueError, ...
        raise ExportError(f"{path}: cannot load the SavedModel, the export is damaged or incomplete "
                          f"({type(exc).__name__}: {_first_line(exc)}; e.g. a truncated variables file); "
                          f"export it again or choose another") from None


def _variable_paths(path: Path) -> dict[str, list[str]]:
    """{'generator': [...], 'discriminator': [...]}: the Keras variable paths in the export's metadata."""
    paths = read_metadata(path).get("variable_paths")
    if not paths:
        raise ExportError(f"{path}: no variable_paths in {METADATA} (not made by tfgan-ct?)")
    if not isinstance(paths, dict) or not all(
            isinstance(paths.get(name, []), list) and all(isinstance(p, str) for p in paths.get(name, []))
            for name in ("generator", "discriminator")):
        raise ExportError(f"{path}: damaged export, variable_paths in its {METADATA} is not "
                          f"{{'generator': [names], 'discriminator': [names]}}")
    return paths


def warm_start(generator: keras.Model, discriminator: keras.Model, path: Path) -> int:
    """Copy both networks' weights from the export at `path`, matched by variable path.

    Raises ExportError naming the export when it is damaged (unreadable
    metadata or variables), or naming the first variable that is missing, has
    another shape, or is in the export but not in the model; nothing is
    assigned then. Returns the number of variables restored.
    """
    paths = _variable_paths(path)
    loaded = load_saved_model(path)
    pairs = []
    for name, model in (("generator", generator), ("discriminator", discriminator)):
        stored = list(getattr(loaded, f"{name}_variables", []))
        if len(stored) != len(paths.get(name, [])):
            raise ExportError(f"{path}: {name} variables and their paths do not match (damaged export?)")
        source = dict(zip(paths[name], stored))
        for variable in model.variables:
            other = source.get(variable.path)
            if other is None:
                raise ExportError(f"warm start from {path}: variable {variable.path!r} is missing "
                                  f"in the export ({len(source)} {name} variables there)")
            if tuple(other.shape) != tuple(variable.shape):
                raise ExportError(f"warm start from {path}: variable {variable.path!r} has shape "
                                  f"{tuple(other.shape)} in the export but {tuple(variable.shape)} here "
                                  f"(different model settings?)")
            pairs.append((variable, other))
        here = {variable.path for variable in model.variables}
        extra = [p for p in source if p not in here]
        if extra:
            raise ExportError(f"warm start from {path}: variable {extra[0]!r} of the export is not in "
                              f"this {name} ({len(extra)} such, {len(source)} {name} variables there, "
                              f"{len(here)} here; different model settings?)")
    for variable, other in pairs:
        variable.assign(other)
    return len(pairs)

"""SavedModel export of a trained stage, and warm start from such an export.

Layout (what TensorFlow Serving reads; integer versions, the newest is served):

    saved_models/<stage>/<version>/
        saved_model.pb, variables/     plain-TensorFlow SavedModel, no tfgan_ct import needed
        assets.extra/                  TF Serving warm-up requests (tfgan_ct.serving.write_warmup)
        tfgan_ct.json                  metadata: stage, parent, window, scale, config, data hash

Signatures:
    serving_default: lr  float32 [b, h, w, 1] in [0, 1]  ->  sr [b, 4h, 4w, 1] in [0, 1]
    hu:              lr_hu float32 [b, h, w, 1] in HU    ->  sr_hu [b, 4h, 4w, 1] in HU
Variable collections `generator_variables` and `discriminator_variables` carry
both networks for the next stage's warm start; their Keras variable paths
(e.g. `rrdb00/rdb1/conv1/kernel`) are listed, in the same order, in the
metadata (`variable_paths`), because the TensorFlow names of nested Keras
variables are not unique.

An export is written under a hidden name beside its final folder and renamed
when complete: a crash mid-export leaves no integer-named folder that
TensorFlow Serving would pick up.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import keras
import tensorflow as tf

from tfgan_ct import serving
from tfgan_ct.config import Window

METADATA = "tfgan_ct.json"
RENAME_ATTEMPTS = 5                 # version numbers tried before export_stage gives up


class ExportError(RuntimeError):
    """A missing, unreadable or incompatible export."""


def _is_version(name: str) -> bool:
    return name.isascii() and name.isdigit()


def versions(stage_dir: Path) -> list[int]:
    """Integer versions present under saved_models/<stage>, sorted (complete exports only)."""
    if not stage_dir.is_dir():
        return []
    return sorted(int(p.name) for p in stage_dir.iterdir()
                  if p.is_dir() and _is_version(p.name) and (p / "saved_model.pb").is_file())


def _next_version(stage_dir: Path) -> int:
    """1 + the largest integer-named entry of any kind: an incomplete folder or a stray
    file named `1` blocks that number as surely as a complete export does."""
    return max((int(p.name) for p in stage_dir.iterdir() if _is_version(p.name)), default=0) + 1


def export_stage(generator: keras.Model, discriminator: keras.Model, models_dir: str | Path,
                 stage: str, window: Window, scale: int, metadata: dict) -> Path:
    """Write the next version of `stage` under `models_dir` atomically; returns its folder."""
    stage_dir = Path(models_dir) / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    stage_tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=stage_dir))
    try:
        _write_saved_model(generator, discriminator, stage_tmp / "model", window)
        serving.write_warmup(stage_tmp / "model", model_name=stage)
        for _ in range(RENAME_ATTEMPTS):
            version = _next_version(stage_dir)
            info = {**metadata, "stage": stage, "version": version, "scale": scale,
                    "window": {"center": window.center, "width": window.width},
                    "signatures": {"serving_default": "lr [b,h,w,1] in [0,1] -> sr [b,4h,4w,1]",
                                   "hu": "lr_hu [b,h,w,1] HU -> sr_hu [b,4h,4w,1] HU"},
                    "variable_paths": {"generator": [v.path for v in generator.variables],
                                       "discriminator": [v.path for v in discriminator.variables]}}
            (stage_tmp / "model" / METADATA).write_text(json.dumps(info, indent=2) + "\n")
            target = stage_dir / str(version)
            try:
                os.rename(stage_tmp / "model", target)
                return target
            except OSError:
                if not os.path.lexists(target):
                    raise
                # another export took this version number meanwhile; take the next
        raise ExportError(f"cannot export {stage}: {target} already exists ({RENAME_ATTEMPTS} version "
                          f"numbers tried); move away the integer-named entries in {stage_dir} that are "
                          f"not complete exports, and check that no other export writes there")
    finally:
        shutil.rmtree(stage_tmp, ignore_errors=True)


def _write_saved_model(generator: keras.Model, discriminator: keras.Model, path: Path,
                       window: Window) -> None:
    archive = keras.export.ExportArchive()
    archive.track(generator)
    archive.track(discriminator)

    def serve(lr):
        sr = tf.cast(generator(lr, training=False), tf.float32)
        return {"sr": tf.clip_by_value(sr, 0.0, 1.0)}

    def serve_hu(lr_hu):
        unit = tf.clip_by_value((lr_hu - window.floor) / window.width, 0.0, 1.0)
        return {"sr_hu": serve(unit)["sr"] * window.width + window.floor}

    archive.add_endpoint("serving_default", serve,
                         input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32, name="lr")])
    archive.add_endpoint("hu", serve_hu,
                         input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32, name="lr_hu")])
    archive.add_variable_collection("generator_variables", generator.variables)
    archive.add_variable_collection("discriminator_variables", discriminator.variables)
    archive.write_out(str(path), verbose=False)


def resolve(spec: str, models_dir: str | Path) -> Path:
    """Export folder for 'stage' (newest version), 'stage@N', or a path to a version folder."""
    models_dir = Path(models_dir)
    match = re.fullmatch(r"([a-z]+)(?:@(\d+))?", spec)
    if match and not Path(spec).exists():
        stage, version = match.group(1), match.group(2)
        available = versions(models_dir / stage)
        if version is None:
            if not available:
                raise ExportError(f"no export of stage {stage!r} in {models_dir / stage}; make it with "
                                  f"`tfgan-ct train --stage {stage} --data DIR`")
            return models_dir / stage / str(available[-1])
        if int(version) not in available:
            raise ExportError(f"{spec}: no version {version} in {models_dir / stage} "
                              f"(available: {', '.join(map(str, available)) or 'none'})")
        return models_dir / stage / version
    path = Path(spec)
    if (path / "saved_model.pb").is_file():
        return path
    if path.is_dir() and versions(path):
        return path / str(versions(path)[-1])
    raise ExportError(f"{spec}: neither a stage name nor a SavedModel folder")


def read_metadata(path: Path) -> dict:
    """The metadata JSON of an export ({} if it has none or it is unreadable)."""
    try:
        return json.loads((Path(path) / METADATA).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def warm_start(generator: keras.Model, discriminator: keras.Model, path: Path) -> int:
    """Copy both networks' weights from the export at `path`, matched by variable path.

    Raises ExportError naming the first variable that is missing, has another
    shape, or is in the export but not in the model; nothing is assigned then.
    Returns the number of variables restored.
    """
    try:
        loaded = tf.saved_model.load(str(path))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: cannot load SavedModel ({exc})") from None
    paths = read_metadata(path).get("variable_paths")
    if not paths:
        raise ExportError(f"{path}: no variable_paths in {METADATA} (not made by tfgan-ct?)")
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

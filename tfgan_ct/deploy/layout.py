"""The export folder rules, without TensorFlow.

    saved_models/<stage>/<version>/     integer versions, the newest is served
        saved_model.pb, variables/      plain-TensorFlow SavedModel
        assets.extra/                   TF Serving warm-up requests
        tfgan_ct.json                   metadata (METADATA): stage, parent, window, scale, ...
        MODEL_CARD.md                   intended use, training data, limits (deploy.model_card)

A version counts once its folder holds a saved_model.pb. Writing models.config,
resolving a model spec and reading metadata need only these rules, so they
import no TensorFlow; `tfgan_ct.deploy.export` writes and loads the SavedModels.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from tfgan_ct.errors import TfganError
from tfgan_ct.stages import STAGES

METADATA = "tfgan_ct.json"
SAVED_MODEL = "saved_model.pb"
# signature name -> (input name, output name); images float32 [b, h, w, 1] in, [b, 4h, 4w, 1] out
SIGNATURES = {"serving_default": ("lr", "sr"),     # [0, 1] of the stage's window
              "hu": ("lr_hu", "sr_hu")}            # HU


class ExportError(TfganError, RuntimeError):
    """A missing, unreadable or incompatible export."""


def is_version(name: str) -> bool:
    """Whether a folder name is a version number (ASCII digits only)."""
    return name.isascii() and name.isdigit()


def versions(stage_dir: Path) -> list[int]:
    """Integer versions present under saved_models/<stage>, sorted (complete exports only)."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return []
    return sorted(int(p.name) for p in stage_dir.iterdir()
                  if p.is_dir() and is_version(p.name) and (p / SAVED_MODEL).is_file())


def next_version(stage_dir: Path) -> int:
    """1 + the largest integer-named entry of any kind: an incomplete folder or a stray
    file named `1` blocks that number as surely as a complete export does."""
    return max((int(p.name) for p in Path(stage_dir).iterdir() if is_version(p.name)), default=0) + 1


def exported_stages(models_dir: str | Path) -> dict[str, list[int]]:
    """Stages under `models_dir` that have at least one complete export: {stage: [versions]}.

    Known stages come in chain order (natural, ncct, ctp, cta), others after them by name.
    """
    models_dir = Path(models_dir)
    found = {p.name: versions(p) for p in models_dir.iterdir()
             if p.is_dir() and not p.name.startswith(".")} if models_dir.is_dir() else {}
    order = sorted(found, key=lambda s: (STAGES.index(s) if s in STAGES else len(STAGES), s))
    return {stage: found[stage] for stage in order if found[stage]}


def resolve(spec: str, models_dir: str | Path) -> Path:
    """Export folder for 'stage' (newest version), 'stage@N', or a path to a version folder
    (or to a stage folder: its newest version). Raises ExportError saying what is missing."""
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
    if (path / SAVED_MODEL).is_file():
        return path
    if path.is_dir() and versions(path):
        return path / str(versions(path)[-1])
    raise ExportError(f"{spec}: neither a stage name nor a SavedModel folder")


def read_metadata(path: Path) -> dict:
    """The metadata JSON object of the export at `path`; {} when it has none.

    Raises ExportError, naming the export, when the file cannot be read, is
    not UTF-8 JSON or does not hold a JSON object (a damaged export).
    """
    file = Path(path) / METADATA
    try:
        text = file.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return {}
    except UnicodeDecodeError:
        raise ExportError(f"{path}: damaged export, its {METADATA} is not UTF-8 text (binary data?); "
                          f"export it again or choose another") from None
    except OSError as exc:
        raise ExportError(f"{path}: cannot read its {METADATA} ({exc.strerror or exc})") from None
    try:
        info = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: damaged export, its {METADATA} is not valid JSON ({exc}); "
                          f"export it again or choose another") from None
    if not isinstance(info, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(info), "a number")
        raise ExportError(f"{path}: damaged export, its {METADATA} holds {kind} instead of a JSON object; "
                          f"export it again or choose another")
    return info

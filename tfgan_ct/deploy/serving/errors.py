"""The error of the TensorFlow Serving tools (config, client, stand-in)."""
from __future__ import annotations

from pathlib import Path

from tfgan_ct.errors import TfganError


class ServingError(TfganError, RuntimeError):
    """A deployment problem: no export, server unreachable, or an error answered by the server."""


def no_export_error(models_dir: str | Path) -> ServingError:
    """The error for a models folder without any complete export."""
    return ServingError(f"no export found under {Path(models_dir).resolve()} (expected <stage>/<version>/"
                        f"saved_model.pb); make one with `tfgan-ct train --stage ncct --data DIR`")

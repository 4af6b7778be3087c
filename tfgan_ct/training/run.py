"""What one training run is: its inputs (`Run`), its outcome (`TrainResult`), its error.

A run trains one stage of the chain (`tfgan_ct.stages`) on the modality of the
same name and lives in `runs/<stage>-<id>/` (checkpoints, TensorBoard, log, config).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tfgan_ct.config import Config, Window
from tfgan_ct.errors import TfganError

if TYPE_CHECKING:
    import tensorflow as tf


class TrainingError(TfganError, RuntimeError):
    """Training cannot start or cannot go on (bad warm start, non-finite loss, ...)."""


@dataclass(frozen=True)
class Run:
    """Everything a run's steps need, decided before the first one."""

    stage: str                  # the stage, and the modality it trains on
    data_dir: Path              # converted shards with their manifest.json
    manifest: dict              # the dataset's manifest (patch_size, scale, shards)
    cfg: Config
    parent: Path | None         # export folder to warm-start from; None: from scratch
    models_dir: Path            # where the stage is exported
    run_dir: Path               # runs/<stage>-<id>
    strategy: tf.distribute.Strategy

    @property
    def scale(self) -> int:
        """Upscaling factor of the dataset (4 in the paper)."""
        return self.manifest["scale"]

    @property
    def window(self) -> Window:
        """The display window the stage's images are mapped to [0, 1] with."""
        return self.cfg.modalities.get(self.stage).window


@dataclass
class TrainResult:
    """Where a finished run left its outputs."""

    run_dir: Path
    export_dir: Path
    steps: int
    resumed_from: int

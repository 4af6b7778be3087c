"""Distribution of training: the strategy for this machine, and each worker's place.

`MultiWorkerMirroredStrategy` when `TF_CONFIG` names several workers,
`MirroredStrategy` over the visible GPUs (`--gpus N` to use fewer) when there are
two or more, otherwise the default strategy (one GPU or CPU). In a multi-worker
run every worker must save checkpoints and exports; only the chief's are kept,
the others write to scratch folders in the run folder.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import tensorflow as tf

from tfgan_ct.training.run import TrainingError

log = logging.getLogger("tfgan_ct.training.distribute")


def choose_strategy(gpus: int | None = None) -> tf.distribute.Strategy:
    """The distribution strategy for this machine (see the module docstring)."""
    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    workers = tf_config.get("cluster", {}).get("worker", [])
    if len(workers) > 1:
        log.info("TF_CONFIG names %d workers: MultiWorkerMirroredStrategy", len(workers))
        return tf.distribute.MultiWorkerMirroredStrategy()
    devices = tf.config.list_logical_devices("GPU")
    if gpus is not None:
        if gpus > len(devices):
            raise TrainingError(f"--gpus {gpus}: only {len(devices)} GPU(s) visible")
        devices = devices[:gpus]
    if len(devices) > 1:
        log.info("MirroredStrategy over %d GPUs", len(devices))
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    log.info("single device (%s)", devices[0].name if devices else "CPU")
    return tf.distribute.get_strategy()


def worker_position(strategy) -> tuple[int, int]:
    """(training processes in the cluster, this one's index); (1, 0) without a cluster.

    Numbered as tf.distribute numbers input pipelines: the chief (if any) first, then the workers.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
    chiefs, workers = len(spec.get("chief", [])), len(spec.get("worker", []))
    if chiefs + workers <= 1:
        return 1, 0
    index = 0 if resolver.task_type == "chief" else chiefs + resolver.task_id
    return chiefs + workers, index


def is_chief(strategy) -> bool:
    """True unless this is a non-chief worker of a multi-worker run."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type in (None, "chief"):
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and \
        "chief" not in resolver.cluster_spec().as_dict()


def checkpoint_dir(run_dir: Path, strategy) -> Path:
    """The run's `checkpoints/` for the chief; a scratch folder for every other worker."""
    if is_chief(strategy):
        return run_dir / "checkpoints"
    resolver = strategy.cluster_resolver
    return run_dir / f".checkpoints-{resolver.task_type}{resolver.task_id}"


def best_dir(run_dir: Path, strategy) -> Path:
    """The run's `best/` (best validated weights, `selection`) for the chief; a scratch folder for others."""
    if is_chief(strategy):
        return run_dir / "best"
    resolver = strategy.cluster_resolver
    return run_dir / f".best-{resolver.task_type}{resolver.task_id}"


def tensorboard_dir(run_dir: Path, strategy) -> Path:
    """The run's `tensorboard/` for the chief; a scratch folder for every other worker."""
    return run_dir / ("tensorboard" if is_chief(strategy) else ".tensorboard-worker")

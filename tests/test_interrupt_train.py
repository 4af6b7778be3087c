"""`tfgan-ct train` killed (SIGKILL) in training and in export: the same command finishes the run,
leaves no staging behind and exports the weights of an uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import yaml
from test_train import TINY

from tfgan_ct.deploy import export

from helpers import SMALL_CONFIG

STEPS = 30  # L1 only: the GAN step would add seconds of tracing to every process


def _command(data: Path, config: Path, root: Path) -> list[str]:
    return [sys.executable, "-m", "tfgan_ct.cli", "train", "--stage", "ncct", "--data", str(data),
            "--warm-start", "none", "--config", str(config), "--models-dir", str(root / "models"),
            "--runs-dir", str(root / "runs")]


def _start(command: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def _kill_when(process: subprocess.Popen, ready, what: str, timeout: float = 120) -> None:
    """SIGKILL `process` as soon as `ready()` is true (polled every 10 ms)."""
    deadline = time.time() + timeout
    while not ready():
        assert process.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()


def _finish(process: subprocess.Popen, log: Path) -> str:
    assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    return log.read_text()


@pytest.mark.slow
def test_killed_in_training_and_in_export_ends_as_an_uninterrupted_run(converted, tmp_path):
    data, _ = converted
    config = tmp_path / "tiny.yaml"
    settings = yaml.safe_load(SMALL_CONFIG.read_text()) | TINY
    settings["train"] = {**TINY["train"], "l1_phase": {"steps": STEPS, "learning_rate": 2e-4, "milestones": [10]},
                         "gan_phase": {"steps": 0, "learning_rate": 1e-4, "milestones": []},
                         "checkpoint_every": 5, "log_every": 5, "eval_every": 1000}
    config.write_text(yaml.safe_dump(settings))
    whole, root = tmp_path / "whole", tmp_path / "killed"
    uninterrupted = _start(_command(data, config, whole), tmp_path / "whole.log")  # runs alongside

    # 1. Killed in training, once a checkpoint is recorded (the `checkpoint` state file is
    #    written after the checkpoint's own files).
    first = _start(_command(data, config, root), tmp_path / "first.log")
    _kill_when(first, lambda: list(root.glob("runs/ncct-*/checkpoints/checkpoint")), "checkpoint")
    assert not export.versions(root / "models/ncct")

    # 2. The same command resumes, and is killed while its export is being written.
    staging = lambda: list((root / "models/ncct").glob(".export.partial-*"))  # noqa: E731
    second = _start(_command(data, config, root), tmp_path / "second.log")
    _kill_when(second, staging, "export staging folder")
    text = (tmp_path / "second.log").read_text()
    assert "resuming" in text and "from its checkpoint at step" in text, text[-3000:]
    assert f"from its checkpoint at step {STEPS}" not in text  # the first kill landed mid-training
    assert staging() and not export.versions(root / "models/ncct"), "the kill did not land in the export"

    # 3. Once more: it resumes at the last step, removes the dead export's staging and exports.
    text = _finish(_start(_command(data, config, root), tmp_path / "third.log"), tmp_path / "third.log")
    assert f"from its checkpoint at step {STEPS}" in text and "left by an interrupted run" in text, text[-3000:]
    assert f"ncct: {STEPS} steps" in text
    assert export.versions(root / "models/ncct") == [1]
    leftovers = [p for folder in ("models", "runs") for p in (root / folder).rglob(".*partial*")]
    assert not leftovers, leftovers

    _finish(uninterrupted, tmp_path / "whole.log")
    a = tf.saved_model.load(str(whole / "models/ncct/1"))
    b = tf.saved_model.load(str(root / "models/ncct/1"))
    assert export.read_metadata(whole / "models/ncct/1")["variable_paths"] == \
        export.read_metadata(root / "models/ncct/1")["variable_paths"]
    for name in ("generator_variables", "discriminator_variables"):
        for va, vb in zip(getattr(a, name), getattr(b, name), strict=True):
            np.testing.assert_array_equal(va.numpy(), vb.numpy(), err_msg=f"{name} {va.name}")

"""Which weights a run exports: the moving average of G, the best validated, the last; the collapse guard."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from test_train import fixed_batch, tiny_config, tiny_gan  # noqa: F401 - tiny_config is a fixture

from tfgan_ct.config import ConfigError, load_config
from tfgan_ct.deploy import export
from tfgan_ct.model.discriminator import build_discriminator
from tfgan_ct.model.generator import build_generator
from tfgan_ct.training.collapse import CollapseGuard
from tfgan_ct.training.train import TrainingError, train_stage

from helpers import REPO, SMALL_CONFIG

DECAY = 0.5


def _hand_average(model, steps: int) -> list[np.ndarray]:
    """Train `model` `steps` L1 steps on the fixed batch; the moving average of G computed by hand."""
    average = None
    data = tf.data.Dataset.from_tensors(fixed_batch()).repeat()
    for _ in range(steps):
        model.fit(data, steps_per_epoch=1, verbose=0, shuffle=False)
        weights = [v.numpy() for v in model.generator.trainable_variables]
        average = weights if average is None else [DECAY * a + (1 - DECAY) * w for a, w in zip(average, weights)]
    return average


def test_ema_is_the_moving_average_of_the_generator_weights():
    model = tiny_gan([f"train.ema_decay={DECAY}"])
    expected = _hand_average(model, 4)
    ema = [v.numpy() for v in model.ema_variables()]
    raw = [v.numpy() for v in model.generator.trainable_variables]
    for got, want in zip(ema, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert max(float(np.abs(a - b).max()) for a, b in zip(ema, raw)) > 1e-4  # not the raw weights
    assert tiny_gan(["train.ema_decay=0", "train.export_weights=last"]).ema_variables() is None


@pytest.mark.slow
def test_ema_under_mirrored_strategy_matches_the_hand_average():
    """Two logical CPUs: every replica holds the same moving average, the one computed by hand."""
    script = f"""
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import sys; sys.path.insert(0, {str(REPO / 'tests')!r})
from test_selection import _hand_average, DECAY
from test_train import tiny_gan
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    model = tiny_gan([f"train.ema_decay={{DECAY}}"])
expected = _hand_average(model, 3)
for average, want in zip(model.ema_variables(), expected):
    for replica in average.value.values:
        np.testing.assert_allclose(replica.numpy(), want, rtol=1e-5, atol=1e-7)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_export_weights_settings_are_checked():
    assert load_config(SMALL_CONFIG).train.weights_to_export == "ema"
    assert load_config(SMALL_CONFIG, ["train.ema_decay=0"]).train.weights_to_export == "last"
    with pytest.raises(ConfigError, match="export_weights='ema' train.ema_decay=0: there is no moving average"):
        load_config(SMALL_CONFIG, ["train.ema_decay=0", "train.export_weights=ema"])
    with pytest.raises(ConfigError, match=r"train.ema_decay=1: must be a finite number in \[0, 1\)"):
        load_config(SMALL_CONFIG, ["train.ema_decay=1"])
    with pytest.raises(ConfigError, match="train.export_weights='newest': must be one of"):
        load_config(SMALL_CONFIG, ["train.export_weights=newest"])


def test_collapse_guard_counts_validations_in_a_row():
    guard = CollapseGuard(load_config(SMALL_CONFIG, ["train.collapse.patience=2"]).train.collapse)
    assert guard.judge_validation(10, 19.5, 20.0) is None          # within the 1 dB margin
    assert guard.judge_validation(20, 18.5, 20.0) is None          # one fall
    assert guard.judge_validation(30, 19.5, 20.0) is None          # back within: the count restarts
    assert guard.judge_validation(40, 18.0, 20.0) is None
    assert "for 2 validations in a row" in guard.judge_validation(50, 18.0, 20.0)
    assert "discriminator wins outright" in guard.judge_losses(60, {"d_loss": 0.001, "g_adversarial": 7.0})
    assert "adversarial loss exploded" in guard.judge_losses(60, {"d_loss": 0.5, "g_adversarial": 50.0})
    assert guard.judge_losses(60, {"d_loss": 0.6, "g_adversarial": 0.8}) is None


def _validations(log: str) -> dict[int, float]:
    """{step: validation PSNR of the raw generator} from a train.log."""
    return {int(m[1]): float(m[2]) for m in re.finditer(r"step (\d+) validation \(\d+ slices, in mask\): "
                                                        r"PSNR (-?[\d.]+) dB", log)}


def _generator(export_dir):
    g = build_generator(1, 8, 4)
    export.warm_start(g, build_discriminator(32, features=8), export_dir)
    return g


@pytest.mark.slow
def test_best_exports_the_best_validated_step_and_resumes_exactly(converted, tiny_config, tmp_path):  # noqa: F811
    out, _ = converted
    cfg = load_config(tiny_config, ["train.export_weights=best", "train.eval_every=1", "train.checkpoint_every=2",
                                    "train.keep_checkpoints=20", "train.gan_phase.learning_rate=3e-3"])
    result = train_stage("ncct", out, cfg, warm_start="none", models_dir=tmp_path / "models",
                         runs_dir=tmp_path / "runs")
    scores = _validations((result.run_dir / "train.log").read_text())
    assert sorted(scores) == list(range(1, 9))
    gan = {step: psnr for step, psnr in scores.items() if step > 4}  # the phase the run ended in
    best = max(gan, key=gan.get)
    meta = export.read_metadata(result.export_dir)
    assert meta["exported_weights"] == "best" and meta["exported_step"] == best
    assert meta["exported_validation"]["psnr_mask"] == pytest.approx(gan[best], abs=0.01)
    kept = sorted(p.name for p in (result.run_dir / "best").iterdir())
    assert f"phase1-step{best}.npz" in kept and len(kept) <= 2  # the best of each phase, not every checkpoint
    card = (result.export_dir / "MODEL_CARD.md").read_text()
    assert f"best (validation PSNR {gan[best]:.2f} dB in the brain mask, step {best})" in card

    # Resumed inside the GAN phase, the run keeps the same record and exports the same weights.
    runs = tmp_path / "runs-resumed"
    shutil.copytree(tmp_path / "runs", runs)
    run = runs / result.run_dir.name
    (run / "exported.json").unlink()
    for f in (run / "checkpoints").glob("ckpt-*"):
        if int(f.name.split(".")[0].split("-")[1]) > 6:
            f.unlink()
    (run / "checkpoints/checkpoint").write_text('model_checkpoint_path: "ckpt-6"\n')
    again = train_stage("ncct", out, cfg, warm_start="none", models_dir=tmp_path / "models-resumed",
                        runs_dir=runs)
    assert again.resumed_from == 6 and export.read_metadata(again.export_dir)["exported_step"] == best
    for a, b in zip(_generator(result.export_dir).get_weights(), _generator(again.export_dir).get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_ema_export_holds_the_moving_average_and_warm_starts_the_next_stage(converted, tiny_config, tmp_path):  # noqa: F811
    out, _ = converted
    cfg = load_config(tiny_config, ["train.ema_decay=0.5"])
    result = train_stage("ncct", out, cfg, warm_start="none", models_dir=tmp_path / "models",
                         runs_dir=tmp_path / "runs")
    meta = export.read_metadata(result.export_dir)
    assert meta["exported_weights"] == "ema" and meta["exported_step"] == 8 and meta["ema_decay"] == 0.5
    assert set(meta["exported_validation"]) == {"psnr_mask", "ssim_mask", "slices"}
    # The export is the optimizer's moving average at the final checkpoint, not the raw weights.
    model = tiny_gan(["train.ema_decay=0.5"])
    tf.train.Checkpoint(generator=model.generator, discriminator=model.discriminator,
                        g_optimizer=model.g_optimizer, d_optimizer=model.d_optimizer) \
        .read(str(result.run_dir / "checkpoints/ckpt-8")).expect_partial()
    exported = _generator(result.export_dir).trainable_variables
    for got, average in zip(exported, model.ema_variables()):
        np.testing.assert_allclose(got.numpy(), average.numpy(), rtol=1e-6, atol=1e-7)
    assert any(np.abs(g.numpy() - r.numpy()).max() > 1e-6
               for g, r in zip(exported, model.generator.trainable_variables))
    # The next stage starts from exactly these weights.
    child = train_stage("ctp", out, load_config(tiny_config, ["train.l1_phase.steps=1", "train.gan_phase.steps=0",
                                                              "train.ema_decay=0", "train.l1_phase.milestones=[]"]),
                        models_dir=tmp_path / "models", runs_dir=tmp_path / "runs")
    log = (child.run_dir / "train.log").read_text()
    assert f"warm start from {result.export_dir}" in log
    assert export.read_metadata(child.export_dir)["exported_weights"] == "last"


@pytest.mark.slow
def test_a_collapsing_gan_phase_is_reported_and_stopped(converted, tiny_config, tmp_path):  # noqa: F811
    """A GAN phase whose discriminator learns far too fast: the log and TensorBoard say so; with
    stop_on_collapse the run ends there and exports the best weights."""
    out, _ = converted
    cfg = load_config(tiny_config, ["train.gan_phase.steps=30", "train.gan_phase.milestones=[]",
                                    "train.d_learning_rate=0.05", "train.log_every=2",
                                    "train.eval_every=2", "train.stop_on_collapse=true"])
    result = train_stage("ncct", out, cfg, warm_start="none", models_dir=tmp_path / "models",
                         runs_dir=tmp_path / "runs")
    log = (result.run_dir / "train.log").read_text()
    assert re.search(r"collapse at step \d+: the discriminator wins outright", log), log[-3000:]
    assert "train.stop_on_collapse is set: training stops here" in log
    meta = export.read_metadata(result.export_dir)
    assert result.steps < 34 and meta["stopped_by_collapse_at"] == result.steps
    assert meta["exported_weights"] == "best" and meta["exported_step"] <= result.steps
    events = list((result.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    tags = {v.tag for e in tf.compat.v1.train.summary_iterator(str(events[0])) for v in e.summary.value}
    assert "collapse/discriminator" in tags and "validation/psnr_mask_ema" in tags


def test_best_without_validation_slices_is_refused(converted, tiny_config, tmp_path):  # noqa: F811
    out, _ = converted
    with pytest.raises(TrainingError, match="train.eval_slices=0"):
        train_stage("ncct", out, load_config(tiny_config, ["train.export_weights=best", "train.eval_slices=0"]),
                    warm_start="none", models_dir=tmp_path / "models", runs_dir=tmp_path / "runs")

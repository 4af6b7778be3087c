"""Per-step bookkeeping of a training run, as a Keras callback (`StepWatcher`).

After every step: stop on a non-finite loss (keeping the last good checkpoint),
log a line and TensorBoard scalars every `train.log_every` steps (and judge the
GAN losses for a collapse, `collapse`), every `train.eval_every` steps and at
the end of each phase compute PSNR/SSIM inside the brain mask on
`train.eval_slices` validation slices (with LR | SR | HR images for
TensorBoard; also for the moving average of G when there is one), keep the
phase's best weights (`selection`) and judge the validation for a collapse,
then save a checkpoint every `train.checkpoint_every`. Validation comes before
the checkpoint of the same step, so that the checkpoint holds its outcome.
Images are [0, 1], NHWC.
"""
from __future__ import annotations

import logging
import math
import time

import keras
import numpy as np
import tensorflow as tf

from tfgan_ct.data import pipeline
from tfgan_ct.evaluation import metrics
from tfgan_ct.training.collapse import CollapseGuard
from tfgan_ct.training.distribute import tensorboard_dir
from tfgan_ct.training.run import Run
from tfgan_ct.training.selection import BestWeights, load_ema

log = logging.getLogger("tfgan_ct.training.callbacks")


class StepWatcher(keras.callbacks.Callback):
    """Watches the steps of `gan` (a TransferGAN) up to step `total`; `error` says why it stopped one."""

    def __init__(self, gan, manager: tf.train.CheckpointManager, run: Run, total: int, best: BestWeights,
                 guard: CollapseGuard, shadow: keras.Model | None):
        super().__init__()
        self.gan, self.manager, self.cfg, self.total, self.scale = gan, manager, run.cfg, total, run.scale
        self.best, self.guard, self.shadow = best, guard, shadow  # shadow: holds G's moving average
        self.phase_end = total
        self.error: str | None = None
        self.writer = tf.summary.create_file_writer(str(tensorboard_dir(run.run_dir, run.strategy)))
        self.val = validation_slices(run)
        self.t0, self.s0 = time.perf_counter(), None

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.gan.step.numpy())
        if self.s0 is None:
            self.s0, self.t0 = step - 1, time.perf_counter()
        logs = {k: float(np.asarray(v).reshape(-1)[0]) for k, v in (logs or {}).items()}
        bad = [k for k, v in logs.items() if not math.isfinite(v)]
        if bad:
            last = self.manager.latest_checkpoint or "none"
            self.error = (f"non-finite {', '.join(bad)} at step {step}; stopped. The last good checkpoint "
                          f"is {last}; lower the learning rate or check the data, then run again to resume")
            self.gan.stop_training = True
            return
        tc = self.cfg.train
        collapses = []
        if step % tc.log_every == 0 or step == self.phase_end:
            self._log(step, logs)
            if self.gan.gan_phase:
                collapses.append(self._judge("discriminator", step, self.guard.judge_losses(step, logs)))
        validated = self.val and (step % tc.eval_every == 0 or step in (self.phase_end, self.total))
        if validated:
            collapses.append(self._judge("validation", step, self._validate(step)))
        if any(collapses) and tc.stop_on_collapse:
            if self.val and not validated:  # so that the best weights include the last ones judged
                self._validate(step)
            log.warning("step %d: train.stop_on_collapse is set: training stops here and the best "
                        "weights are exported", step)
            self.guard.stop(step)
            self.gan.stop_training = True
        if step % tc.checkpoint_every == 0:
            self.manager.save(checkpoint_number=step)
            self.best.prune(step)
        if step >= self.phase_end:
            self.gan.stop_training = True

    def _judge(self, sign: str, step: int, finding: str | None) -> bool:
        """Log and record (TensorBoard `collapse/<sign>`, 1 or 0) what the guard found; True for a collapse."""
        with self.writer.as_default(step=step):
            tf.summary.scalar(f"collapse/{sign}", 1.0 if finding else 0.0)
            if finding:
                tf.summary.text("collapse/finding", finding)
        if finding:
            log.warning("%s", finding)
        return finding is not None

    def _log(self, step: int, logs: dict[str, float]) -> None:
        rate = (step - self.s0) / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - step) / max(rate, 1e-9)
        rates = self.gan.last_learning_rates()  # what this step used, not the next step's rate
        g_lr = rates["generator"]
        log.info("step %d/%d %s | %s | lr %.2e | %.2f steps/s | ETA %s", step, self.total,
                 "GAN" if self.gan.gan_phase else "L1",
                 " ".join(f"{k} {v:.4g}" for k, v in sorted(logs.items())), g_lr, rate,
                 time.strftime("%H:%M:%S", time.gmtime(eta)))
        with self.writer.as_default(step=step):
            for key, value in logs.items():
                tf.summary.scalar(f"loss/{key}", value)
            tf.summary.scalar("learning_rate/generator", g_lr)
            if self.gan.gan_phase:
                tf.summary.scalar("learning_rate/discriminator", rates["discriminator"])
            tf.summary.scalar("steps_per_second", rate)

    def _validate(self, step: int) -> str | None:
        """Score G (and its moving average), keep the phase's best weights; the guard's finding, if any."""
        phase = 1 if self.gan.gan_phase else 0
        psnr, ssim, images = score(self.gan.generator, self.val, self.scale)
        record = self.best.best(phase)
        finding = self.guard.judge_validation(step, psnr, record["psnr_mask"]) if record else None
        kept = self.best.offer(phase, step, psnr, ssim, self.gan.generator, self.gan.discriminator)
        line = f"step {step} validation ({len(self.val)} slices, in mask): PSNR {psnr:.2f} dB, SSIM {ssim:.4f}"
        with self.writer.as_default(step=step):
            tf.summary.scalar("validation/psnr_mask", psnr)
            tf.summary.scalar("validation/ssim_mask", ssim)
            for i, image in enumerate(images):  # LR (nearest) | SR | HR
                tf.summary.image(f"validation/lr_sr_hr_{i}", image[None, ..., None])
            if self.shadow is not None:
                load_ema(self.shadow, self.gan.generator, self.gan.ema_variables())
                ema_psnr, ema_ssim, _ = score(self.shadow, self.val, self.scale, panels=0)
                tf.summary.scalar("validation/psnr_mask_ema", ema_psnr)
                tf.summary.scalar("validation/ssim_mask_ema", ema_ssim)
                line += f"; moving average: PSNR {ema_psnr:.2f} dB, SSIM {ema_ssim:.4f}"
        log.info("%s%s", line, " (best of the phase so far)" if kept else "")
        return finding


def validation_slices(run: Run) -> list:
    """The first `train.eval_slices` validation slices of the run's modality; [] without any."""
    if not _has_split(run.data_dir, "validation", run.stage):
        return []
    return list(pipeline.eval_dataset(run.data_dir, "validation", run.stage, run.cfg).take(run.cfg.train.eval_slices))


def score(generator: keras.Model, slices: list, scale: int, panels: int = 3) -> tuple[float, float, list]:
    """Mean PSNR (dB) and SSIM inside the brain mask of `generator` on `slices`, and up to `panels`
    LR | SR | HR images (see `validation_panel`)."""
    scores, images = [], []
    for item in slices:
        sr = np.clip(generator(item["lr"][None], training=False).numpy()[0, ..., 0], 0, 1)
        hr, mask = item["hr"].numpy()[..., 0], item["mask"].numpy()[..., 0]
        scores.append((metrics.psnr(sr, hr, mask=mask), metrics.ssim(sr, hr, mask=mask)))
        if len(images) < panels:
            images.append(validation_panel(item["lr"].numpy()[..., 0], sr, hr, scale))
    psnr, ssim = np.mean(scores, axis=0)
    return float(psnr), float(ssim), images


def validation_panel(lr: np.ndarray, sr: np.ndarray, hr: np.ndarray, scale: int) -> np.ndarray:
    """LR (nearest-neighbour upscaled) | SR | HR side by side for TensorBoard.

    lr [h, w], sr and hr [scale*h, scale*w], all in [0, 1]; returns [scale*h, 3*scale*w].
    """
    lr_up = np.repeat(np.repeat(lr, scale, 0), scale, 1)
    return np.concatenate([lr_up, sr, hr], axis=1)


def _has_split(data_dir, split: str, modality: str) -> bool:
    try:
        pipeline.shard_files(data_dir, split, modality)
        return True
    except pipeline.DataError:
        return False

"""Per-step bookkeeping of a training run, as a Keras callback (`StepWatcher`).

After every step: stop on a non-finite loss (keeping the last good checkpoint),
log a line and TensorBoard scalars every `train.log_every` steps, save a
checkpoint every `train.checkpoint_every`, and every `train.eval_every` compute
PSNR/SSIM inside the brain mask on `train.eval_slices` validation slices (with
LR | SR | HR images for TensorBoard). Images are [0, 1], NHWC.
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
from tfgan_ct.training.distribute import tensorboard_dir
from tfgan_ct.training.run import Run

log = logging.getLogger("tfgan_ct.training.callbacks")


class StepWatcher(keras.callbacks.Callback):
    """Watches the steps of `gan` (a TransferGAN) up to step `total`; `error` says why it stopped one."""

    def __init__(self, gan, manager: tf.train.CheckpointManager, run: Run, total: int):
        super().__init__()
        self.gan, self.manager, self.cfg, self.total, self.scale = gan, manager, run.cfg, total, run.scale
        self.phase_end = total
        self.error: str | None = None
        self.writer = tf.summary.create_file_writer(str(tensorboard_dir(run.run_dir, run.strategy)))
        self.val = list(pipeline.eval_dataset(run.data_dir, "validation", run.stage, run.cfg)
                        .take(run.cfg.train.eval_slices)) if _has_split(run.data_dir, "validation", run.stage) else []
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
        if step % tc.log_every == 0 or step == self.phase_end:
            self._log(step, logs)
        if step % tc.checkpoint_every == 0:
            self.manager.save(checkpoint_number=step)
        if self.val and (step % tc.eval_every == 0 or step == self.total):
            self._validate(step)
        if step >= self.phase_end:
            self.gan.stop_training = True

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

    def _validate(self, step: int) -> None:
        scores, images = [], []
        for item in self.val:
            sr = np.clip(self.gan.generator(item["lr"][None], training=False).numpy()[0, ..., 0], 0, 1)
            hr, mask = item["hr"].numpy()[..., 0], item["mask"].numpy()[..., 0]
            scores.append((metrics.psnr(sr, hr, mask=mask), metrics.ssim(sr, hr, mask=mask)))
            if len(images) < 3:
                images.append(validation_panel(item["lr"].numpy()[..., 0], sr, hr, self.scale))
        psnr, ssim = np.mean(scores, axis=0)
        log.info("step %d validation (%d slices, in mask): PSNR %.2f dB, SSIM %.4f", step, len(scores), psnr, ssim)
        with self.writer.as_default(step=step):
            tf.summary.scalar("validation/psnr_mask", psnr)
            tf.summary.scalar("validation/ssim_mask", ssim)
            for i, image in enumerate(images):  # LR (nearest) | SR | HR
                tf.summary.image(f"validation/lr_sr_hr_{i}", image[None, ..., None])


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

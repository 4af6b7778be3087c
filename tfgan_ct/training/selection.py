"""Which weights a run exports (`train.export_weights`): the moving average, the best validated, the last.

    ema   the exponential moving average of the generator's weights that its
          optimizer keeps (`train.ema_decay`; `TransferGAN.ema_variables`), with
          the discriminator as it ends
    best  generator and discriminator at the validation with the highest PSNR in
          the brain mask of the phase the run ended in (the GAN phase, or the L1
          phase for a run without one or stopped in it)
    last  both networks as the last step left them

`BestWeights` keeps, per phase (0: L1, 1: GAN), the best validation so far. Its
record (PSNR, SSIM, step) is a `tf.Module` of variables checkpointed with the
run, so a resumed run continues it exactly; the weights themselves go to
`best/phase<p>-step<s>.npz` (arrays by Keras variable path) only when a
validation beats the record, so no other checkpoint is kept. Files of steps
after the newest run checkpoint are kept until the run passes them (a run
killed between the two resumes before them and forgets them, see `forget_after`).
"""
from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tfgan_ct.fileio import atomic_write_bytes

log = logging.getLogger("tfgan_ct.training.selection")

PHASES = ("L1", "GAN")
_FILE = re.compile(r"phase(?P<phase>\d)-step(?P<step>\d+)\.npz$")


class BestRecord(tf.Module):
    """Per phase: the best validation PSNR in the mask (dB), its SSIM and step (-1: none yet)."""

    def __init__(self):
        super().__init__(name="best_record")
        self.psnr = tf.Variable([-np.inf] * len(PHASES), dtype=tf.float64, trainable=False)
        self.ssim = tf.Variable([0.0] * len(PHASES), dtype=tf.float64, trainable=False)
        self.step = tf.Variable([-1] * len(PHASES), dtype=tf.int64, trainable=False)


class BestWeights:
    """The best validated weights of each phase: the record (checkpointed) and their files in `folder`."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.record = BestRecord()

    def best(self, phase: int) -> dict | None:
        """{'step', 'psnr_mask', 'ssim_mask'} of phase `phase`'s best validation; None before one."""
        step = int(self.record.step[phase].numpy())
        if step < 0:
            return None
        return {"step": step, "psnr_mask": float(self.record.psnr[phase].numpy()),
                "ssim_mask": float(self.record.ssim[phase].numpy())}

    def offer(self, phase: int, step: int, psnr: float, ssim: float, generator: keras.Model,
              discriminator: keras.Model) -> bool:
        """Keep the networks' weights when this validation (PSNR dB, SSIM) beats the phase's best; True if so."""
        if not psnr > float(self.record.psnr[phase].numpy()):
            return False
        self.folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **weights_by_path(generator, "generator"),
                 **weights_by_path(discriminator, "discriminator"))
        atomic_write_bytes(self.folder / f"phase{phase}-step{step}.npz", buffer.getvalue())
        self.record.psnr[phase].assign(psnr)
        self.record.ssim[phase].assign(ssim)
        self.record.step[phase].assign(step)
        return True

    def _files(self) -> list[tuple[int, int, Path]]:
        """(phase, step, file) of every kept weights file."""
        if not self.folder.is_dir():
            return []
        found = [(_FILE.match(p.name), p) for p in self.folder.iterdir()]
        return [(int(m["phase"]), int(m["step"]), p) for m, p in found if m]

    def prune(self, checkpointed: int) -> None:
        """After the run checkpoint at step `checkpointed`: drop files no resume can need any more.

        Kept per phase: the newest file at or before that step (the record the
        checkpoint holds) and every later one (a later checkpoint's record).
        """
        for phase in range(len(PHASES)):
            steps = sorted(s for p, s, _ in self._files() if p == phase and s <= checkpointed)
            for p, s, path in self._files():
                if p == phase and s in steps[:-1]:
                    path.unlink(missing_ok=True)

    def forget_after(self, step: int) -> None:
        """On resume at `step`: remove files of later validations (the resumed run makes them again)."""
        for _, s, path in self._files():
            if s > step:
                path.unlink()

    def restore(self, phase: int, generator: keras.Model, discriminator: keras.Model) -> dict:
        """Assign phase `phase`'s best weights to the networks; returns its record (see `best`)."""
        best = self.best(phase)
        path = self.folder / f"phase{phase}-step{best['step']}.npz" if best else None
        if path is None or not path.is_file():
            raise FileNotFoundError(f"the best {PHASES[phase]} phase weights ({path or 'none recorded'}) are "
                                    f"missing; export 'ema' or 'last', or train again with --restart")
        with np.load(path) as stored:
            assign_by_path(generator, "generator", stored)
            assign_by_path(discriminator, "discriminator", stored)
        return best


def weights_by_path(model: keras.Model, prefix: str) -> dict[str, np.ndarray]:
    """{'<prefix>:<variable path>': value} of every variable of `model` (the first replica's under tf.distribute)."""
    return {f"{prefix}:{v.path}": np.asarray(v.numpy()) for v in model.variables}


def assign_by_path(model: keras.Model, prefix: str, stored) -> None:
    """Assign every variable of `model` from `stored` (a mapping written by `weights_by_path`)."""
    for variable in model.variables:
        variable.assign(stored[f"{prefix}:{variable.path}"])


def load_ema(shadow: keras.Model, generator: keras.Model, averages: list) -> None:
    """Set `shadow` (an `export.float32_clone` of `generator`) to the moving averages of G's trainable
    variables (`averages`, in `generator.trainable_variables` order) and G's other variables."""
    average = {v.path: a for v, a in zip(generator.trainable_variables, averages)}
    current = {v.path: v for v in generator.variables}
    for variable in shadow.variables:
        source = average[variable.path] if variable.path in average else current[variable.path]
        variable.assign(np.asarray(source.numpy()))

"""The collapse guard: say clearly when GAN training has gone wrong (`train.collapse`).

Two signs, checked as the run goes (`CollapseGuard`):
    the discriminator wins outright: in the GAN phase, its RaGAN loss averaged
        over a logging interval below `d_loss_below` (about 0.69 at balance), or
        the generator's adversarial loss above `g_adversarial_above`;
    validation falls: PSNR in the brain mask more than `psnr_drop_db` dB below
        the phase's best for `patience` validations in a row.
Each sign is a warning in the log and a `collapse/*` scalar in TensorBoard;
with `train.stop_on_collapse` the run ends there and exports its best weights.
The count of falling validations and the step training stopped at are
variables checkpointed with the run, so a resumed run judges as an
uninterrupted one would.
"""
from __future__ import annotations

import tensorflow as tf

from tfgan_ct.config import CollapseSettings


class GuardState(tf.Module):
    """Validations in a row below the phase's best by the margin; step a collapse stopped training (0: none)."""

    def __init__(self):
        super().__init__(name="collapse_guard")
        self.falls = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.stopped_at = tf.Variable(0, dtype=tf.int64, trainable=False)


class CollapseGuard:
    """Judges logged losses and validations against `settings`; returns what it found as a sentence."""

    def __init__(self, settings: CollapseSettings):
        self.settings = settings
        self.state = GuardState()

    @property
    def stopped_at(self) -> int:
        """The step a collapse stopped training at; 0 when none did."""
        return int(self.state.stopped_at.numpy())

    def judge_losses(self, step: int, logs: dict[str, float]) -> str | None:
        """The discriminator's win, from GAN-phase losses averaged over a logging interval; None if none."""
        s = self.settings
        d_loss, adversarial = logs.get("d_loss"), logs.get("g_adversarial")
        if d_loss is not None and d_loss < s.d_loss_below:
            return (f"collapse at step {step}: the discriminator wins outright (d_loss {d_loss:.3g} < "
                    f"{s.d_loss_below:g}; about 0.69 at balance)")
        if adversarial is not None and adversarial > s.g_adversarial_above:
            return (f"collapse at step {step}: the generator's adversarial loss exploded "
                    f"(g_adversarial {adversarial:.3g} > {s.g_adversarial_above:g})")
        return None

    def judge_validation(self, step: int, psnr: float, best_psnr: float) -> str | None:
        """Count a validation PSNR (dB, in the mask) against the phase's best; a sentence at `patience` in a row."""
        s = self.settings
        if psnr < best_psnr - s.psnr_drop_db:
            self.state.falls.assign_add(1)
        else:
            self.state.falls.assign(0)
        falls = int(self.state.falls.numpy())
        if falls >= s.patience:
            return (f"collapse at step {step}: validation PSNR {psnr:.2f} dB is more than {s.psnr_drop_db:g} dB "
                    f"below the phase's best ({best_psnr:.2f} dB) for {falls} validations in a row")
        return None

    def new_phase(self) -> None:
        """A phase starts: falls are counted against its own best."""
        self.state.falls.assign(0)

    def stop(self, step: int) -> None:
        """Record that a collapse ended training at `step`."""
        self.state.stopped_at.assign(step)

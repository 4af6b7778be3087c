"""The Transfer-GAN training model: generator, discriminator, VGG19, two optimizers.

`TransferGAN.train_step` runs one of ESRGAN's two phases:
    L1 phase (`gan_phase = False`): G only, loss = L1(SR, HR)
    GAN phase (`gan_phase = True`): G: perceptual + 5e-3 * RaGAN_G + 1e-2 * L1 (weights
    from the config); D: RaGAN_D on HR vs. the (detached) SR of the same batch
Per-example losses are averaged over the *global* batch, so gradients summed over
replicas under `tf.distribute` equal those of one big batch. With `mixed_float16`
both optimizers are `LossScaleOptimizer`s.

With `train.ema_decay` > 0 the generator's Adam keeps an exponential moving
average of G's trainable weights (Keras' `use_ema`; BasicSR / Real-ESRGAN keep
one too): after each G update, average = decay * average + (1 - decay) * weights,
the first update copying the weights. The averages are optimizer variables, so
they are checkpointed with the run and mirrored like the weights under
tf.distribute (each replica applies the same all-reduced update).
"""
from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from tfgan_ct.config import PhaseSettings, TrainSettings
from tfgan_ct.model import losses


def halving_schedule(phases: list[tuple[int, PhaseSettings]]) -> keras.optimizers.schedules.LearningRateSchedule:
    """Piecewise-constant learning rate over consecutive phases.

    phases: [(steps before the phase, its settings), ...]; within a phase the
    rate starts at `learning_rate` and halves after each of its `milestones`
    (counted in steps of the phase). The schedule is evaluated at the
    optimizer's `iterations`, the number of updates made so far, so update
    `start + k` (0-based) is the phase's (k+1)-th and Keras's
    "rate i while step <= boundary i" needs boundaries one below the switch.
    """
    boundaries: list[int] = []
    values: list[float] = []
    for start, phase in phases:
        if phase.steps <= 0:
            continue
        if values:
            boundaries.append(start - 1)
        rate = phase.learning_rate
        values.append(rate)
        for milestone in sorted({m for m in phase.milestones if 0 < m < phase.steps}):
            rate *= 0.5
            boundaries.append(start + milestone - 1)
            values.append(rate)
    if not values:
        values = [0.0]
    if not boundaries:  # a single constant rate
        return keras.optimizers.schedules.PiecewiseConstantDecay([1 << 62], values * 2)
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def make_optimizer(schedule, settings: TrainSettings, name: str,
                   ema_decay: float = 0.0) -> keras.optimizers.Optimizer:
    """Adam (beta1 0.9, beta2 0.999 by default), loss-scaled under mixed_float16.

    ema_decay > 0: the optimizer also keeps a moving average of what it trains.
    """
    opt = keras.optimizers.Adam(learning_rate=schedule, beta_1=settings.beta_1, beta_2=settings.beta_2,
                                use_ema=ema_decay > 0, ema_momentum=ema_decay if ema_decay > 0 else 0.99,
                                name=name)
    if settings.mixed_precision == "mixed_float16":
        opt = keras.optimizers.LossScaleOptimizer(opt, name=f"{name}_loss_scale")
    return opt


class TransferGAN(keras.Model):
    """Holds G, D, the frozen VGG19 and both optimizers; `call` is the generator."""

    def __init__(self, generator: keras.Model, discriminator: keras.Model, vgg: keras.Model,
                 settings: TrainSettings, global_batch: int, **kwargs):
        super().__init__(**kwargs)
        self.generator, self.discriminator, self.vgg = generator, discriminator, vgg
        self.settings, self.global_batch = settings, global_batch
        l1, gan = settings.l1_phase, settings.gan_phase
        self.g_schedule = halving_schedule([(0, l1), (l1.steps, gan)])
        d_rate = settings.d_learning_rate or gan.learning_rate
        self.d_schedule = halving_schedule([(0, dataclasses.replace(gan, learning_rate=d_rate))])
        self.g_optimizer = make_optimizer(self.g_schedule, settings, "g_adam", ema_decay=settings.ema_decay)
        self.d_optimizer = make_optimizer(self.d_schedule, settings, "d_adam")
        self.gan_phase = False
        self.trackers = {name: keras.metrics.Mean(name=name) for name in
                         ("g_loss", "l1", "perceptual", "g_adversarial", "d_loss", "d_real", "d_fake")}

    def build_optimizers(self) -> None:
        """Create optimizer slots now (inside the strategy scope, before `fit`).

        Under MirroredStrategy a custom train step with two optimizers fails on
        its first step unless both are built in the strategy's scope.
        """
        self.g_optimizer.build(self.generator.trainable_variables)
        self.d_optimizer.build(self.discriminator.trainable_variables)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Nothing to build: networks, optimizers and metrics all exist before `fit`.

        Keras 3 (up to at least 3.15) would otherwise reduce the first
        distributed batch with `strategy.reduce`, which
        MultiWorkerMirroredStrategy cannot do for a dict of tensors.
        """
        return

    def ema_variables(self) -> list | None:
        """The moving averages of `generator.trainable_variables` (same order); None without EMA."""
        optimizer = getattr(self.g_optimizer, "inner_optimizer", self.g_optimizer)
        if not optimizer.use_ema:
            return None
        index = {optimizer._var_key(v): i for i, v in enumerate(optimizer._trainable_variables)}
        averages = optimizer._model_variables_moving_average
        return [averages[index[optimizer._var_key(v)]] for v in self.generator.trainable_variables]

    @property
    def step(self) -> tf.Variable:
        """Generator updates so far (the global step; D updates only in the GAN phase)."""
        return self.g_optimizer.iterations

    def last_learning_rates(self) -> dict[str, float]:
        """Learning rates the latest update of each optimizer used: {'generator': .., 'discriminator': ..}.

        An optimizer's `learning_rate` is its schedule at `iterations`, i.e. the
        rate of the *next* update; the update just made used the schedule at
        `iterations - 1` (the first rate before any update).
        """
        return {name: float(schedule(max(int(optimizer.iterations.numpy()) - 1, 0)))
                for name, schedule, optimizer in (("generator", self.g_schedule, self.g_optimizer),
                                                  ("discriminator", self.d_schedule, self.d_optimizer))}

    @property
    def metrics(self):
        return list(self.trackers.values())

    def call(self, lr, training=False):
        return self.generator(lr, training=training)

    def _average(self, per_example: tf.Tensor) -> tf.Tensor:
        return tf.nn.compute_average_loss(per_example, global_batch_size=self.global_batch)

    def train_step(self, data):
        lr, hr = data["lr"], data["hr"]
        if self.gan_phase:
            self._gan_step(lr, hr)
        else:
            self._l1_step(lr, hr)
        # Shape [1], not scalars: Keras 3 reduces step outputs over workers of a
        # MultiWorkerMirroredStrategy with a mean along axis 0.
        return {name: tf.reshape(m.result(), [1]) for name, m in self.trackers.items()
                if self.gan_phase or name in ("g_loss", "l1")}

    def _apply(self, optimizer, tape, scaled_loss, variables) -> None:
        """Apply gradients of `scaled_loss` (from `optimizer.scale_loss`, taken inside the tape)."""
        optimizer.apply(tape.gradient(scaled_loss, variables), variables)

    def _l1_step(self, lr, hr) -> None:
        with tf.GradientTape() as tape:
            sr = self.generator(lr, training=True)
            l1 = losses.l1_per_example(sr, hr)
            scaled = self.g_optimizer.scale_loss(self._average(l1))
        self._apply(self.g_optimizer, tape, scaled, self.generator.trainable_variables)
        self.trackers["l1"].update_state(l1)
        self.trackers["g_loss"].update_state(l1)

    def _gan_step(self, lr, hr) -> None:
        s = self.settings
        with tf.GradientTape() as tape:
            sr = self.generator(lr, training=True)
            real_logits = tf.stop_gradient(self.discriminator(hr, training=True))
            fake_logits = self.discriminator(sr, training=True)
            l1 = losses.l1_per_example(sr, hr)
            perceptual = losses.perceptual_per_example(self.vgg, sr, hr)
            adversarial = losses.ragan_g_per_example(real_logits, fake_logits)
            g_total = s.perceptual_weight * perceptual + s.adversarial_weight * adversarial + s.l1_weight * l1
            scaled = self.g_optimizer.scale_loss(self._average(g_total))
        self._apply(self.g_optimizer, tape, scaled, self.generator.trainable_variables)

        sr = tf.stop_gradient(sr)
        with tf.GradientTape() as tape:
            real_logits = self.discriminator(hr, training=True)
            fake_logits = self.discriminator(sr, training=True)
            d_total = losses.ragan_d_per_example(real_logits, fake_logits)
            scaled = self.d_optimizer.scale_loss(self._average(d_total))
        self._apply(self.d_optimizer, tape, scaled, self.discriminator.trainable_variables)

        for name, value in (("g_loss", g_total), ("l1", l1), ("perceptual", perceptual),
                            ("g_adversarial", adversarial), ("d_loss", d_total),
                            ("d_real", tf.sigmoid(tf.cast(real_logits, tf.float32))),
                            ("d_fake", tf.sigmoid(tf.cast(fake_logits, tf.float32)))):
            self.trackers[name].update_state(value)

    def test_step(self, data):
        sr = tf.clip_by_value(tf.cast(self.generator(data["lr"], training=False), tf.float32), 0.0, 1.0)
        l1 = losses.l1_per_example(sr, data["hr"])
        self.trackers["l1"].update_state(l1)
        return {"l1": self.trackers["l1"].result()}

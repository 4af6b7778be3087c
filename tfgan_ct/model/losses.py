"""Losses of ESRGAN: pixel L1, perceptual (VGG19 conv5_4 L1) and relativistic average GAN.

All return per-example losses [b], so a distributed step can average them over the
*global* batch (`tf.nn.compute_average_loss`). RaGAN (Jolicoeur-Martineau 2018), with
C = logits and E = mean over the batch:
    D_Ra(real, fake) = sigmoid(C(real) - E[C(fake)])
    loss_D = (BCE(D_Ra(real, fake), 1) + BCE(D_Ra(fake, real), 0)) / 2
    loss_G = (BCE(D_Ra(real, fake), 0) + BCE(D_Ra(fake, real), 1)) / 2
E is taken over the global batch (all replicas), as ESRGAN runs D on the whole batch.
"""
from __future__ import annotations

import tensorflow as tf


def l1_per_example(pred: tf.Tensor, target: tf.Tensor) -> tf.Tensor:
    """Mean absolute error per example; pred/target NHWC -> [b]."""
    return tf.reduce_mean(tf.abs(tf.cast(pred, tf.float32) - tf.cast(target, tf.float32)), axis=[1, 2, 3])


def perceptual_per_example(vgg, sr: tf.Tensor, hr: tf.Tensor) -> tf.Tensor:
    """L1 between VGG19 conv5_4 (pre-activation) features of SR and HR; [b]."""
    return l1_per_example(vgg(sr, training=False), tf.stop_gradient(vgg(hr, training=False)))


def global_mean(x: tf.Tensor) -> tf.Tensor:
    """Mean of x over the batch dimension across all replicas (plain mean outside a strategy)."""
    ctx = tf.distribute.get_replica_context()
    x = tf.cast(x, tf.float32)
    total = tf.reduce_sum(x, axis=0)
    count = tf.cast(tf.shape(x)[0], tf.float32)
    if ctx is not None and ctx.num_replicas_in_sync > 1:
        total, count = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [total, count])
    return total / count


def _bce(logits: tf.Tensor, label: float) -> tf.Tensor:
    labels = tf.fill(tf.shape(logits), label)
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits), axis=-1)


def ragan_d_per_example(real_logits: tf.Tensor, fake_logits: tf.Tensor) -> tf.Tensor:
    """Relativistic average discriminator loss; logits [b, 1] -> [b]."""
    real_logits, fake_logits = tf.cast(real_logits, tf.float32), tf.cast(fake_logits, tf.float32)
    real_rel = real_logits - global_mean(fake_logits)
    fake_rel = fake_logits - global_mean(real_logits)
    return 0.5 * (_bce(real_rel, 1.0) + _bce(fake_rel, 0.0))


def ragan_g_per_example(real_logits: tf.Tensor, fake_logits: tf.Tensor) -> tf.Tensor:
    """Relativistic average generator loss (labels swapped); logits [b, 1] -> [b]."""
    real_logits, fake_logits = tf.cast(real_logits, tf.float32), tf.cast(fake_logits, tf.float32)
    real_rel = real_logits - global_mean(fake_logits)
    fake_rel = fake_logits - global_mean(real_logits)
    return 0.5 * (_bce(real_rel, 0.0) + _bce(fake_rel, 1.0))

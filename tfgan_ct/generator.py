"""ESRGAN generator (RRDBNet) for one-channel CT, x4.

Layer by layer as ESRGAN's RRDBNet (Wang et al. 2018; BasicSR `rrdbnet_arch.py`):

    conv_first 3x3 (1 -> nf)
    trunk: num_blocks x RRDB, each = 3 residual dense blocks (RDB), output x + 0.2 * rdbs(x)
        RDB: 4 x [3x3 conv to gc channels + LeakyReLU(0.2)] on the concatenation of
             the input and all earlier outputs, then a 3x3 conv back to nf (no
             activation); output x + 0.2 * that
    trunk_conv 3x3, long skip: features + trunk
    2 x [nearest-neighbour x2 upsampling, 3x3 conv, LeakyReLU(0.2)]
    hr_conv 3x3 + LeakyReLU(0.2), conv_last 3x3 (nf -> 1)

Paper configuration: 23 blocks, nf 64, gc 32: 16,695,681 parameters.
Tensors are NHWC; input [b, h, w, 1] in [0, 1], output [b, 4h, 4w, 1] (not clipped).

Initialisation: dense-block convolutions use He (MSRA, fan-in) normal init
scaled by 0.1, as ESRGAN. The other convolutions use PyTorch's default
(uniform, limit 1/sqrt(fan_in)) so the network starts where ESRGAN's does;
biases start at zero (PyTorch draws them uniformly: a deliberate simplification).
"""
from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers

RESIDUAL_SCALE = 0.2


def _he_scaled() -> keras.initializers.Initializer:
    # std = 0.1 * sqrt(2 / fan_in): VarianceScaling's variance is scale / fan_in.
    return keras.initializers.VarianceScaling(scale=2.0 * 0.1 ** 2, mode="fan_in",
                                              distribution="untruncated_normal")


def _torch_default() -> keras.initializers.Initializer:
    # PyTorch Conv2d default: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    return keras.initializers.VarianceScaling(scale=1.0 / 3.0, mode="fan_in", distribution="uniform")


def conv(filters: int, name: str, init=None) -> layers.Conv2D:
    """3x3 'same' convolution with bias."""
    return layers.Conv2D(filters, 3, padding="same", name=name,
                         kernel_initializer=init or _torch_default(), bias_initializer="zeros")


@keras.saving.register_keras_serializable(package="tfgan_ct")
class ResidualDenseBlock(layers.Layer):
    """RDB: five 3x3 convs with dense connections; out = x + 0.2 * conv5(...). NHWC, nf channels."""

    def __init__(self, features: int = 64, growth: int = 32, **kwargs):
        super().__init__(**kwargs)
        self.features, self.growth = features, growth
        # Named attributes rather than a list: tf.train.Checkpoint tracks these.
        self.conv1 = conv(growth, "conv1", _he_scaled())
        self.conv2 = conv(growth, "conv2", _he_scaled())
        self.conv3 = conv(growth, "conv3", _he_scaled())
        self.conv4 = conv(growth, "conv4", _he_scaled())
        self.conv5 = conv(features, "conv5", _he_scaled())
        self.act = layers.LeakyReLU(negative_slope=0.2)

    def build(self, input_shape):
        for i, layer in enumerate(self._convs()):
            layer.build((None, None, None, self.features + i * self.growth))
        super().build(input_shape)

    def _convs(self) -> tuple[layers.Conv2D, ...]:
        return self.conv1, self.conv2, self.conv3, self.conv4, self.conv5

    def call(self, x):
        """Same result as the straightforward dense block, computed 'by source'.

        The straightforward build (ESRGAN's) runs conv_k on the concatenation
        [x, x1, .., x_{k-1}]. A convolution of a concatenation is the sum of
        the convolutions of its parts, so here each part is convolved once, with
        the input-channel slices of all later convs' kernels side by side: x
        once with 4 x 32 + 64 output channels, x1 with 3 x 32 + 64, ... . That
        gives five wide convolutions instead of five narrow ones on ever wider
        concatenations, and no concatenated copies: on CPU (oneDNN) a training
        step of the paper network takes about 0.55x the time (tools/bench_train.py).
        The variables are the same five Conv2D layers with ESRGAN's shapes, so
        checkpoints, exports and warm starts do not change; a test checks the
        output against the straightforward computation.
        """
        convs = self._convs()
        dtype = x.dtype
        kernels = [tf.cast(c.kernel, dtype) for c in convs]
        biases = [tf.cast(c.bias, dtype) for c in convs]
        widths = [self.features] + [self.growth] * 4       # channels of x, x1, .., x4
        sums = [None] * 5                                   # pre-activation of conv1 .. conv5
        source, offset = x, 0
        for part in range(5):
            fused = tf.concat([k[:, :, offset:offset + widths[part], :] for k in kernels[part:]], axis=-1)
            y = tf.nn.conv2d(source, fused, strides=1, padding="SAME")
            pieces = tf.split(y, [self.growth] * (4 - part) + [self.features], axis=-1)
            for j, piece in zip(range(part, 5), pieces):
                sums[j] = piece if sums[j] is None else sums[j] + piece
            if part < 4:
                source = tf.nn.leaky_relu(sums[part] + biases[part], alpha=0.2)
            offset += widths[part]
        return x + RESIDUAL_SCALE * (sums[4] + biases[4])

    def reference_call(self, x):
        """ESRGAN's straightforward dense block (for tests): convs on growing concatenations."""
        outputs = [x]
        for layer in (self.conv1, self.conv2, self.conv3, self.conv4):
            outputs.append(self.act(layer(keras.ops.concatenate(outputs, axis=-1))))
        return x + RESIDUAL_SCALE * self.conv5(keras.ops.concatenate(outputs, axis=-1))

    def get_config(self):
        return {**super().get_config(), "features": self.features, "growth": self.growth}


@keras.saving.register_keras_serializable(package="tfgan_ct")
class RRDB(layers.Layer):
    """Residual-in-residual dense block: out = x + 0.2 * rdb3(rdb2(rdb1(x)))."""

    def __init__(self, features: int = 64, growth: int = 32, **kwargs):
        super().__init__(**kwargs)
        self.features, self.growth = features, growth
        self.rdb1 = ResidualDenseBlock(features, growth, name="rdb1")
        self.rdb2 = ResidualDenseBlock(features, growth, name="rdb2")
        self.rdb3 = ResidualDenseBlock(features, growth, name="rdb3")

    def call(self, x):
        out = x
        for rdb in (self.rdb1, self.rdb2, self.rdb3):
            out = rdb(out)
        return x + RESIDUAL_SCALE * out

    def get_config(self):
        return {**super().get_config(), "features": self.features, "growth": self.growth}


def build_generator(num_blocks: int = 23, features: int = 64, growth: int = 32, scale: int = 4,
                    channels: int = 1, name: str = "generator") -> keras.Model:
    """RRDBNet as a functional Keras model taking [b, h, w, channels] for any h, w.

    Defaults are the paper's (ESRGAN's) sizes; `model.*` in the config sets them.
    """
    if scale not in (2, 4):
        raise ValueError(f"generator scale {scale}: RRDBNet upsamples by 2 or 4")
    lr = keras.Input((None, None, channels), name="lr")
    x = conv(features, "conv_first")(lr)
    trunk = x
    for i in range(num_blocks):
        trunk = RRDB(features, growth, name=f"rrdb{i:02d}")(trunk)
    x = layers.Add(name="long_skip")([x, conv(features, "trunk_conv")(trunk)])
    for i in range(1, scale // 2 + 1):
        x = layers.UpSampling2D(2, interpolation="nearest", name=f"upsample{i}")(x)
        x = layers.LeakyReLU(0.2, name=f"up_act{i}")(conv(features, f"up_conv{i}")(x))
    x = layers.LeakyReLU(0.2, name="hr_act")(conv(features, "hr_conv")(x))
    sr = conv(channels, "conv_last")(x)
    return keras.Model(lr, sr, name=name)


def flops_per_lr_pixel(num_blocks: int = 23, features: int = 64, growth: int = 32, scale: int = 4,
                       channels: int = 1) -> float:
    """Floating-point operations (2 x multiply-adds) of one forward pass per LR pixel (convolutions)."""
    nf, gc = features, growth
    rdb = sum((nf + i * gc) * gc for i in range(4)) + (nf + 4 * gc) * nf
    lr_convs = channels * nf + num_blocks * 3 * rdb + nf * nf           # first, trunk, trunk_conv
    up_convs = sum(nf * nf * 4 ** i for i in range(1, scale // 2 + 1))  # at 2x (and 4x) resolution
    hr_convs = (nf * nf + nf * channels) * scale ** 2                   # hr_conv, conv_last
    return 2.0 * 9 * (lr_convs + up_convs + hr_convs)

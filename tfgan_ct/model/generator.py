"""ESRGAN generator (RRDBNet) for one-channel CT, x4, as in ESRGAN (BasicSR `rrdbnet_arch.py`).

    conv_first 3x3 (channels -> nf); trunk: num_blocks x RRDB; trunk_conv 3x3; long skip
    RRDB: 3 residual dense blocks (RDB), out = x + 0.2 * rdbs(x)
    RDB: 4 x [3x3 conv to gc + LeakyReLU(0.2)] on the concatenation of the input and all
         earlier outputs, then a 3x3 conv back to nf; out = x + 0.2 * that
    2 x [nearest x2 upsampling, 3x3 conv, LeakyReLU(0.2)]; hr_conv 3x3 + LeakyReLU(0.2); conv_last

NHWC: [b, h, w, 1] in [0, 1] -> [b, 4h, 4w, 1] (not clipped). Paper size (23 blocks, nf 64,
gc 32): 16,695,681 parameters. `build_generator` uses the equivalent faster forms of
`fast_layers` by default (same variables and results); `fast=False` builds this plain form.
Initialisation and the fast forms: README, "Where the project departs from the paper or ESRGAN".
"""
from __future__ import annotations

import keras
from keras import layers

from tfgan_ct.model.fast_layers import HighResConv2D, UpsampleConv2D, dense_block_by_source

RESIDUAL_SCALE = 0.2


def _he_scaled() -> keras.initializers.Initializer:
    # ESRGAN's dense-block init: std = 0.1 * sqrt(2 / fan_in) (VarianceScaling's variance is scale / fan_in).
    return keras.initializers.VarianceScaling(scale=2.0 * 0.1 ** 2, mode="fan_in",
                                              distribution="untruncated_normal")


def _torch_default() -> keras.initializers.Initializer:
    # PyTorch Conv2d default: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    return keras.initializers.VarianceScaling(scale=1.0 / 3.0, mode="fan_in", distribution="uniform")


def conv(filters: int, name: str, init=None) -> layers.Conv2D:
    """3x3 'same' convolution with bias (zero); kernel init PyTorch's default unless given."""
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
        for i, layer in enumerate(self.convs()):
            layer.build((None, None, None, self.features + i * self.growth))
        super().build(input_shape)

    def convs(self) -> tuple[layers.Conv2D, ...]:
        """conv1 .. conv5."""
        return self.conv1, self.conv2, self.conv3, self.conv4, self.conv5

    def call(self, x):
        outputs = [x]
        for layer in (self.conv1, self.conv2, self.conv3, self.conv4):
            outputs.append(self.act(layer(keras.ops.concatenate(outputs, axis=-1))))
        return x + RESIDUAL_SCALE * self.conv5(keras.ops.concatenate(outputs, axis=-1))

    def get_config(self):
        return {**super().get_config(), "features": self.features, "growth": self.growth}


@keras.saving.register_keras_serializable(package="tfgan_ct")
class FastResidualDenseBlock(ResidualDenseBlock):
    """The same block (variables, result), computed by `fast_layers.dense_block_by_source`."""

    def call(self, x):
        return x + RESIDUAL_SCALE * dense_block_by_source(x, self.convs(), self.features, self.growth)


@keras.saving.register_keras_serializable(package="tfgan_ct")
class RRDB(layers.Layer):
    """Residual-in-residual dense block: out = x + 0.2 * rdb3(rdb2(rdb1(x)))."""

    def __init__(self, features: int = 64, growth: int = 32, fast: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.features, self.growth, self.fast = features, growth, fast
        block = FastResidualDenseBlock if fast else ResidualDenseBlock
        self.rdb1 = block(features, growth, name="rdb1")
        self.rdb2 = block(features, growth, name="rdb2")
        self.rdb3 = block(features, growth, name="rdb3")

    def call(self, x):
        out = x
        for rdb in (self.rdb1, self.rdb2, self.rdb3):
            out = rdb(out)
        return x + RESIDUAL_SCALE * out

    def get_config(self):
        return {**super().get_config(), "features": self.features, "growth": self.growth, "fast": self.fast}


def build_generator(num_blocks: int = 23, features: int = 64, growth: int = 32, scale: int = 4,
                    channels: int = 1, name: str = "generator", *, fast: bool = True) -> keras.Model:
    """RRDBNet as a functional Keras model: [b, h, w, channels] -> [b, scale*h, scale*w, channels], any h, w.

    Defaults are the paper's (ESRGAN's) sizes; `model.*` in the config sets them.
    `fast`: the dense blocks and the tail in `fast_layers`' forms; False: the plain
    reference layers. Both have the same variable paths and compute the same function.
    """
    if scale not in (2, 4):
        raise ValueError(f"generator scale {scale}: RRDBNet upsamples by 2 or 4")
    lr = keras.Input((None, None, channels), name="lr")
    x = conv(features, "conv_first")(lr)
    trunk = x
    for i in range(num_blocks):
        trunk = RRDB(features, growth, fast=fast, name=f"rrdb{i:02d}")(trunk)
    x = layers.Add(name="long_skip")([x, conv(features, "trunk_conv")(trunk)])
    for i in range(1, scale // 2 + 1):
        if fast:
            x = UpsampleConv2D(features, name=f"up_conv{i}", kernel_initializer=_torch_default())(x)
        else:
            x = conv(features, f"up_conv{i}")(layers.UpSampling2D(2, interpolation="nearest", name=f"up{i}")(x))
        x = layers.LeakyReLU(0.2, name=f"up_act{i}")(x)
    tail_conv = _fast_tail_conv if fast else conv
    x = layers.LeakyReLU(0.2, name="hr_act")(tail_conv(features, "hr_conv")(x))
    sr = tail_conv(channels, "conv_last")(x)
    return keras.Model(lr, sr, name=name)


def _fast_tail_conv(filters: int, name: str) -> HighResConv2D:
    return HighResConv2D(filters, name=name, kernel_initializer=_torch_default(), bias_initializer="zeros")


def flops_per_lr_pixel(num_blocks: int = 23, features: int = 64, growth: int = 32, scale: int = 4,
                       channels: int = 1) -> float:
    """Floating-point operations (2 x multiply-adds) of one forward pass per LR pixel (convolutions)."""
    nf, gc = features, growth
    rdb = sum((nf + i * gc) * gc for i in range(4)) + (nf + 4 * gc) * nf
    lr_convs = channels * nf + num_blocks * 3 * rdb + nf * nf           # first, trunk, trunk_conv
    up_convs = sum(nf * nf * 4 ** i for i in range(1, scale // 2 + 1))  # at 2x (and 4x) resolution
    hr_convs = (nf * nf + nf * channels) * scale ** 2                   # hr_conv, conv_last
    return 2.0 * 9 * (lr_convs + up_convs + hr_convs)

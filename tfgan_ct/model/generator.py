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

The dense blocks and the tail are computed in equivalent, faster forms with the
same variables and results (`ResidualDenseBlock.call`, `UpsampleConv2D`,
`HighResConv2D`; each tested against the straightforward form).

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
        widths = [self.features] + [self.growth] * 4       # channels of x, x1, .., x4
        # conv_k's kernel split by source along its input channels: by_source[k][part].
        # One split per kernel rather than slices: the gradient of a split is one
        # concatenation, that of each slice a zero-filled kernel-sized tensor plus a sum.
        by_source = [tf.split(tf.cast(c.kernel, dtype), widths[:k + 1], axis=2) for k, c in enumerate(convs)]
        biases = [tf.cast(c.bias, dtype) for c in convs]
        sums = [None] * 5                                   # pre-activation of conv1 .. conv5
        source = x
        for part in range(5):
            fused = tf.concat([by_source[k][part] for k in range(part, 5)], axis=-1)
            y = tf.nn.conv2d(source, fused, strides=1, padding="SAME")
            pieces = tf.split(y, [self.growth] * (4 - part) + [self.features], axis=-1)
            for j, piece in zip(range(part, 5), pieces):
                sums[j] = piece if sums[j] is None else sums[j] + piece
            if part < 4:
                source = tf.nn.leaky_relu(sums[part] + biases[part], alpha=0.2)
        return x + RESIDUAL_SCALE * (sums[4] + biases[4])

    def reference_call(self, x):
        """ESRGAN's straightforward dense block (for tests): convs on growing concatenations."""
        outputs = [x]
        for layer in (self.conv1, self.conv2, self.conv3, self.conv4):
            outputs.append(self.act(layer(keras.ops.concatenate(outputs, axis=-1))))
        return x + RESIDUAL_SCALE * self.conv5(keras.ops.concatenate(outputs, axis=-1))

    def get_config(self):
        return {**super().get_config(), "features": self.features, "growth": self.growth}


class _Plain3x3Conv2D(layers.Conv2D):
    """A 3x3 'same' NHWC Conv2D (same variables, same config) whose `call` a subclass
    computes in another form; refuses any other convolution."""

    def __init__(self, filters: int, **kwargs):
        kwargs.setdefault("kernel_size", 3)
        kwargs.setdefault("padding", "same")
        super().__init__(filters, **kwargs)
        if self.kernel_size != (3, 3) or self.padding != "same" or self.strides != (1, 1) \
                or self.dilation_rate != (1, 1) or self.groups != 1 or self.data_format != "channels_last":
            raise ValueError(f"{type(self).__name__} is a plain 3x3 'same' NHWC convolution")


@keras.saving.register_keras_serializable(package="tfgan_ct")
class UpsampleConv2D(_Plain3x3Conv2D):
    """Nearest-neighbour x2 upsampling, then this 3x3 'same' convolution: [b, h, w, c] -> [b, 2h, 2w, filters].

    Same variables (a 3x3 kernel and a bias), same result as ESRGAN's
    `conv(interpolate(x, scale_factor=2, mode='nearest'))`, but computed at the
    input's resolution ("sub-pixel" form): after nearest upsampling, each of the
    four output phases (row parity a, column parity b) sees only the input
    pixels at offsets -1/0 (phase 0) or 0/+1 (phase 1), with two of the three
    kernel taps summed. So one 3x3 convolution of x with the four phase kernels
    side by side (4 x filters outputs), then depth_to_space, gives the same
    output with the same multiply count. TensorFlow's CPU kernels run this wide,
    low-resolution shape about as fast forward and 1.1-2.8x as fast in the
    gradients as the narrow one at 2x resolution (figures in docs/benchmarks.md),
    and the upsampled copy of x is never made.
    """

    def call(self, x):
        kernel = tf.cast(self.kernel, x.dtype)                       # [3, 3, c, filters]
        phases = [k for rows in _phase_kernels(kernel, 0) for k in _phase_kernels(rows, 1)]
        y = tf.nn.conv2d(x, tf.concat(phases, axis=-1), strides=1, padding="SAME")
        y = tf.nn.bias_add(y, tf.tile(tf.cast(self.bias, x.dtype), [4]))
        # channel (2a + b) * filters + f -> pixel (2i + a, 2j + b), channel f
        return tf.nn.depth_to_space(y, 2)

    def compute_output_shape(self, input_shape):
        b, h, w, _ = input_shape
        return b, None if h is None else 2 * h, None if w is None else 2 * w, self.filters


def _phase_kernels(kernel: tf.Tensor, axis: int) -> list[tf.Tensor]:
    """3x3 kernel taps (w0, w1, w2) along `axis` (0 rows, 1 columns) as seen from the
    low-resolution grid after nearest x2 upsampling: phase 0 takes (w0, w1 + w2, 0)
    at offsets (-1, 0, +1), phase 1 takes (0, w0 + w1, w2)."""
    w0, w1, w2 = tf.unstack(kernel, axis=axis)
    zero = tf.zeros_like(w0)
    return [tf.stack([w0, w1 + w2, zero], axis), tf.stack([zero, w0 + w1, w2], axis)]


@keras.saving.register_keras_serializable(package="tfgan_ct")
class HighResConv2D(_Plain3x3Conv2D):
    """3x3 'same' convolution for the full-resolution tail (hr_conv, conv_last), same
    variables and forward pass as Conv2D, with its gradients computed as forward
    convolutions (`_conv3x3_forward_gradients`).

    Why: at 128x128 and 64 channels TensorFlow's CPU kernels for the input and
    filter gradients run at about 50 % and 30 % of the forward kernel's speed,
    and for conv_last (one output channel) at about 10 %; written as forward
    convolutions they run at 1.5-10x their speed (docs/benchmarks.md). The dense
    blocks keep the stock gradients: at low resolution those are as fast. With a
    GPU visible the stock gradients are used (cuDNN's backward kernels need no
    such help, and the transposes here would only cost time).
    """

    def call(self, x):
        kernel = tf.cast(self.kernel, x.dtype)
        if tf.config.list_logical_devices("GPU"):
            y = tf.nn.conv2d(x, kernel, 1, "SAME")
        else:
            y = _conv3x3_forward_gradients(x, kernel)
        return tf.nn.bias_add(y, tf.cast(self.bias, x.dtype))


@tf.custom_gradient
def _conv3x3_forward_gradients(x, kernel):
    """tf.nn.conv2d(x, kernel, 1, 'SAME') (x [b, h, w, c], kernel [3, 3, c, n]) whose
    gradients are forward convolutions (for n = 1, the filter gradient is one product with
    nine shifts of dy)."""
    y = tf.nn.conv2d(x, kernel, 1, "SAME")

    def grad(dy):
        # d/dx: dy correlated with the kernel turned by 180 degrees, in/out channels swapped.
        dx = tf.nn.conv2d(dy, tf.transpose(tf.reverse(kernel, [0, 1]), [0, 1, 3, 2]), 1, "SAME")
        channels, outputs = kernel.shape[2], kernel.shape[3]
        if outputs == 1:
            # d/dw[i, j, c] = sum over pixels of x[., c] times dy shifted by (1 - i, 1 - j) with
            # zero fill: nine shifts of the one-channel dy, then one product with x as
            # [b, pixels, c]; x itself is not copied.
            h, w = tf.shape(x)[1], tf.shape(x)[2]
            dy_padded = tf.pad(dy[..., 0], [[0, 0], [1, 1], [1, 1]])
            shifted = tf.stack([tf.reshape(dy_padded[:, 2 - i:2 - i + h, 2 - j:2 - j + w], [-1, h * w])
                                for i in range(3) for j in range(3)], axis=1)          # [b, 9, pixels]
            dw = tf.einsum("bkp,bpc->kc", shifted, tf.reshape(x, [-1, h * w, channels]))
            dw = tf.reshape(dw, [3, 3, channels, 1])
        else:  # d/dw: a VALID convolution with batch and channels swapped: x's channels
            # become the batch, dy ([h, w, b, n]) the filter; out [c, 3, 3, n]
            padded = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
            dw = tf.nn.conv2d(tf.transpose(padded, [3, 1, 2, 0]), tf.transpose(dy, [1, 2, 0, 3]), 1, "VALID")
            dw = tf.transpose(dw, [1, 2, 0, 3])
        return dx, dw

    return y, grad


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
    for i in range(1, scale // 2 + 1):  # nearest x2 + conv, in one layer (see UpsampleConv2D)
        up_conv = UpsampleConv2D(features, name=f"up_conv{i}", kernel_initializer=_torch_default())
        x = layers.LeakyReLU(0.2, name=f"up_act{i}")(up_conv(x))
    x = layers.LeakyReLU(0.2, name="hr_act")(HighResConv2D(features, name="hr_conv",
                                                           kernel_initializer=_torch_default())(x))
    sr = HighResConv2D(channels, name="conv_last", kernel_initializer=_torch_default())(x)
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

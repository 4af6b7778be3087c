"""Fused CPU forms of the generator's layers: same variables, same results, less time.

- `dense_block_by_source`: a residual dense block with each part of its growing
  concatenation convolved once, by the matching kernel slices of all later convs.
- `UpsampleConv2D`: nearest x2 upsampling + 3x3 conv as one "sub-pixel"
  convolution at the input's resolution, then depth_to_space.
- `HighResConv2D`: a 3x3 conv whose gradients are forward convolutions (on CPU).

Why: TensorFlow's CPU kernels run these shapes faster (figures in
docs/benchmarks.md; README, "Where the project departs from the paper or ESRGAN").
Each form is tested, outputs and gradients, against `generator`'s plain layers.
Tensors are NHWC.
"""
from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers


def dense_block_by_source(x: tf.Tensor, convs, features: int, growth: int) -> tf.Tensor:
    """conv5's output of a residual dense block (before the residual), computed "by source".

    x [b, h, w, features]; convs: the block's five 3x3 'same' Conv2D layers, conv_k
    taking features + (k-1) * growth channels. ESRGAN runs conv_k on the concatenation
    [x, x1, .., x_{k-1}]; a convolution of a concatenation is the sum of the
    convolutions of its parts, so each part is convolved once here, with the
    input-channel slices of all later kernels side by side, and no concatenated copy
    is made. Returns [b, h, w, features].
    """
    dtype = x.dtype
    widths = [features] + [growth] * 4                  # channels of x, x1, .., x4
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
        pieces = tf.split(y, [growth] * (4 - part) + [features], axis=-1)
        for j, piece in zip(range(part, 5), pieces):
            sums[j] = piece if sums[j] is None else sums[j] + piece
        if part < 4:
            source = tf.nn.leaky_relu(sums[part] + biases[part], alpha=0.2)
    return sums[4] + biases[4]


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

    Same variables and result as ESRGAN's `conv(interpolate(x, scale_factor=2,
    mode='nearest'))`, computed at the input's resolution: after nearest
    upsampling, each of the four output phases (row parity a, column parity b)
    sees only the input pixels at offsets -1/0 (phase 0) or 0/+1 (phase 1), with
    two of the three kernel taps summed. So one 3x3 convolution of x with the four
    phase kernels side by side (4 x filters outputs), then depth_to_space, gives the
    same output with the same multiply count, and the upsampled copy is never made.
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
    """3x3 'same' convolution for the full-resolution tail (hr_conv, conv_last): same
    variables and forward pass as Conv2D, gradients computed as forward convolutions.

    Why: at full resolution TensorFlow's CPU kernels for the input and filter
    gradients run far below the forward kernel's speed, worst for one output
    channel. With a GPU visible the stock gradients are used (cuDNN's backward
    kernels need no such help, and the transposes here would only cost time).
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

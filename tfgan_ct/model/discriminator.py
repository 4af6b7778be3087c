"""ESRGAN's VGG-style discriminator for 128x128 patches (BasicSR `VGGStyleDiscriminator`, 128).

    conv0_0 3x3 (c -> 64, bias), conv0_1 4x4 stride 2 (64, no bias) + BN
    then pairs (3x3 stride 1, 4x4 stride 2), no bias, each + BN, at 128, 256, 512, 512
    LeakyReLU(0.2) after every conv; flatten 512 x 4 x 4 -> dense 100 -> LeakyReLU -> dense 1

Input NHWC [b, 128, 128, 1] in [0, 1]; output raw logits [b, 1]. Batch norm
uses PyTorch's momentum (0.1, i.e. Keras 0.9) and epsilon (1e-5). 'same'
padding with a 4x4 stride-2 kernel on even sizes pads one pixel per side,
exactly PyTorch's padding=1.
"""
from __future__ import annotations

import keras
from keras import layers


def build_discriminator(patch_size: int = 128, channels: int = 1, features: int = 64,
                        name: str = "discriminator") -> keras.Model:
    """The VGG128 discriminator; `patch_size` must be 32 * 2**k (128 in the paper)."""
    if patch_size % 32:
        raise ValueError(f"discriminator patch size {patch_size}: must be a multiple of 32")
    hr = keras.Input((patch_size, patch_size, channels), name="hr")
    x = layers.Conv2D(features, 3, padding="same", name="conv0_0")(hr)
    x = layers.LeakyReLU(0.2, name="act0_0")(x)
    x = _conv_bn(x, features, 4, 2, "0_1")
    for stage, mult in enumerate((2, 4, 8, 8), start=1):
        x = _conv_bn(x, features * mult, 3, 1, f"{stage}_0")
        x = _conv_bn(x, features * mult, 4, 2, f"{stage}_1")
    x = layers.Flatten(name="flatten")(x)
    x = layers.LeakyReLU(0.2, name="act_dense1")(layers.Dense(100, name="dense1")(x))
    logits = layers.Dense(1, name="dense2")(x)
    return keras.Model(hr, logits, name=name)


def _conv_bn(x, filters: int, kernel: int, stride: int, tag: str):
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"conv{tag}")(x)
    x = layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"bn{tag}")(x)
    return layers.LeakyReLU(0.2, name=f"act{tag}")(x)

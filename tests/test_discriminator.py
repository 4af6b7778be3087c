import numpy as np
import pytest

from tfgan_ct.model.discriminator import build_discriminator


def test_vgg128_shapes_and_parameters():
    d = build_discriminator(128)
    assert tuple(d(np.zeros((2, 128, 128, 1), "float32")).shape) == (2, 1)
    # Feature maps halve at each 4x4 stride-2 conv, like PyTorch's padding=1: 128 -> 4.
    assert tuple(d.get_layer("act4_1").output.shape) == (None, 4, 4, 512)
    convs = (9 * 1 * 64 + 64) + 16 * 64 * 64 + 9 * 64 * 128 + 16 * 128 * 128 + 9 * 128 * 256 \
        + 16 * 256 * 256 + 9 * 256 * 512 + 16 * 512 * 512 + 9 * 512 * 512 + 16 * 512 * 512
    bn = 2 * (64 + 128 * 2 + 256 * 2 + 512 * 4)  # gamma and beta
    dense = 512 * 4 * 4 * 100 + 100 + 101
    trainable = sum(int(np.prod(v.shape)) for v in d.trainable_weights)
    assert trainable == convs + bn + dense


def test_only_first_conv_has_bias():
    d = build_discriminator(32, features=8)
    conv_biases = [v.path for v in d.weights if v.path.startswith("conv") and v.path.endswith("bias")]
    assert conv_biases == ["conv0_0/bias"]


def test_patch_size_must_fit():
    with pytest.raises(ValueError, match="multiple of 32"):
        build_discriminator(100)

"""Tests for tfgan_ct.data.resize against a naive implementation of the formula."""
import math

import numpy as np
import pytest

from tfgan_ct.data.resize import downscale, imresize, imresize_uint8, upscale

# Keys cubic kernel, a = -0.5, evaluated by hand:
#   |x| <= 1:     1.5|x|^3 - 2.5|x|^2 + 1
#   1 < |x| <= 2: -0.5|x|^3 + 2.5|x|^2 - 4|x| + 2
# 0.125: 1.5/512   - 2.5/64   + 1         = 0.0029296875 - 0.0390625 + 1      =  0.9638671875
# 0.375: 1.5*27/512 - 2.5*9/64 + 1        = 0.0791015625 - 0.3515625 + 1      =  0.7275390625
# 0.625: 1.5*125/512 - 2.5*25/64 + 1      = 0.3662109375 - 0.9765625 + 1      =  0.3896484375
# 0.875: 1.5*343/512 - 2.5*49/64 + 1      = 1.0048828125 - 1.9140625 + 1      =  0.0908203125
# 1.125: -0.5*729/512 + 2.5*81/64 - 4.5 + 2  = -0.7119140625 + 3.1640625 - 2.5 = -0.0478515625
# 1.375: -0.5*1331/512 + 2.5*121/64 - 5.5 + 2 = -1.2998046875 + 4.7265625 - 3.5 = -0.0732421875
# 1.625: -0.5*2197/512 + 2.5*169/64 - 6.5 + 2 = -2.1455078125 + 6.6015625 - 4.5 = -0.0439453125
# 1.875: -0.5*3375/512 + 2.5*225/64 - 7.5 + 2 = -3.2958984375 + 8.7890625 - 5.5 = -0.0068359375
KEYS_BY_HAND = {
    0.125: 0.9638671875,
    0.375: 0.7275390625,
    0.625: 0.3896484375,
    0.875: 0.0908203125,
    1.125: -0.0478515625,
    1.375: -0.0732421875,
    1.625: -0.0439453125,
    1.875: -0.0068359375,
}


def _keys(x):
    x = abs(x)
    if x <= 1:
        return 1.5 * x**3 - 2.5 * x**2 + 1
    if x <= 2:
        return -0.5 * x**3 + 2.5 * x**2 - 4 * x + 2
    return 0.0


def _mirror(j, n):
    """Half-sample symmetric index: ... 1 0 | 0 1 ... n-1 | n-1 n-2 ..."""
    j %= 2 * n
    return j if j < n else 2 * n - 1 - j


def _naive_1d(signal, out_len, scale):
    """Resize a 1-D signal pixel by pixel, straight from the definition."""
    n = len(signal)
    stretch = min(scale, 1.0)  # antialiasing: kernel widened by 1/scale
    support = 2.0 / stretch
    out = np.zeros(out_len)
    for i in range(out_len):
        centre = (i + 0.5) / scale - 0.5  # 0-based input coordinate
        taps = range(math.floor(centre - support), math.ceil(centre + support) + 1)
        weights = [stretch * _keys(stretch * (centre - j)) for j in taps]
        values = [signal[_mirror(j, n)] for j in taps]
        out[i] = np.dot(weights, values) / np.sum(weights)
    return out


def _naive(image, out_shape, scales=None):
    """Separable naive resize; scales default to out/in per dimension."""
    if scales is None:
        scales = [o / n for o, n in zip(out_shape, image.shape)]
    rows = np.stack([_naive_1d(col, out_shape[0], scales[0]) for col in image.T], axis=1)
    return np.stack([_naive_1d(row, out_shape[1], scales[1]) for row in rows])


@pytest.mark.parametrize("shape", [(13, 17), (16, 12), (9, 31)])
@pytest.mark.parametrize("scale", [0.25, 0.5, 2, 4])
def test_matches_naive_reference(shape, scale):
    image = np.random.default_rng(sum(shape)).normal(size=shape)
    out = imresize(image, scale)
    expected_shape = tuple(math.ceil(n * scale) for n in shape)
    assert out.shape == expected_shape
    expected = _naive(image, expected_shape, (scale, scale))  # MATLAB keeps the given scale
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("out_shape", [(5, 40), (40, 5), (7, 3)])
def test_output_shape_with_unequal_scales_matches_naive(out_shape):
    image = np.random.default_rng(1).uniform(-1000, 1000, size=(13, 17))  # HU-like
    out = imresize(image, output_shape=out_shape)
    np.testing.assert_allclose(out, _naive(image, out_shape), rtol=0, atol=1e-9)


def test_constant_image_stays_constant():
    image = np.full((13, 17), 42.5)
    for scale in (0.25, 0.5, 2, 4):
        np.testing.assert_allclose(imresize(image, scale), 42.5, rtol=0, atol=1e-12)


def test_linear_ramp_reproduced_in_interior_when_upscaling():
    ramp = np.tile(np.arange(20, dtype=float), (6, 1))  # value = column index
    out = imresize(ramp, 4)
    centres = (np.arange(80) + 0.5) / 4 - 0.5  # input column seen by each output column
    interior = (centres >= 1) & (centres <= 18)  # all four taps inside the image
    expected = np.broadcast_to(centres[interior], (24, interior.sum()))
    np.testing.assert_allclose(out[:, interior], expected, atol=1e-12)


def test_x4_phase_weights_are_keys_values():
    impulse = np.zeros((12, 1))
    impulse[6, 0] = 1.0
    response = imresize(impulse, 4)[:, 0]  # weight of input row 6 in each output row
    for i in range(12, 36):
        distance = abs((i + 0.5) / 4 - 0.5 - 6)
        assert response[i] == pytest.approx(KEYS_BY_HAND.get(distance, 0.0), abs=1e-15)


def test_phase_weights_sum_to_one():
    for phase in [(0.375, 0.625, 1.375, 1.625), (0.125, 0.875, 1.125, 1.875)]:
        assert sum(KEYS_BY_HAND[d] for d in phase) == pytest.approx(1.0, abs=1e-15)


def test_three_channel_input_is_resized_per_channel():
    image = np.random.default_rng(2).random((13, 17, 3))
    out = imresize(image, 0.5)
    assert out.shape == (7, 9, 3)
    for c in range(3):
        np.testing.assert_allclose(out[..., c], imresize(image[..., c], 0.5), atol=1e-14)


def test_dtype_and_units_are_preserved():
    image = np.random.default_rng(3).integers(0, 256, size=(16, 16), dtype=np.uint8)
    out = imresize(image, 0.25)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, imresize(image.astype(float) / 255, 0.25) * 255, atol=1e-10)


def test_imresize_uint8_rounds_half_away_from_zero_and_clips():
    out = imresize_uint8(np.array([0.5, 1.5, 2.5, 2.49, -3.0, 300.0]))
    assert out.dtype == np.uint8
    assert out.tolist() == [1, 2, 3, 2, 0, 255]


def test_downscale_and_upscale_shapes():
    image = np.zeros((64, 48, 2))
    assert downscale(image, 4).shape == (16, 12, 2)
    assert upscale(np.zeros((16, 12)), 4).shape == (64, 48)
    image = np.random.default_rng(4).random((24, 36))
    np.testing.assert_allclose(downscale(image, 4), imresize(image, 0.25), atol=1e-15)


def test_downscale_rejects_non_multiple_sizes():
    with pytest.raises(ValueError, match=r"multiples of 4, got 13x16"):
        downscale(np.zeros((13, 16)), 4)


def test_bad_arguments():
    with pytest.raises(ValueError):
        imresize(np.zeros((4, 4)))
    with pytest.raises(ValueError):
        imresize(np.zeros((4, 4)), scale=2, output_shape=(8, 8))
    with pytest.raises(ValueError):
        imresize(np.zeros(4), scale=2)


@pytest.mark.parametrize("shape", [(16, 12), (24, 36), (8, 40), (64, 48, 2)])
@pytest.mark.parametrize("factor", [2, 4])
def test_banded_downscale_matches_naive_reference(shape, factor):
    """`downscale` takes a banded shortcut for integer factors; it stays MATLAB-exact."""
    image = np.random.default_rng(5).uniform(-1000, 3000, size=shape)
    out = downscale(image, factor)
    out_shape = (shape[0] // factor, shape[1] // factor)
    planes = image[..., None] if image.ndim == 2 else image
    for c in range(planes.shape[2]):
        got = out if image.ndim == 2 else out[..., c]
        np.testing.assert_allclose(got, _naive(planes[..., c], out_shape), rtol=0, atol=1e-9)
    np.testing.assert_allclose(out, imresize(image, 1 / factor), rtol=0, atol=1e-11)
    ints = image.astype(np.int16)
    np.testing.assert_allclose(downscale(ints, factor), imresize(ints, 1 / factor), rtol=0, atol=1e-11)

import numpy as np
import pytest

from tfgan_ct.model.generator import build_generator, flops_per_lr_pixel


def test_paper_parameter_count():
    # ESRGAN RRDBNet, 23 blocks, 64/32, one channel in and out.
    assert build_generator().count_params() == 16_695_681


@pytest.mark.parametrize("h, w", [(8, 8), (7, 13), (16, 5)])
def test_output_is_four_times_input(h, w):
    g = build_generator(num_blocks=1, features=8, growth=4)
    out = g(np.random.rand(2, h, w, 1).astype("float32"))
    assert tuple(out.shape) == (2, 4 * h, 4 * w, 1)


def test_dense_block_init_is_scaled_he():
    g = build_generator(num_blocks=2, features=64, growth=32)
    kernel = {v.path: v.numpy() for v in g.weights}["rrdb00/rdb1/conv5/kernel"]
    fan_in = 3 * 3 * (64 + 4 * 32)
    assert kernel.std() == pytest.approx(0.1 * np.sqrt(2.0 / fan_in), rel=0.05)
    biases = [v.numpy() for v in g.weights if v.path.endswith("bias")]
    assert all(not b.any() for b in biases)


def test_flops_per_lr_pixel():
    assert flops_per_lr_pixel() == pytest.approx(35.8e6, rel=0.01)


def test_variable_paths_are_unique():
    g = build_generator(num_blocks=2, features=8, growth=4)
    paths = [v.path for v in g.variables]
    assert len(paths) == len(set(paths)) and "rrdb01/rdb3/conv4/kernel" in paths


def test_dense_block_by_source_equals_the_straightforward_block():
    import tensorflow as tf

    from tfgan_ct.model.generator import FastResidualDenseBlock, ResidualDenseBlock

    x = tf.constant(np.random.default_rng(0).normal(size=(2, 9, 7, 16)).astype("float32"))
    fast, plain = FastResidualDenseBlock(16, 8), ResidualDenseBlock(16, 8)
    fast.build(x.shape)
    plain.build(x.shape)
    # Non-zero biases so that their placement is checked too.
    for conv in fast.convs():
        conv.bias.assign(np.random.default_rng(1).normal(size=conv.bias.shape).astype("float32"))
    plain.set_weights(fast.get_weights())
    _same_output_and_gradients(fast, plain, x, fast.trainable_variables, plain.trainable_variables)
    assert [v.path for v in fast.variables][:2] == ["fast_residual_dense_block/conv1/kernel",
                                                    "fast_residual_dense_block/conv1/bias"]


def test_fast_generator_equals_the_plain_one_with_the_same_variables():
    import keras
    import tensorflow as tf

    nets = {}
    for fast in (True, False):
        keras.utils.set_random_seed(3)
        nets[fast] = build_generator(num_blocks=2, features=16, growth=8, fast=fast)
    fast, plain = nets[True], nets[False]
    assert [v.path for v in fast.variables] == [v.path for v in plain.variables]
    for a, b in zip(fast.variables, plain.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    x = tf.constant(np.random.default_rng(0).random((2, 6, 5, 1)).astype("float32"))
    _same_output_and_gradients(fast, plain, x, fast.trainable_variables, plain.trainable_variables)


def _conv_twin(layer, x, rng):
    """A stock keras Conv2D with `layer`'s (randomised, non-zero bias) weights."""
    import keras

    layer.build(x.shape)
    layer.bias.assign(rng.normal(size=layer.bias.shape).astype("float32"))
    twin = keras.layers.Conv2D(layer.filters, 3, padding="same")
    twin.build(x.shape)
    twin.set_weights(layer.get_weights())
    return twin


def _same_output_and_gradients(ours, reference, x, variables_a, variables_b):
    import tensorflow as tf

    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        a, b = ours(x), reference(x)
        loss_a, loss_b = tf.reduce_sum(a * a), tf.reduce_sum(b * b)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5)
    for u, v in zip(tape.gradient(loss_a, [x, *variables_a]), tape.gradient(loss_b, [x, *variables_b])):
        np.testing.assert_allclose(u.numpy(), v.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("h, w", [(5, 7), (8, 8), (1, 3)])
def test_upsample_conv_equals_nearest_upsampling_then_conv(h, w):
    import keras
    import tensorflow as tf

    from tfgan_ct.model.fast_layers import UpsampleConv2D

    rng = np.random.default_rng(h * w)
    x = tf.constant(rng.normal(size=(2, h, w, 6)).astype("float32"))
    layer = UpsampleConv2D(4)
    twin = _conv_twin(layer, x, rng)
    upsample = keras.layers.UpSampling2D(2, interpolation="nearest")
    _same_output_and_gradients(layer, lambda t: twin(upsample(t)), x,
                               layer.trainable_variables, twin.trainable_variables)
    assert tuple(layer(x).shape) == (2, 2 * h, 2 * w, 4)


@pytest.mark.parametrize("filters", [4, 1])  # the two branches of the filter gradient
def test_high_res_conv_equals_conv2d_with_its_gradients(filters):
    import tensorflow as tf

    from tfgan_ct.model.fast_layers import HighResConv2D

    rng = np.random.default_rng(filters)
    x = tf.constant(rng.normal(size=(2, 9, 7, 5)).astype("float32"))
    layer = HighResConv2D(filters)
    twin = _conv_twin(layer, x, rng)
    _same_output_and_gradients(layer, twin, x, layer.trainable_variables, twin.trainable_variables)


def test_custom_layers_refuse_other_convolutions():
    from tfgan_ct.model.fast_layers import HighResConv2D, UpsampleConv2D

    for cls in (HighResConv2D, UpsampleConv2D):
        with pytest.raises(ValueError, match="plain 3x3"):
            cls(4, kernel_size=5)


@pytest.mark.parametrize("fast", [True, False])
def test_tail_keeps_esrgan_variable_paths(fast):
    g = build_generator(num_blocks=1, features=8, growth=4, fast=fast)
    paths = {v.path for v in g.variables}
    assert {"up_conv1/kernel", "up_conv2/bias", "hr_conv/kernel", "conv_last/bias"} <= paths

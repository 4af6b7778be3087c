import numpy as np
import pytest

from tfgan_ct.generator import build_generator, flops_per_lr_pixel


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
    import numpy as np
    import tensorflow as tf

    from tfgan_ct.generator import ResidualDenseBlock

    block = ResidualDenseBlock(16, 8)
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 9, 7, 16)).astype("float32"))
    # Non-zero biases so that their placement is checked too.
    block.build(x.shape)
    for conv in block._convs():
        conv.bias.assign(np.random.default_rng(1).normal(size=conv.bias.shape).astype("float32"))
    np.testing.assert_allclose(block(x).numpy(), block.reference_call(x).numpy(), atol=1e-5)
    with tf.GradientTape(persistent=True) as tape:
        fast, ref = tf.reduce_sum(block(x) ** 2), tf.reduce_sum(block.reference_call(x) ** 2)
    for a, b in zip(tape.gradient(fast, block.trainable_variables), tape.gradient(ref, block.trainable_variables)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4)
    assert [v.path for v in block.variables][:2] == ["residual_dense_block/conv1/kernel",
                                                     "residual_dense_block/conv1/bias"]

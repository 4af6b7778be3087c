import numpy as np
import tensorflow as tf

from tfgan_ct.model import losses
from tfgan_ct.model.vgg import build_feature_extractor


def bce(p, label):
    return -(label * np.log(p) + (1 - label) * np.log(1 - p))


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_ragan_matches_formula():
    real = np.array([[1.5], [0.2], [-0.3]], np.float32)
    fake = np.array([[-1.0], [0.4], [0.1]], np.float32)
    d_real = sigmoid(real - fake.mean())
    d_fake = sigmoid(fake - real.mean())
    expect_d = 0.5 * (bce(d_real, 1) + bce(d_fake, 0))[:, 0]
    expect_g = 0.5 * (bce(d_real, 0) + bce(d_fake, 1))[:, 0]
    np.testing.assert_allclose(losses.ragan_d_per_example(real, fake).numpy(), expect_d, rtol=1e-5)
    np.testing.assert_allclose(losses.ragan_g_per_example(real, fake).numpy(), expect_g, rtol=1e-5)


def test_l1_per_example():
    a = np.zeros((2, 4, 4, 1), np.float32)
    b = np.ones((2, 4, 4, 1), np.float32)
    b[1] *= 3
    np.testing.assert_allclose(losses.l1_per_example(a, b).numpy(), [1.0, 3.0])


def test_vgg_features_are_pre_activation():
    vgg = build_feature_extractor("none")
    x = tf.random.uniform((2, 32, 32, 1), seed=1)
    features = vgg(x)
    assert tuple(features.shape) == (2, 2, 2, 512)
    assert float(tf.reduce_min(features)) < 0  # a ReLU output could not be negative
    assert not vgg.trainable_weights
    p = losses.perceptual_per_example(vgg, x, x).numpy()
    np.testing.assert_allclose(p, [0.0, 0.0])


def test_bad_vgg_weights_setting_is_named(tmp_path):
    import pytest

    from tfgan_ct.model.vgg import FeatureExtractorError

    broken = tmp_path / "vgg.weights.h5"
    broken.write_bytes(b"not an HDF5 file")
    for setting, message in (("imagnet", "use 'imagenet', 'none'"), (str(tmp_path / "absent.h5"), "no such file"),
                             (str(broken), "cannot load VGG19 weights")):
        with pytest.raises(FeatureExtractorError, match=message):
            build_feature_extractor(setting)

"""VGG19 feature extractor for the perceptual loss: conv5_4 *before* its ReLU (as ESRGAN).

Keras' VGG19 folds the ReLU into `block5_conv4`, so the extractor ends in a linear
copy of that layer. Input NHWC [b, h, w, 1] in [0, 1]: replicated to three channels,
x 255, Caffe ImageNet means subtracted (Keras' weights; ESRGAN uses torchvision's,
see the README's deviation notes). Weights (`model.vgg_weights`): "imagenet"
(downloaded once, cached in ~/.keras), the path of a local VGG19 `.h5` file, or
"none": random weights, for tests only, said loudly in the log.
"""
from __future__ import annotations

import logging
from pathlib import Path

import keras
from keras import layers

from tfgan_ct.errors import TfganError

log = logging.getLogger("tfgan_ct.model.vgg")

# Caffe VGG means (BGR); grey input makes the channel order irrelevant.
_MEAN = (103.939, 116.779, 123.68)


class FeatureExtractorError(TfganError, ValueError):
    """`model.vgg_weights` names weights that cannot be had (a typo, a missing file, no download)."""


def check_weights_setting(weights: str) -> None:
    """Refuse a `model.vgg_weights` that is not 'imagenet', 'none' or an existing .h5 file."""
    if weights in ("imagenet", "none"):
        return
    if not weights.endswith((".h5", ".hdf5", ".keras")):
        raise FeatureExtractorError(f"model.vgg_weights={weights!r}: use 'imagenet', 'none' (tests only) or "
                                    f"the path of a VGG19 .weights.h5 / .h5 file")
    if not Path(weights).is_file():
        raise FeatureExtractorError(f"model.vgg_weights={weights}: no such file")


def build_feature_extractor(weights: str = "imagenet", name: str = "vgg19_conv5_4") -> keras.Model:
    """Frozen model: [b, h, w, 1] in [0, 1] -> conv5_4 pre-activation features [b, h/16, w/16, 512]."""
    check_weights_setting(weights)
    if weights == "none":
        log.warning("VGG19 has RANDOM weights (model.vgg_weights=none): the perceptual loss is "
                    "meaningless; use this only for tests")
        vgg = keras.applications.VGG19(include_top=False, weights=None, input_shape=(None, None, 3))
    elif weights == "imagenet":
        try:
            vgg = keras.applications.VGG19(include_top=False, weights="imagenet", input_shape=(None, None, 3))
        except Exception as exc:  # Keras raises a bare Exception when the download fails
            raise FeatureExtractorError(
                f"model.vgg_weights=imagenet: cannot get Keras' VGG19 ImageNet weights ({exc}); on a machine "
                f"without internet access, copy vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5 from one "
                f"with it and set model.vgg_weights to its path") from None
    else:
        vgg = keras.applications.VGG19(include_top=False, weights=None, input_shape=(None, None, 3))
        try:
            vgg.load_weights(weights)
        except (OSError, ValueError) as exc:
            raise FeatureExtractorError(f"model.vgg_weights={weights}: cannot load VGG19 weights ({exc})") from None
        log.info("VGG19 weights from %s", weights)
    grey = keras.Input((None, None, 1), name="image")
    x = layers.Concatenate(name="to_rgb")([grey, grey, grey])
    x = layers.Rescaling(255.0, offset=0.0, name="to_255")(x)
    x = layers.Normalization(mean=list(_MEAN), variance=[1.0, 1.0, 1.0], name="imagenet_mean")(x)
    for layer in vgg.layers[1:]:
        if layer.name == "block5_conv4":
            break
        x = layer(x)
    last = vgg.get_layer("block5_conv4")
    pre = layers.Conv2D(512, 3, padding="same", activation=None, name="block5_conv4_preact")
    features = pre(x)
    pre.set_weights(last.get_weights())
    model = keras.Model(grey, features, name=name)
    model.trainable = False
    return model

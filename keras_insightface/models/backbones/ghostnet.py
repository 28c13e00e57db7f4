"""GhostNet backbone (Han et al. 2020, "GhostNet: More Features from Cheap Operations"), width 1.3 as upstream.

Ghost module: a 1x1 conv makes half the channels, a cheap depthwise 3x3 conv makes the other half. The
backbone ends with the 1x1 conv to 960 * width channels (no pooling / classifier).
"""

import math

import keras

from keras_insightface.models.backbones import blocks

# (kernel, expansion channels, output channels, SE ratio, stride) per ghost bottleneck, as in the paper.
GHOSTNET_CONFIG = (
    (3, 16, 16, 0, 1),
    (3, 48, 24, 0, 2),
    (3, 72, 24, 0, 1),
    (5, 72, 40, 0.25, 2),
    (5, 120, 40, 0.25, 1),
    (3, 240, 80, 0, 2),
    (3, 200, 80, 0, 1),
    (3, 184, 80, 0, 1),
    (3, 184, 80, 0, 1),
    (3, 480, 112, 0.25, 1),
    (3, 672, 112, 0.25, 1),
    (5, 672, 160, 0.25, 2),
    (5, 960, 160, 0, 1),
    (5, 960, 160, 0.25, 1),
    (5, 960, 160, 0, 1),
    (5, 960, 160, 0.25, 1),
)


def make_divisible(value, divisor=4, min_value=None):
    """Round ``value`` to the nearest multiple of ``divisor``, never more than 10% below it (MobileNet rule)."""
    min_value = min_value or divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return new_value + divisor if new_value < 0.9 * value else new_value


def _dw_bn(inputs, kernel_size, strides, name):
    nn = keras.layers.DepthwiseConv2D(kernel_size, strides=strides, padding="same", use_bias=False, name=name + "dw")(
        inputs
    )
    return keras.layers.BatchNormalization(name=name + "dw_bn")(nn)


def ghost_module(inputs, filters, use_relu, name):
    """Half the ``filters`` from a 1x1 conv, the other half from a depthwise 3x3 conv on them, concatenated."""
    primary_filters = math.ceil(filters / 2)
    primary = blocks.conv_bn(inputs, primary_filters, 1, name=name + "primary_")
    if use_relu:
        primary = keras.layers.ReLU(name=name + "primary_relu")(primary)
    cheap = _dw_bn(primary, 3, 1, name=name + "cheap_")
    if use_relu:
        cheap = keras.layers.ReLU(name=name + "cheap_relu")(cheap)
    return keras.layers.Concatenate(name=name + "concat")([primary, cheap])


def ghost_bottleneck(inputs, kernel_size, expansion, filters, se_ratio, strides, name):
    """Ghost module (ReLU) -> [strided depthwise conv] -> [SE] -> linear ghost module, plus shortcut."""
    nn = ghost_module(inputs, expansion, use_relu=True, name=name + "ghost1_")
    if strides > 1:
        nn = _dw_bn(nn, kernel_size, strides, name=name + "down_")
    if se_ratio > 0:
        reduced = make_divisible(expansion * se_ratio, 4)
        nn = blocks.se_block(nn, activation="relu", gate="hard_sigmoid", reduced_filters=reduced, name=name + "se_")
    nn = ghost_module(nn, filters, use_relu=False, name=name + "ghost2_")
    if strides == 1 and inputs.shape[-1] == filters:
        shortcut = inputs
    else:
        shortcut = _dw_bn(inputs, kernel_size, strides, name=name + "shortcut_")
        shortcut = blocks.conv_bn(shortcut, filters, 1, name=name + "shortcut_")
    return keras.layers.Add(name=name + "add")([shortcut, nn])


def ghostnet(input_shape=(112, 112, 3), width=1.3, name="ghostnet"):
    """Build GhostNet-``width`` without its classifier; output (H/32, W/32, make_divisible(960 * width))."""
    inputs = keras.layers.Input(shape=input_shape)
    nn = blocks.conv_bn(inputs, make_divisible(16 * width), 3, strides=2, name="stem_")
    nn = keras.layers.ReLU(name="stem_relu")(nn)
    for idx, (kernel_size, expansion, filters, se_ratio, strides) in enumerate(GHOSTNET_CONFIG):
        nn = ghost_bottleneck(
            nn,
            kernel_size,
            make_divisible(expansion * width),
            make_divisible(filters * width),
            se_ratio,
            strides,
            name=f"block{idx + 1}_",
        )
    nn = blocks.conv_bn(nn, make_divisible(960 * width), 1, name="features_")
    nn = keras.layers.ReLU(name="features_relu")(nn)
    return keras.models.Model(inputs, nn, name=name)

"""Insightface IResNet backbones (``iresnet.py`` of arcface_torch / MXNet ``fresnet``), optional SE blocks.

Improved residual block: BN -> conv3x3 -> BN -> PReLU -> conv3x3 (stride) -> BN [-> SE], added to the
shortcut (conv1x1 + BN when the shape changes); no activation after the add, no conv bias. The stem is a
stride-1 conv3x3, so 112x112 inputs give a 7x7x512 feature map.
"""

import keras

from backbones import blocks

IRESNET_DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 101: (3, 4, 23, 3)}
IRESNET_FILTERS = (64, 128, 256, 512)
IRESNET_BN_EPSILON = 1e-5


def _batch_norm(name):
    return keras.layers.BatchNormalization(epsilon=IRESNET_BN_EPSILON, name=name)


def basic_block(inputs, filters, strides, use_se, name):
    """Insightface ``IBasicBlock``; returns ``shortcut + residual`` through an ``Add`` layer."""
    nn = _batch_norm(name + "1_bn")(inputs)
    nn = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=name + "1_conv")(nn)
    nn = _batch_norm(name + "2_bn")(nn)
    nn = keras.layers.PReLU(shared_axes=[1, 2], name=name + "2_prelu")(nn)
    nn = keras.layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, name=name + "2_conv")(nn)
    nn = _batch_norm(name + "3_bn")(nn)
    if use_se:
        nn = blocks.se_block(nn, reduction=16, name=name + "se_")
    if strides != 1 or inputs.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, strides=strides, use_bias=False, name=name + "shortcut_conv")(inputs)
        shortcut = _batch_norm(name + "shortcut_bn")(shortcut)
    else:
        shortcut = inputs
    return keras.layers.Add(name=name + "add")([shortcut, nn])


def iresnet(depth, input_shape=(112, 112, 3), use_se=False, name=None):
    """Build IResNet-``depth`` (18 / 34 / 50 / 100 / 101) up to the last stage; output (H/16, W/16, 512)."""
    if depth not in IRESNET_DEPTHS:
        raise ValueError(f"IResNet depth must be one of {sorted(IRESNET_DEPTHS)}, got {depth}")
    name = name or "{}r{}".format("se_" if use_se else "", depth)
    inputs = keras.layers.Input(shape=input_shape)
    nn = keras.layers.Conv2D(64, 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    nn = _batch_norm("stem_bn")(nn)
    nn = keras.layers.PReLU(shared_axes=[1, 2], name="stem_prelu")(nn)
    for stage_id, (repeats, filters) in enumerate(zip(IRESNET_DEPTHS[depth], IRESNET_FILTERS)):
        for block_id in range(repeats):
            strides = 2 if block_id == 0 else 1
            nn = basic_block(nn, filters, strides, use_se, name=f"stack{stage_id + 1}_block{block_id + 1}_")
    return keras.models.Model(inputs, nn, name=name)

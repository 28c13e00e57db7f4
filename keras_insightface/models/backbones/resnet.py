"""Insightface IResNet backbones (``iresnet.py`` of arcface_torch / MXNet ``fresnet``), optional SE blocks.

Improved residual block: BN -> conv3x3 -> BN -> PReLU -> conv3x3 (stride) -> BN [-> SE], added to the
shortcut (conv1x1 + BN when the shape changes); no activation after the add, no conv bias. The stem is a
stride-1 conv3x3, so 112x112 inputs give a 7x7x512 feature map.
"""

import keras

from keras_insightface.models.backbones import blocks

IRESNET_DEPTHS = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    101: (3, 4, 23, 3),
    200: (6, 26, 60, 6),
}
IRESNET_FILTERS = (64, 128, 256, 512)
IRESNET_BN_EPSILON = 1e-5


def _batch_norm(name):
    return keras.layers.BatchNormalization(epsilon=IRESNET_BN_EPSILON, name=name)


def basic_block(inputs, filters, strides, use_se, name, symmetric_padding=False):
    """Insightface ``IBasicBlock``; returns ``shortcut + residual`` through an ``Add`` layer."""
    nn = _batch_norm(name + "1_bn")(inputs)
    nn = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=name + "1_conv")(nn)
    nn = _batch_norm(name + "2_bn")(nn)
    nn = keras.layers.PReLU(shared_axes=[1, 2], name=name + "2_prelu")(nn)
    nn, padding = blocks.conv_padding(nn, 3, strides, symmetric_padding, name=name + "2_")
    nn = keras.layers.Conv2D(filters, 3, strides=strides, padding=padding, use_bias=False, name=name + "2_conv")(nn)
    nn = _batch_norm(name + "3_bn")(nn)
    if use_se:
        nn = blocks.se_block(nn, reduction=16, name=name + "se_")
    if strides != 1 or inputs.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, strides=strides, use_bias=False, name=name + "shortcut_conv")(inputs)
        shortcut = _batch_norm(name + "shortcut_bn")(shortcut)
    else:
        shortcut = inputs
    return keras.layers.Add(name=name + "add")([shortcut, nn])


def iresnet(
    depth,
    input_shape=(112, 112, 3),
    use_se=False,
    name=None,
    blocks_per_stage=None,
    filters=IRESNET_FILTERS,
    symmetric_padding=False,
):
    """Build IResNet-``depth`` (a key of ``IRESNET_DEPTHS``) up to the last stage; output (H/16, W/16, filters[-1]).

    ``blocks_per_stage`` and ``filters`` (one per stage; the stem has ``filters[0]``) build other sizes, e.g. the
    small networks of tests; ``symmetric_padding`` pads the strided convolutions as PyTorch and MXNet do, which
    networks trained there need (``blocks.conv_padding``).
    """
    if blocks_per_stage is None and depth not in IRESNET_DEPTHS:
        raise ValueError(f"IResNet depth must be one of {sorted(IRESNET_DEPTHS)}, got {depth}")
    blocks_per_stage = blocks_per_stage or IRESNET_DEPTHS[depth]
    if len(blocks_per_stage) != len(filters):
        raise ValueError(f"{len(blocks_per_stage)} stages of blocks for {len(filters)} stage widths")
    name = name or "{}r{}".format("se_" if use_se else "", depth)
    inputs = keras.layers.Input(shape=input_shape)
    nn = keras.layers.Conv2D(filters[0], 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    nn = _batch_norm("stem_bn")(nn)
    nn = keras.layers.PReLU(shared_axes=[1, 2], name="stem_prelu")(nn)
    for stage_id, (repeats, stage_filters) in enumerate(zip(blocks_per_stage, filters)):
        for block_id in range(repeats):
            strides = 2 if block_id == 0 else 1
            block_name = f"stack{stage_id + 1}_block{block_id + 1}_"
            nn = basic_block(nn, stage_filters, strides, use_se, block_name, symmetric_padding)
    return keras.models.Model(inputs, nn, name=name)

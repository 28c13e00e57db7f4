"""MobileFaceNet and SE-MobileFaceNet backbones (Chen et al. 2018, insightface ``fmobilefacenet``).

The backbone stops after the 1x1 conv to 512 channels; the GDC / E / GAP head is added by
``models.buildin_models``.
"""

import keras

from backbones import blocks

# (expansion, output channels, repeats, first stride) of the inverted-residual stages.
MOBILE_FACENET_STAGES = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))


def bottleneck(inputs, filters, expansion, strides, use_se, name):
    """Inverted residual: 1x1 expand + PReLU, 3x3 depthwise + PReLU, linear 1x1 project, [SE], [residual add]."""
    expanded = inputs.shape[-1] * expansion
    nn = blocks.conv_bn_prelu(inputs, expanded, 1, name=name + "expand_")
    nn = keras.layers.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False, name=name + "dw_conv")(nn)
    nn = keras.layers.BatchNormalization(name=name + "dw_bn")(nn)
    nn = keras.layers.PReLU(shared_axes=[1, 2], name=name + "dw_prelu")(nn)
    nn = keras.layers.Conv2D(filters, 1, use_bias=False, name=name + "project_conv")(nn)
    nn = keras.layers.BatchNormalization(name=name + "project_bn")(nn)
    if use_se:
        nn = blocks.se_block(nn, reduction=16, name=name + "se_")
    if strides == 1 and inputs.shape[-1] == filters:
        nn = keras.layers.Add(name=name + "add")([inputs, nn])
    return nn


def mobile_facenet(input_shape=(112, 112, 3), use_se=False, name=None):
    """Build the MobileFaceNet feature extractor: output is (H/16, W/16, 512) after conv + BN + PReLU."""
    name = name or ("se_mobilefacenet" if use_se else "mobilefacenet")
    inputs = keras.layers.Input(shape=input_shape)
    nn = blocks.conv_bn_prelu(inputs, 64, 3, strides=2, name="stem_")
    nn = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="stem_dw_conv")(nn)
    nn = keras.layers.BatchNormalization(name="stem_dw_bn")(nn)
    nn = keras.layers.PReLU(shared_axes=[1, 2], name="stem_dw_prelu")(nn)
    for stage_id, (expansion, filters, repeats, first_strides) in enumerate(MOBILE_FACENET_STAGES):
        for block_id in range(repeats):
            strides = first_strides if block_id == 0 else 1
            block_name = f"stack{stage_id + 1}_block{block_id + 1}_"
            nn = bottleneck(nn, filters, expansion, strides, use_se, name=block_name)
    nn = blocks.conv_bn_prelu(nn, 512, 1, name="features_")
    return keras.models.Model(inputs, nn, name=name)

"""MobileFaceNet backbones: the classic one (Chen et al. 2018, insightface ``fmobilefacenet``), SE-MobileFaceNet, and
arcface_torch's wider ``mbf`` / ``mbf_large`` (``mbf``), all from one builder.

The backbone stops after the 1x1 conv to ``output_width`` channels; the GDC / E / GAP head is added by
``models.buildin_models``.
"""

import keras

from keras_insightface.models.backbones import blocks

# (hidden channels of each block, output channels, blocks, stride of the first block) of the inverted-residual stacks.
MOBILE_FACENET_STAGES = ((128, 64, 5, 2), (256, 128, 1, 2), (256, 128, 6, 1), (512, 128, 1, 2), (256, 128, 2, 1))
STEM_PREFIXES = {"depthwise": "stem_dw_", "separable": "stem_sep_"}  # the second stem conv's kinds, their layer names
STEM_CONVS = tuple(STEM_PREFIXES)  # or an int: a grouped 3x3 conv of that many groups; or None: no second conv


def bottleneck(inputs, filters, hidden, strides, use_se, residual, name, symmetric_padding=False):
    """Inverted residual: 1x1 expand to ``hidden`` + PReLU, 3x3 depthwise + PReLU, linear 1x1 project, [SE],
    [residual add]."""
    nn = blocks.conv_bn_prelu(inputs, hidden, 1, name=name + "expand_")
    nn, padding = blocks.conv_padding(nn, 3, strides, symmetric_padding, name=name + "dw_")
    nn = keras.layers.DepthwiseConv2D(3, strides=strides, padding=padding, use_bias=False, name=name + "dw_conv")(nn)
    nn = keras.layers.BatchNormalization(name=name + "dw_bn")(nn)
    nn = keras.layers.PReLU(shared_axes=[1, 2], name=name + "dw_prelu")(nn)
    nn = keras.layers.Conv2D(filters, 1, use_bias=False, name=name + "project_conv")(nn)
    nn = keras.layers.BatchNormalization(name=name + "project_bn")(nn)
    if use_se:
        nn = blocks.se_block(nn, reduction=16, name=name + "se_")
    if residual:
        nn = keras.layers.Add(name=name + "add")([inputs, nn])
    return nn


def _stem(inputs, width, stem_conv, symmetric_padding):
    """Strided 3x3 conv, then the second 3x3 conv of kind ``stem_conv`` (see ``STEM_CONVS``), each with BN + PReLU."""
    nn = blocks.conv_bn_prelu(inputs, width, 3, strides=2, symmetric_padding=symmetric_padding, name="stem_")
    if stem_conv is None:
        return nn
    if isinstance(stem_conv, int) and not isinstance(stem_conv, bool):
        return blocks.conv_bn_prelu(nn, width, 3, groups=stem_conv, name="stem_group_")
    if stem_conv not in STEM_CONVS:
        raise ValueError(f"stem_conv must be one of {STEM_CONVS}, a number of groups or None, got {stem_conv!r}")
    prefix = STEM_PREFIXES[stem_conv]
    if stem_conv == "separable":
        nn = keras.layers.SeparableConv2D(width, 3, padding="same", use_bias=False, name=prefix + "conv")(nn)
    else:
        nn = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name=prefix + "conv")(nn)
    nn = keras.layers.BatchNormalization(name=prefix + "bn")(nn)
    return keras.layers.PReLU(shared_axes=[1, 2], name=prefix + "prelu")(nn)


def mobile_facenet(
    input_shape=(112, 112, 3),
    use_se=False,
    name=None,
    stem_width=64,
    stem_conv="depthwise",
    stages=MOBILE_FACENET_STAGES,
    first_block_residual=True,
    output_width=512,
    symmetric_padding=False,
):
    """Build a MobileFaceNet feature extractor: output (H/16, W/16, ``output_width``) after conv + BN + PReLU.

    ``stages`` lists the inverted-residual stacks (``MOBILE_FACENET_STAGES``); a block adds its input when its stride
    is 1 and its width unchanged (for the first block of a stack only with ``first_block_residual``, which
    Keras_insightface's MobileFaceNet leaves off). ``output_width=None`` ends at the last stack.
    ``symmetric_padding`` pads strided convolutions as PyTorch does (``blocks.conv_padding``).
    """
    name = name or ("se_mobilefacenet" if use_se else "mobilefacenet")
    inputs = keras.layers.Input(shape=input_shape)
    nn = _stem(inputs, stem_width, stem_conv, symmetric_padding)
    for stage_id, (hidden, filters, repeats, first_strides) in enumerate(stages):
        for block_id in range(repeats):
            strides = first_strides if block_id == 0 else 1
            residual = strides == 1 and nn.shape[-1] == filters and (block_id > 0 or first_block_residual)
            block_name = f"stack{stage_id + 1}_block{block_id + 1}_"
            nn = bottleneck(nn, filters, hidden, strides, use_se, residual, block_name, symmetric_padding)
    if output_width:
        nn = blocks.conv_bn_prelu(nn, output_width, 1, name="features_")
    return keras.models.Model(inputs, nn, name=name)


def mbf_stages(blocks_per_stage=(1, 4, 6, 2), scale=2):
    """The stacks of arcface_torch's MobileFaceNet: each stage is a strided block without residual, then
    residual blocks; the hidden widths (128, 256, 512 / 256) do not grow with ``scale``. A first stage of more than
    one block is a stack at the stem width (otherwise the stem's grouped conv stands for it)."""
    stages = [(128, 64 * scale, blocks_per_stage[0], 1)] if blocks_per_stage[0] > 1 else []
    stage_widths = ((128, 128, 64 * scale), (256, 256, 128 * scale), (512, 256, 128 * scale))
    for (down_hidden, hidden, width), repeats in zip(stage_widths, blocks_per_stage[1:]):
        stages += [(down_hidden, width, 1, 2), (hidden, width, repeats, 1)]
    return tuple(stages)


def mbf(input_shape=(112, 112, 3), blocks_per_stage=(1, 4, 6, 2), scale=2, name="mbf", **kwargs):
    """arcface_torch's MobileFaceNet (``mbf``; ``mbf_large`` is ``blocks_per_stage=(2, 8, 12, 4), scale=4``): stem
    width ``64 * scale``, a grouped stem conv of 64 groups, wider stacks (``mbf_stages``), 512 output channels."""
    stem_conv = 64 if blocks_per_stage[0] == 1 else None
    stages = mbf_stages(blocks_per_stage, scale)
    return mobile_facenet(input_shape, name=name, stem_width=64 * scale, stem_conv=stem_conv, stages=stages, **kwargs)

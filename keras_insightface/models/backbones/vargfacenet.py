"""VarGFaceNet backbone (Yan et al. 2019, "VarGFaceNet: An Efficient Variable Group Convolutional Neural
Network for Lightweight Face Recognition").

Variable group convolution: grouped convs with a fixed group size of 8 channels. Stem conv3x3 + a stride-2
head block, three stages of [3, 7, 4] blocks with [64, 128, 256] channels (the first block of each stage
halves the resolution and merges two branches), then a 1x1 conv to 1024 channels and a variable group conv
over the whole feature map. Output (1, 1, 1024); the embedding head is added by ``models.buildin_models``.
"""

import keras

GROUP_SIZE = 8
VARGFACENET_BLOCKS = (3, 7, 4)
VARGFACENET_FILTERS = (64, 128, 256)


def _bn(inputs, name):
    return keras.layers.BatchNormalization(epsilon=1e-5, name=name + "bn")(inputs)


def _prelu(inputs, name):
    return keras.layers.PReLU(shared_axes=[1, 2], name=name + "prelu")(inputs)


def separable_conv(inputs, hidden_ratio, filters, strides=1, name=""):
    """Variable group conv3x3 (groups of 8 input channels, ``hidden_ratio`` x wider) + BN + PReLU, then a
    pointwise conv to ``filters`` + BN (no activation)."""
    in_filters = inputs.shape[-1]
    nn = keras.layers.Conv2D(
        int(in_filters * hidden_ratio),
        3,
        strides=strides,
        padding="same",
        groups=in_filters // GROUP_SIZE,
        use_bias=False,
        name=name + "1_conv",
    )(inputs)
    nn = _prelu(_bn(nn, name + "1_"), name + "1_")
    nn = keras.layers.Conv2D(filters, 1, use_bias=False, name=name + "2_conv")(nn)
    return _bn(nn, name + "2_")


def varg_block(inputs, filters, strides=1, downsample=False, hidden_ratio=2, name=""):
    """Two separable convs plus shortcut; a ``downsample`` block sums two strided branches and uses a
    separable conv shortcut."""
    if downsample:
        shortcut = separable_conv(inputs, hidden_ratio, filters, strides, name=name + "shortcut_")
        branch_1 = separable_conv(inputs, hidden_ratio, filters, strides, name=name + "sep1_1_")
        branch_2 = separable_conv(inputs, hidden_ratio, filters, strides, name=name + "sep1_2_")
        nn = keras.layers.Add(name=name + "merge")([branch_1, branch_2])
    else:
        shortcut = inputs
        nn = separable_conv(inputs, hidden_ratio, filters, strides, name=name + "sep1_")
    nn = _prelu(nn, name + "sep1_")
    nn = separable_conv(nn, hidden_ratio, filters, 1, name=name + "sep2_")
    nn = keras.layers.Add(name=name + "add")([shortcut, nn])
    return _prelu(nn, name + "out_")


def vargfacenet(input_shape=(112, 112, 3), stem_width=32, output_filters=1024, name="vargfacenet"):
    """Build VarGFaceNet up to its variable group conv embedding layer."""
    inputs = keras.layers.Input(shape=input_shape)
    nn = keras.layers.Conv2D(stem_width, 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    nn = _prelu(_bn(nn, "stem_"), "stem_")
    nn = varg_block(nn, stem_width, strides=2, downsample=True, hidden_ratio=1, name="head_")
    for stage_id, (repeats, filters) in enumerate(zip(VARGFACENET_BLOCKS, VARGFACENET_FILTERS)):
        for block_id in range(repeats):
            nn = varg_block(
                nn,
                filters,
                strides=2 if block_id == 0 else 1,
                downsample=block_id == 0,
                name=f"stack{stage_id + 1}_block{block_id + 1}_",
            )
    nn = keras.layers.Conv2D(output_filters, 1, use_bias=False, name="features_1_conv")(nn)
    nn = _prelu(_bn(nn, "features_1_"), "features_1_")
    kernel_size = (int(nn.shape[1]), int(nn.shape[2]))
    nn = keras.layers.Conv2D(
        output_filters, kernel_size, groups=output_filters // GROUP_SIZE, use_bias=False, name="features_2_conv"
    )(nn)
    nn = _bn(nn, "features_2_")
    return keras.models.Model(inputs, nn, name=name)

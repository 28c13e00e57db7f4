"""ResNeSt-50 / 101 backbones (Zhang et al. 2020, "ResNeSt: Split-Attention Networks").

Settings of the published models: radix 2, cardinality 1, bottleneck width 64, deep stem (stem width 32 for
ResNeSt-50, 64 for ResNeSt-101), average-pool downsampling in the block (``avd``) and in the shortcut
(``avg_down``). The backbone ends after the last stage (2048 channels).
"""

import keras

RESNEST_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
RESNEST_STEM_WIDTH = {50: 32, 101: 64}
RESNEST_FILTERS = (64, 128, 256, 512)
EXPANSION = 4


@keras.saving.register_keras_serializable(package="insightface")
class SplitSum(keras.layers.Layer):
    """Sum the ``radix`` equal channel splits of the input: (..., radix * C) -> (..., C)."""

    def __init__(self, radix=2, **kwargs):
        super().__init__(**kwargs)
        self.radix = radix

    def call(self, inputs):
        splits = keras.ops.split(inputs, self.radix, axis=-1)
        return sum(splits[1:], splits[0])

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (input_shape[-1] // self.radix,)

    def get_config(self):
        return {**super().get_config(), "radix": self.radix}


@keras.saving.register_keras_serializable(package="insightface")
class RSoftmax(keras.layers.Layer):
    """Softmax across the ``radix`` channel splits (cardinality 1): each channel's attention weights over the
    splits sum to one. Input and output (..., radix * C)."""

    def __init__(self, radix=2, **kwargs):
        super().__init__(**kwargs)
        self.radix = radix

    def call(self, inputs):
        stacked = keras.ops.stack(keras.ops.split(inputs, self.radix, axis=-1), axis=-2)
        weights = keras.ops.softmax(stacked, axis=-2)
        return keras.ops.concatenate(keras.ops.unstack(weights, axis=-2), axis=-1)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "radix": self.radix}


def _conv_bn_relu(inputs, filters, kernel_size, strides=1, groups=1, name=""):
    nn = keras.layers.Conv2D(
        filters, kernel_size, strides=strides, padding="same", groups=groups, use_bias=False, name=name + "conv"
    )(inputs)
    nn = keras.layers.BatchNormalization(epsilon=1e-5, name=name + "bn")(nn)
    return keras.layers.ReLU(name=name + "relu")(nn)


def split_attention_conv(inputs, filters, radix=2, reduction=4, name=""):
    """3x3 conv to ``radix * filters`` channels (``radix`` groups), then attention-weighted sum of the splits."""
    nn = _conv_bn_relu(inputs, filters * radix, 3, groups=radix, name=name)
    gap = SplitSum(radix, name=name + "gap_sum")(nn)
    gap = keras.layers.GlobalAveragePooling2D(keepdims=True, name=name + "gap")(gap)
    inter_filters = max(inputs.shape[-1] * radix // reduction, 32)
    att = keras.layers.Conv2D(inter_filters, 1, name=name + "fc1")(gap)
    att = keras.layers.BatchNormalization(epsilon=1e-5, name=name + "fc1_bn")(att)
    att = keras.layers.ReLU(name=name + "fc1_relu")(att)
    att = keras.layers.Conv2D(filters * radix, 1, name=name + "fc2")(att)
    att = RSoftmax(radix, name=name + "rsoftmax")(att)
    nn = keras.layers.Multiply(name=name + "attend")([nn, att])
    return SplitSum(radix, name=name + "out")(nn)


def bottleneck(inputs, filters, strides, name):
    """1x1 conv -> split-attention 3x3 -> [3x3 average pool stride] -> 1x1 conv to 4x, plus shortcut, ReLU."""
    nn = _conv_bn_relu(inputs, filters, 1, name=name + "1_")
    nn = split_attention_conv(nn, filters, name=name + "2_")
    if strides > 1:
        nn = keras.layers.AveragePooling2D(3, strides=strides, padding="same", name=name + "avd")(nn)
    nn = keras.layers.Conv2D(filters * EXPANSION, 1, use_bias=False, name=name + "3_conv")(nn)
    nn = keras.layers.BatchNormalization(epsilon=1e-5, name=name + "3_bn")(nn)
    shortcut = inputs
    if strides > 1 or inputs.shape[-1] != filters * EXPANSION:
        if strides > 1:
            shortcut = keras.layers.AveragePooling2D(strides, strides=strides, padding="same", name=name + "down_pool")(
                shortcut
            )
        shortcut = keras.layers.Conv2D(filters * EXPANSION, 1, use_bias=False, name=name + "down_conv")(shortcut)
        shortcut = keras.layers.BatchNormalization(epsilon=1e-5, name=name + "down_bn")(shortcut)
    nn = keras.layers.Add(name=name + "add")([shortcut, nn])
    return keras.layers.ReLU(name=name + "out")(nn)


def resnest(depth, input_shape=(112, 112, 3), name=None):
    """Build ResNeSt-``depth`` (50 / 101) without the classifier; output (H/32, W/32, 2048)."""
    if depth not in RESNEST_DEPTHS:
        raise ValueError(f"ResNeSt depth must be one of {sorted(RESNEST_DEPTHS)}, got {depth}")
    stem_width = RESNEST_STEM_WIDTH[depth]
    inputs = keras.layers.Input(shape=input_shape)
    nn = _conv_bn_relu(inputs, stem_width, 3, strides=2, name="stem_1_")
    nn = _conv_bn_relu(nn, stem_width, 3, name="stem_2_")
    nn = _conv_bn_relu(nn, stem_width * 2, 3, name="stem_3_")
    nn = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(nn)
    for stage_id, (repeats, filters) in enumerate(zip(RESNEST_DEPTHS[depth], RESNEST_FILTERS)):
        for block_id in range(repeats):
            strides = 2 if block_id == 0 and stage_id > 0 else 1
            nn = bottleneck(nn, filters, strides, name=f"stack{stage_id + 1}_block{block_id + 1}_")
    return keras.models.Model(inputs, nn, name=name or f"resnest{depth}")

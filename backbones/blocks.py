"""Small building blocks shared by the backbones (plain Keras 3 layers only, so every model serializes)."""

import keras


def conv_bn_prelu(inputs, filters, kernel_size, strides=1, name=""):
    """Conv2D (no bias, same padding) -> BatchNormalization -> per-channel PReLU."""
    nn = keras.layers.Conv2D(filters, kernel_size, strides=strides, padding="same", use_bias=False, name=name + "conv")(
        inputs
    )
    nn = keras.layers.BatchNormalization(name=name + "bn")(nn)
    return keras.layers.PReLU(shared_axes=[1, 2], name=name + "prelu")(nn)


def conv_bn(inputs, filters, kernel_size, strides=1, groups=1, name=""):
    """Conv2D (no bias, same padding) -> BatchNormalization, no activation."""
    nn = keras.layers.Conv2D(
        filters, kernel_size, strides=strides, padding="same", groups=groups, use_bias=False, name=name + "conv"
    )(inputs)
    return keras.layers.BatchNormalization(name=name + "bn")(nn)


def se_block(inputs, reduction=16, activation="prelu", gate="sigmoid", reduced_filters=None, name=""):
    """Squeeze-and-excitation: global average pool, 1x1 reduce (to ``reduced_filters`` or channels //
    ``reduction``), activation, 1x1 expand, ``gate`` activation, channel-wise multiply."""
    filters = inputs.shape[-1]
    reduced_filters = reduced_filters or max(1, filters // reduction)
    nn = keras.layers.GlobalAveragePooling2D(keepdims=True, name=name + "pool")(inputs)
    nn = keras.layers.Conv2D(reduced_filters, 1, name=name + "reduce")(nn)
    if activation == "prelu":
        nn = keras.layers.PReLU(shared_axes=[1, 2], name=name + "prelu")(nn)
    else:
        nn = keras.layers.Activation(activation, name=name + activation)(nn)
    nn = keras.layers.Conv2D(filters, 1, activation=gate, name=name + "expand")(nn)
    return keras.layers.Multiply(name=name + "out")([inputs, nn])

"""Small building blocks shared by the backbones (plain Keras 3 layers only, so every model serializes)."""

import keras


def conv_padding(inputs, kernel_size, strides=1, symmetric_padding=False, name=""):
    """``(inputs, padding)`` for a convolution: ``"same"``, or with ``symmetric_padding`` a ``ZeroPadding2D`` of
    ``kernel_size // 2`` pixels on every side followed by ``"valid"``.

    The two differ only for strided convolutions on even sizes: TensorFlow's "same" pads 0 pixels before and 1
    after, PyTorch and MXNet pad 1 on both sides, so each samples other pixels. Weights trained there need the
    symmetric form (``name + "pad"``); stride-1 odd kernels and 1x1 convolutions are the same both ways.
    """
    if not symmetric_padding or strides == 1 or kernel_size == 1:
        return inputs, "same"
    return keras.layers.ZeroPadding2D(kernel_size // 2, name=name + "pad")(inputs), "valid"


def conv_bn_prelu(inputs, filters, kernel_size, strides=1, groups=1, symmetric_padding=False, name=""):
    """Conv2D (no bias; ``groups`` > 1 a grouped conv) -> BatchNormalization -> per-channel PReLU."""
    inputs, padding = conv_padding(inputs, kernel_size, strides, symmetric_padding, name)
    nn = keras.layers.Conv2D(
        filters, kernel_size, strides=strides, padding=padding, groups=groups, use_bias=False, name=name + "conv"
    )(inputs)
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


@keras.saving.register_keras_serializable(package="insightface")
class StochasticDepth(keras.layers.Layer):
    """Residual add with stochastic depth: ``[shortcut, residual]`` -> ``shortcut + residual * b / p``.

    While training, ``b`` is drawn per sample from Bernoulli(``survival_probability`` = p), so a whole residual
    branch is dropped for that sample and kept branches are scaled by 1 / p; at inference the layer is exactly
    ``shortcut + residual``, so ``replace_stochastic_depth_with_add`` does not change predictions.
    """

    def __init__(self, survival_probability=0.8, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0 < survival_probability <= 1:
            raise ValueError(f"survival_probability must be in (0, 1], got {survival_probability}")
        self.survival_probability = float(survival_probability)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
        shortcut, residual = inputs
        if not training or self.survival_probability == 1:
            return shortcut + residual
        batch_shape = (keras.ops.shape(residual)[0],) + (1,) * (len(residual.shape) - 1)
        keep = keras.random.uniform(batch_shape, seed=self.seed_generator) < self.survival_probability
        scale = keras.ops.cast(keep, residual.dtype) / keras.ops.cast(self.survival_probability, residual.dtype)
        return shortcut + residual * scale

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "survival_probability": self.survival_probability, "seed": self.seed}


def residual_add(shortcut, residual, drop_rate=0.0, seed=None, name="add"):
    """``shortcut + residual``: a plain ``Add``, or with ``drop_rate`` > 0 a ``StochasticDepth`` that drops the whole
    residual of a sample with that probability while training (timm's ``DropPath``)."""
    if drop_rate <= 0:
        return keras.layers.Add(name=name)([shortcut, residual])
    return StochasticDepth(1 - drop_rate, seed=seed, name=name)([shortcut, residual])

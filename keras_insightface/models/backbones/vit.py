"""Vision transformers of insightface's arcface_torch (``vit_t`` ... ``vit_l_dp005_mask_005``), the layout its
WebFace42M models are trained and published in.

The image is cut into ``patch_size`` x ``patch_size`` patches by a strided convolution ("valid": 112 // 9 = 12 patches
a side, the last 4 pixel rows and columns unused, as in PyTorch), a learned position embedding is added, and ``depth``
pre-norm blocks follow: LayerNorm -> multi-head self-attention (one qkv projection without bias, Keras' fused
``dot_product_attention`` in float32) -> residual add, LayerNorm -> MLP (``mlp_ratio`` x width, ReLU6) -> residual add;
each residual is dropped per sample with a drop-path rate rising linearly from 0 to ``drop_path_rate`` over the blocks.
A final LayerNorm ends the tokens.

While training, ``mask_ratio`` > 0 removes that share of the patch tokens of each image at random before the blocks
and puts a learned mask token in their place after the final norm (arcface_torch's random masking). At inference every
token is kept and the two masking layers pass the tokens through.

The backbone's output is the token grid (rows, columns, width), so every embedding head of ``zoo.buildin_models``
applies; arcface_torch's own head (flatten all tokens, Linear, BatchNorm, Linear, BatchNorm) is its ``"VIT"`` head,
the default for these names (``FEATURE_HEAD``).
"""

import keras
import numpy as np

from keras_insightface.models.backbones import blocks

PATCH_SIZE, NUM_HEADS, MLP_RATIO = 9, 8, 4.0
LAYER_NORM_EPSILON = 1e-5  # PyTorch's LayerNorm default
# arcface_torch's feature head: BatchNorm1d(eps=2e-5) with PyTorch's momentum 0.1 (Keras: 0.9)
FEATURE_HEAD = dict(output_layer="VIT", bn_momentum=0.9, bn_epsilon=2e-5)
# arcface_torch's forward calls ``random_masking(x)`` without its configured ratio, so every network with a mask
# ratio > 0 masks the method's default 10 % of the tokens (the ``*_mask_005`` ones too): that is what is trained.
ARCFACE_TORCH_MASK_RATIO = 0.1
VIT_LAYOUTS = {  # name: (width, depth, drop_path_rate, mask_ratio); 8 heads, patch 9, MLP ratio 4 for all
    "vit_t": (256, 12, 0.1, ARCFACE_TORCH_MASK_RATIO),
    "vit_t_dp005_mask0": (256, 12, 0.05, 0.0),
    "vit_s": (512, 12, 0.1, ARCFACE_TORCH_MASK_RATIO),
    "vit_s_dp005_mask_0": (512, 12, 0.05, 0.0),
    "vit_b": (512, 24, 0.1, ARCFACE_TORCH_MASK_RATIO),
    "vit_b_dp005_mask_005": (512, 24, 0.05, ARCFACE_TORCH_MASK_RATIO),
    "vit_l_dp005_mask_005": (768, 24, 0.05, ARCFACE_TORCH_MASK_RATIO),
}


def _linear_init():
    """arcface_torch initializes every Linear (and the position embedding) from a normal of std 0.02 cut at 2 std."""
    return keras.initializers.TruncatedNormal(stddev=0.02)


def _masking(training, mask_ratio):
    return bool(training) and mask_ratio > 0


@keras.saving.register_keras_serializable(package="insightface")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned ``(tokens, width)`` position embedding to a ``(batch, tokens, width)`` input."""

    def build(self, input_shape):
        self.embedding = self.add_weight(shape=(1, *input_shape[1:]), initializer=_linear_init(), name="pos_embed")

    def call(self, inputs):
        return inputs + keras.ops.cast(self.embedding, inputs.dtype)


@keras.saving.register_keras_serializable(package="insightface")
class PatchMasking(keras.layers.Layer):
    """``tokens -> (kept tokens, restore indices)``. While training with ``mask_ratio`` > 0, each image keeps
    ``int(tokens * (1 - mask_ratio))`` tokens drawn at random (in random order); ``restore`` puts them back in place
    (``MaskTokens``). Otherwise every token is kept and ``restore`` is the identity order."""

    def __init__(self, mask_ratio=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.mask_ratio, self.seed = float(mask_ratio), seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, tokens, training=None):
        batch, length = keras.ops.shape(tokens)[0], tokens.shape[1]
        if not _masking(training, self.mask_ratio):
            return tokens, keras.ops.broadcast_to(keras.ops.arange(length, dtype="int32")[None], (batch, length))
        noise = keras.random.uniform((batch, length), seed=self.seed_generator)
        shuffle = keras.ops.cast(keras.ops.argsort(noise, axis=1), "int32")
        keep = int(length * (1 - self.mask_ratio))
        kept = keras.ops.take_along_axis(tokens, shuffle[:, :keep, None], axis=1)
        return kept, keras.ops.cast(keras.ops.argsort(shuffle, axis=1), "int32")

    def compute_output_spec(self, tokens, training=None):
        kept = tokens.shape[1] if self.mask_ratio == 0 else None  # masking changes the count while training
        return keras.KerasTensor((tokens.shape[0], kept, tokens.shape[2]), tokens.dtype), keras.KerasTensor(
            tokens.shape[:2], "int32"
        )

    def get_config(self):
        return {**super().get_config(), "mask_ratio": self.mask_ratio, "seed": self.seed}


@keras.saving.register_keras_serializable(package="insightface")
class MaskTokens(keras.layers.Layer):
    """``[kept tokens, restore indices] -> all tokens``: while ``PatchMasking`` masks, the removed tokens become the
    learned ``mask_token`` and every token returns to its place; otherwise the tokens pass through."""

    def __init__(self, mask_ratio=0.0, **kwargs):
        super().__init__(**kwargs)
        self.mask_ratio = float(mask_ratio)

    def build(self, input_shape):
        width = input_shape[0][-1]
        initializer = keras.initializers.RandomNormal(stddev=0.02)
        # kept (arcface_torch's state dicts have it) but not trained when nothing is masked: it gets no gradient
        self.mask_token = self.add_weight(
            shape=(1, 1, width), initializer=initializer, trainable=self.mask_ratio > 0, name="mask_token"
        )

    def call(self, inputs, training=None):
        tokens, restore = inputs
        if not _masking(training, self.mask_ratio):
            return tokens
        batch, kept, width = keras.ops.shape(tokens)[0], keras.ops.shape(tokens)[1], tokens.shape[-1]
        missing = keras.ops.shape(restore)[1] - kept
        filler = keras.ops.broadcast_to(keras.ops.cast(self.mask_token, tokens.dtype), (batch, missing, width))
        return keras.ops.take_along_axis(keras.ops.concatenate([tokens, filler], axis=1), restore[..., None], axis=1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[1], input_shape[0][-1])

    def get_config(self):
        return {**super().get_config(), "mask_ratio": self.mask_ratio}


@keras.saving.register_keras_serializable(package="insightface")
class SelfAttention(keras.layers.Layer):
    """Multi-head scaled dot-product attention of a fused ``qkv`` projection ``(batch, tokens, 3 * width)``, split as
    PyTorch's ``reshape(batch, tokens, 3, heads, width // heads)``, through Keras' ``dot_product_attention`` (the
    backend's fused op where it has one; scale ``(width // heads) ** -0.5``). Computed in float32 under mixed
    precision, as arcface_torch does; returns ``(batch, tokens, width)`` in the layer's compute dtype."""

    def __init__(self, num_heads=NUM_HEADS, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)

    def call(self, qkv):
        batch, length, width = keras.ops.shape(qkv)[0], keras.ops.shape(qkv)[1], qkv.shape[-1] // 3
        qkv = keras.ops.reshape(keras.ops.cast(qkv, "float32"), (batch, length, 3, self.num_heads, -1))
        query, key, value = (qkv[:, :, index] for index in range(3))
        attended = keras.ops.dot_product_attention(query, key, value)
        return keras.ops.cast(keras.ops.reshape(attended, (batch, length, width)), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], input_shape[-1] // 3)

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads}


def transformer_block(tokens, num_heads, mlp_ratio, drop_rate, seed=None, name=""):
    """Pre-norm block: ``x + drop(attention(norm1(x)))``, then ``x + drop(mlp(norm2(x)))`` with a ReLU6 MLP."""
    width = tokens.shape[-1]
    dense = dict(kernel_initializer=_linear_init())
    nn = keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name=name + "norm1")(tokens)
    nn = keras.layers.Dense(3 * width, use_bias=False, name=name + "attn_qkv", **dense)(nn)
    nn = SelfAttention(num_heads, name=name + "attn")(nn)
    nn = keras.layers.Dense(width, name=name + "attn_proj", **dense)(nn)
    tokens = blocks.residual_add(tokens, nn, drop_rate, seed, name=name + "attn_add")
    nn = keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name=name + "norm2")(tokens)
    nn = keras.layers.Dense(round(width * mlp_ratio), name=name + "mlp_fc1", **dense)(nn)
    nn = keras.layers.ReLU(max_value=6.0, name=name + "mlp_relu6")(nn)
    nn = keras.layers.Dense(width, name=name + "mlp_fc2", **dense)(nn)
    return blocks.residual_add(tokens, nn, drop_rate, seed, name=name + "mlp_add")


def vit(
    input_shape=(112, 112, 3),
    patch_size=PATCH_SIZE,
    width=256,
    depth=12,
    num_heads=NUM_HEADS,
    mlp_ratio=MLP_RATIO,
    drop_path_rate=0.1,
    mask_ratio=ARCFACE_TORCH_MASK_RATIO,
    seed=None,
    name="vit",
):
    """Build a ViT backbone (see the module docstring); output ``(rows, columns, width)`` patch tokens, ``rows =
    height // patch_size``. The defaults are ``vit_t``'s; ``VIT_LAYOUTS`` has the other arcface_torch sizes."""
    if min(input_shape[:2]) < patch_size:
        raise ValueError(f"a {input_shape[0]}x{input_shape[1]} input is smaller than one {patch_size}-pixel patch")
    if width % num_heads:
        raise ValueError(f"width {width} does not split into {num_heads} heads")
    inputs = keras.layers.Input(shape=input_shape)
    nn = keras.layers.Conv2D(width, patch_size, strides=patch_size, padding="valid", name="patch_embed")(inputs)
    rows, columns = nn.shape[1], nn.shape[2]
    nn = keras.layers.Reshape((rows * columns, width), name="patch_tokens")(nn)
    nn = PositionEmbedding(name="pos_embed")(nn)
    nn, restore = PatchMasking(mask_ratio, seed, name="patch_masking")(nn)
    for index, drop_rate in enumerate(np.linspace(0, drop_path_rate, depth)):
        nn = transformer_block(nn, num_heads, mlp_ratio, float(drop_rate), seed, name=f"block{index + 1}_")
    nn = keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name="norm")(nn)
    nn = MaskTokens(mask_ratio, name="mask_tokens")([nn, restore])
    nn = keras.layers.Reshape((rows, columns, width), name="token_grid")(nn)
    return keras.models.Model(inputs, nn, name=name)


def arcface_torch_vit(name, input_shape=(112, 112, 3), **kwargs):
    """The arcface_torch network ``name`` (a key of ``VIT_LAYOUTS``); ``kwargs`` override its layout."""
    width, depth, drop_path_rate, mask_ratio = VIT_LAYOUTS[name]
    layout = dict(width=width, depth=depth, drop_path_rate=drop_path_rate, mask_ratio=mask_ratio, name=name)
    return vit(input_shape, **{**layout, **kwargs})

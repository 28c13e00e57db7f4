"""Model zoo: backbone by name + embedding head (``buildin_models``) and model surgery helpers.

A *basic model* maps an image batch to embeddings; its last layer is a float32 linear activation named
``embedding`` so that it stays float32 under a mixed-precision policy. Backbones come from ``backbones/`` or
from ``keras.applications`` (always ``weights=None`` unless a local weight file is given: nothing is
downloaded).
"""

import functools
import os
import re

import keras

from keras_insightface.data.formats import normalize_image
from keras_insightface.models.backbones import ghostnet, mobile_facenet, resnest, resnet, vargfacenet, vit
from keras_insightface.models.backbones.blocks import StochasticDepth

EMBEDDING_LAYER_NAME = "embedding"
OUTPUT_LAYERS = ("E", "GDC", "GAP", "F", "VIT")
TF_DEFAULT_BN_MOMENTUM, TF_DEFAULT_BN_EPSILON = 0.99, 1e-3

# keras.applications models Keras_insightface lists by name; any other keras.applications name also works.
KERAS_APPLICATION_MODELS = (
    "mobilenet",
    "mobilenetv2",
    "resnet50",
    "resnet50v2",
    "resnet101",
    "resnet101v2",
    "resnet152",
    "resnet152v2",
)


def _mobile_facenet(use_se, input_shape, **kwargs):
    return mobile_facenet.mobile_facenet(input_shape=input_shape, use_se=use_se, **kwargs)


def _iresnet(depth, use_se, input_shape, **kwargs):
    return resnet.iresnet(depth, input_shape=input_shape, use_se=use_se, **kwargs)


def _resnest(depth, input_shape, **kwargs):
    return resnest.resnest(depth, input_shape=input_shape, **kwargs)


def _mobilenet_v3(size, input_shape, **kwargs):
    """keras.applications MobileNetV3 without its built-in Rescaling preprocessing (inputs are normalized by
    ``data.normalize_image`` like every other backbone)."""
    model_class = keras.applications.MobileNetV3Small if size == "small" else keras.applications.MobileNetV3Large
    return model_class(include_top=False, weights=None, input_shape=input_shape, include_preprocessing=False, **kwargs)


def _skip_preprocessing_call(layer, *args, **kwargs):
    """``clone_model`` call function that passes the input straight through Rescaling / Normalization layers."""
    if isinstance(layer, (keras.layers.Rescaling, keras.layers.Normalization)):
        return args[0]
    return layer(*args, **kwargs)


def _efficientnet(variant, input_shape, **kwargs):
    """keras.applications EfficientNet-``variant`` with the Rescaling / Normalization stem layers removed."""
    model_class = getattr(keras.applications, "EfficientNet" + variant.upper())
    model = model_class(include_top=False, weights=None, input_shape=input_shape, **kwargs)
    # Re-wire the already built layers (no copies): the original model object is dropped.
    return keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=_skip_preprocessing_call)


def _custom_builders():
    """Map each canonical lower-case name of our own backbones to ``builder(input_shape, **kwargs)``."""
    builders = {
        "mobilefacenet": functools.partial(_mobile_facenet, False),
        "se_mobilefacenet": functools.partial(_mobile_facenet, True),
        "mbf": mobile_facenet.mbf,  # arcface_torch's MobileFaceNet
        "mbf_large": functools.partial(mobile_facenet.mbf, blocks_per_stage=(2, 8, 12, 4), scale=4, name="mbf_large"),
        "ghostnet": ghostnet.ghostnet,
        "vargfacenet": vargfacenet.vargfacenet,
    }
    for depth in resnest.RESNEST_DEPTHS:
        builders[f"resnest{depth}"] = functools.partial(_resnest, depth)
    for depth in resnet.IRESNET_DEPTHS:
        for prefix, use_se in (("", False), ("se_", True)):
            builders[f"{prefix}r{depth}"] = functools.partial(_iresnet, depth, use_se)
    for size in ("small", "large"):
        builders[f"mobilenetv3_{size}"] = functools.partial(_mobilenet_v3, size)
    for variant in ("b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7"):
        builders[f"efficientnet{variant}"] = functools.partial(_efficientnet, variant)
    for name in vit.VIT_LAYOUTS:
        builders[name] = functools.partial(vit.arcface_torch_vit, name)
    return builders


CUSTOM_MODELS = _custom_builders()
# Alternative spellings accepted by ``buildin_models`` (lower case) -> canonical name.
NAME_ALIASES = {
    "mobile_facenet": "mobilefacenet",
    "se_mobile_facenet": "se_mobilefacenet",
    # keras.applications has no ResNet18 / ResNet34: Keras_insightface's "resnet34" is the insightface r34.
    "resnet18": "r18",
    "resnet34": "r34",
    **{f"iresnet{depth}": f"r{depth}" for depth in resnet.IRESNET_DEPTHS},
    **{f"se_iresnet{depth}": f"se_r{depth}" for depth in resnet.IRESNET_DEPTHS},
}
# The embedding head a backbone is built with when ``buildin_models`` is not told otherwise (others: GDC, TensorFlow's
# batch-norm defaults): arcface_torch's ViTs come with their own feature head.
HEAD_DEFAULTS = {name: vit.FEATURE_HEAD for name in vit.VIT_LAYOUTS}
DEFAULT_HEAD = dict(output_layer="GDC", bn_momentum=TF_DEFAULT_BN_MOMENTUM, bn_epsilon=TF_DEFAULT_BN_EPSILON)


def buildin_model_names():
    """Return every canonical backbone name ``buildin_models`` accepts (excluding the open-ended
    "any other keras.applications name")."""
    return list(CUSTOM_MODELS) + list(KERAS_APPLICATION_MODELS)


BUILDIN_MODELS = tuple(buildin_model_names())


def _name_groups():
    """Backbone names grouped for ``print_buildin_models``."""
    iresnets = [name for name in CUSTOM_MODELS if re.fullmatch(r"(se_)?r\d+", name)]
    efficientnets = [name for name in CUSTOM_MODELS if name.startswith("efficientnet")]
    vits = list(vit.VIT_LAYOUTS)
    others = [name for name in CUSTOM_MODELS if name not in iresnets + efficientnets + vits]
    return {
        "IResNet (insightface)": iresnets,
        "ViT (arcface_torch)": vits,
        "Keras application": list(KERAS_APPLICATION_MODELS),
        "EfficientNet (no Rescaling / Normalization)": efficientnets,
        "Custom": others,
    }


def print_buildin_models():
    """Print the backbone names ``buildin_models`` accepts, grouped as Keras_insightface printed them."""
    lines = [">>>> buildin_models"] + [f"{group}: {', '.join(names)}" for group, names in _name_groups().items()]
    lines.append("Or other names from keras.applications like DenseNet121 / InceptionV3 / NASNetMobile / VGG19.")
    print("\n".join(lines))


def _keras_application_classes():
    """Map lower-case names of the model constructors in ``keras.applications`` to the constructors."""
    return {
        name.lower(): getattr(keras.applications, name)
        for name in dir(keras.applications)
        if name[:1].isupper() and callable(getattr(keras.applications, name))
    }


def _check_weights(weights):
    """Only ``None`` or an existing local weight file are allowed: nothing may be downloaded at run time."""
    if weights is not None and not (isinstance(weights, (str, os.PathLike)) and os.path.isfile(weights)):
        raise ValueError(
            f"weights={weights!r}: only None or the path of an existing local weight file is supported "
            "(downloading pretrained weights is disabled)."
        )


def resolve_backbone_name(name):
    """Return ``(canonical lower-case name, builder)`` for a backbone name (case-insensitive, aliases allowed);
    the builder is ours (``builder(input_shape, **kwargs)``) or a ``keras.applications`` constructor."""
    if not isinstance(name, str):
        raise TypeError(f"backbone name must be a str, got {type(name).__name__}")
    name_lower = NAME_ALIASES.get(name.lower(), name.lower())
    if name_lower in CUSTOM_MODELS:
        return name_lower, CUSTOM_MODELS[name_lower]
    applications = _keras_application_classes()
    if name_lower in applications:
        return name_lower, applications[name_lower]
    raise ValueError(
        f"Unknown backbone {name!r}. Known names: {', '.join(buildin_model_names())}, "
        "or any keras.applications model name."
    )


def backbone_from_name(name, input_shape=(112, 112, 3), weights=None, **kwargs):
    """Build the backbone (no head) called ``name`` (case-insensitive), with ``include_top=False``."""
    _check_weights(weights)
    name_lower, builder = resolve_backbone_name(name)
    if name_lower not in CUSTOM_MODELS:  # keras.applications
        return builder(include_top=False, weights=weights, input_shape=tuple(input_shape), **kwargs)
    model = builder(tuple(input_shape), **kwargs)
    if weights is not None:
        model.load_weights(weights)
    return model


def _set_batch_norm_params(model, momentum, epsilon):
    """Set momentum / epsilon of every BatchNormalization layer in place (Keras reads them at call time)."""
    for layer in _flat_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum, layer.epsilon = momentum, epsilon


def _flat_layers(model):
    """All layers of ``model``, descending into nested models."""
    layers = []
    for layer in model.layers:
        layers.extend(_flat_layers(layer) if isinstance(layer, keras.Model) else [layer])
    return layers


def _embedding_head(nn, output_layer, emb_shape, dropout, use_bias, bn_momentum, bn_epsilon):
    """Map the backbone feature map to an ``emb_shape`` vector with one of the E / GDC / GAP / F heads."""

    def batch_norm(name):
        return keras.layers.BatchNormalization(momentum=bn_momentum, epsilon=bn_epsilon, name=name)

    def maybe_dropout(tensor):
        return keras.layers.Dropout(dropout, name="head_dropout")(tensor) if 0 < dropout < 1 else tensor

    def dense(tensor):
        return keras.layers.Dense(emb_shape, use_bias=use_bias, kernel_initializer="glorot_normal", name="head_dense")(
            tensor
        )

    if output_layer == "E":
        nn = batch_norm("E_batchnorm")(nn)
        nn = maybe_dropout(nn)
        nn = dense(keras.layers.Flatten(name="E_flatten")(nn))
    elif output_layer == "GAP":
        nn = batch_norm("GAP_batchnorm")(nn)
        nn = keras.layers.GlobalAveragePooling2D(name="GAP_pool")(nn)
        nn = dense(maybe_dropout(nn))
    elif output_layer == "F":
        nn = keras.layers.Flatten(name="F_flatten")(nn)
        nn = dense(maybe_dropout(nn))
    elif output_layer == "VIT":  # arcface_torch's ViT head: every token flattened, Linear to the width, BatchNorm
        initializer = keras.initializers.TruncatedNormal(stddev=0.02)
        width = nn.shape[-1]
        nn = keras.layers.Flatten(name="VIT_flatten")(nn)
        nn = keras.layers.Dense(width, use_bias=False, kernel_initializer=initializer, name="VIT_dense")(nn)
        nn = dense(maybe_dropout(batch_norm("VIT_batchnorm")(nn)))
    else:  # GDC: global depthwise conv over the whole feature map, then a linear 1x1 conv
        kernel_size = (int(nn.shape[1]), int(nn.shape[2]))
        nn = keras.layers.DepthwiseConv2D(kernel_size, use_bias=False, name="GDC_dw")(nn)
        nn = batch_norm("GDC_batchnorm")(nn)
        nn = maybe_dropout(nn)
        nn = keras.layers.Conv2D(emb_shape, 1, use_bias=use_bias, kernel_initializer="glorot_normal", name="GDC_conv")(
            nn
        )
        nn = keras.layers.Flatten(name="GDC_flatten")(nn)
    return nn


def head_settings(stem_model, output_layer=None, bn_momentum=None, bn_epsilon=None):
    """``(output_layer, bn_momentum, bn_epsilon)`` of the head ``buildin_models`` puts on ``stem_model``: the values
    given, the others from the backbone's ``HEAD_DEFAULTS`` (a name's), else ``DEFAULT_HEAD``."""
    name = resolve_backbone_name(stem_model)[0] if isinstance(stem_model, str) else None
    defaults = HEAD_DEFAULTS.get(name, DEFAULT_HEAD)
    given = dict(output_layer=output_layer, bn_momentum=bn_momentum, bn_epsilon=bn_epsilon)
    return tuple(defaults[key] if value is None else value for key, value in given.items())


def buildin_models(
    stem_model,
    dropout=0,
    emb_shape=512,
    input_shape=(112, 112, 3),
    output_layer=None,
    bn_momentum=None,
    bn_epsilon=None,
    add_pointwise_conv=False,
    use_bias=False,
    scale=True,
    weights=None,
    use_prelu=False,
    **kwargs,
):
    """Build a basic model: backbone -> [pointwise conv] -> head -> BatchNormalization -> float32 ``embedding``.

    ``stem_model`` is a backbone name (case-insensitive, see ``print_buildin_models``) or a Keras model whose
    output is a 4D feature map. ``output_layer``, ``bn_momentum`` and ``bn_epsilon`` left None take the backbone's
    own head (arcface_torch's for the ViTs: ``HEAD_DEFAULTS``), else a GDC head with TensorFlow's batch-norm settings
    (0.99, 1e-3). MXNet insightface used ``bn_momentum=0.9, bn_epsilon=2e-5`` and
    ``scale=False`` (``fix_gamma=True``). ``use_prelu`` replaces the backbone's ReLUs with PReLU.
    Extra ``kwargs`` go to the backbone constructor.
    """
    output_layer, bn_momentum, bn_epsilon = head_settings(stem_model, output_layer, bn_momentum, bn_epsilon)
    output_layer = str(output_layer).upper()
    if output_layer not in OUTPUT_LAYERS:
        raise ValueError(f"output_layer={output_layer!r} is not one of {OUTPUT_LAYERS}")
    if not (isinstance(emb_shape, int) and emb_shape > 0):
        raise ValueError(f"emb_shape must be a positive int, got {emb_shape!r}")
    if isinstance(stem_model, str):
        backbone = backbone_from_name(stem_model, input_shape=input_shape, weights=weights, **kwargs)
    elif isinstance(stem_model, keras.Model):
        backbone = stem_model
    else:
        raise TypeError(f"stem_model must be a backbone name or a keras.Model, got {type(stem_model).__name__}")
    if len(backbone.outputs[0].shape) != 4:
        raise ValueError(f"backbone output must be a 4D feature map, got shape {backbone.outputs[0].shape}")
    if use_prelu:
        backbone = replace_ReLU_with_PReLU(backbone)
    if (bn_momentum, bn_epsilon) != (TF_DEFAULT_BN_MOMENTUM, TF_DEFAULT_BN_EPSILON):
        _set_batch_norm_params(backbone, bn_momentum, bn_epsilon)

    nn = backbone.outputs[0]
    if add_pointwise_conv:  # pointwise conv + GDC / E is smaller than a plain E head on wide backbones
        nn = keras.layers.Conv2D(512, 1, use_bias=False, name="pw_conv")(nn)
        nn = keras.layers.BatchNormalization(momentum=bn_momentum, epsilon=bn_epsilon, name="pw_bn")(nn)
        nn = keras.layers.PReLU(shared_axes=[1, 2], name="pw_prelu")(nn)
    nn = _embedding_head(nn, output_layer, emb_shape, dropout, use_bias, bn_momentum, bn_epsilon)
    # ``scale=False`` is MXNet's ``fix_gamma=True``.
    nn = keras.layers.BatchNormalization(momentum=bn_momentum, epsilon=bn_epsilon, scale=scale, name="pre_embedding")(
        nn
    )
    embedding = keras.layers.Activation("linear", dtype="float32", name=EMBEDDING_LAYER_NAME)(nn)
    return keras.models.Model(backbone.inputs[0], embedding, name=backbone.name)


# ---------------------------------------------------------------- model surgery


def _clone_keeping_weights(model, clone_function, call_function=None):
    """Clone ``model`` (``clone_function(layer)`` -> new layer), then copy the weights of every layer whose
    name and weight shapes are unchanged, so surgery keeps what it does not touch."""
    new_model = keras.models.clone_model(model, clone_function=clone_function, call_function=call_function)
    old_layers = {layer.name: layer for layer in _flat_layers(model)}
    for layer in _flat_layers(new_model):
        old = old_layers.get(layer.name)
        if old is None or not layer.weights:
            continue
        old_weights = old.get_weights()
        if [tuple(w.shape) for w in old_weights] == [tuple(w.shape) for w in layer.weights]:
            layer.set_weights(old_weights)
    return new_model


def _clone_layer(layer, **config_updates):
    """A fresh (unbuilt) layer of the same class and config, with ``config_updates`` applied."""
    return layer.__class__.from_config({**layer.get_config(), **config_updates})


def _is_relu(layer):
    if isinstance(layer, keras.layers.ReLU):
        return True
    return isinstance(layer, keras.layers.Activation) and layer.activation is keras.activations.relu


def replace_ReLU_with_PReLU(model):
    """Return a copy of ``model`` where every ReLU (``ReLU`` layer or ``Activation("relu")``) is a per-channel
    PReLU initialised to 0.25 (MXNet / PyTorch default); all other weights are kept."""

    def convert(layer):
        if not _is_relu(layer):
            return _clone_layer(layer)
        name = layer.name.replace("_relu", "_prelu") if "_relu" in layer.name else layer.name + "_prelu"
        return keras.layers.PReLU(
            shared_axes=[1, 2], alpha_initializer=keras.initializers.Constant(0.25), name=name, dtype=layer.dtype_policy
        )

    return _clone_keeping_weights(model, convert)


# layer class -> ((regularizer attribute, weight attribute), ...) that ``add_l2_regularizer_2_model`` covers
_KERNEL_REGULARIZERS = (
    (keras.layers.DepthwiseConv2D, (("depthwise_regularizer", "kernel"),)),
    (
        keras.layers.SeparableConv2D,
        (("depthwise_regularizer", "depthwise_kernel"), ("pointwise_regularizer", "pointwise_kernel")),
    ),
    (keras.layers.Conv2D, (("kernel_regularizer", "kernel"),)),
    (keras.layers.Conv1D, (("kernel_regularizer", "kernel"),)),
    (keras.layers.Dense, (("kernel_regularizer", "kernel"),)),
)
_NORM_REGULARIZERS = (
    (keras.layers.BatchNormalization, (("gamma_regularizer", "gamma"), ("beta_regularizer", "beta"))),
    (keras.layers.PReLU, (("alpha_regularizer", "alpha"),)),
)


def _regularizer_targets(layer, apply_to_batch_normal, apply_to_bias):
    """The (regularizer attribute, weight attribute) pairs of ``layer`` that get an L2 penalty."""
    table = _KERNEL_REGULARIZERS + (_NORM_REGULARIZERS if apply_to_batch_normal else ())
    for layer_class, pairs in table:
        if isinstance(layer, layer_class):
            targets = list(pairs)
            if apply_to_bias and getattr(layer, "use_bias", False):
                targets.append(("bias_regularizer", "bias"))
            return [(reg, attr) for reg, attr in targets if getattr(layer, attr, None) is not None]
    return []


def add_l2_regularizer_2_model(
    model, weight_decay, custom_objects=None, apply_to_batch_normal=False, apply_to_bias=False
):
    """Add ``keras.regularizers.L2(weight_decay / 2)`` to the kernels of every trainable conv / dense layer
    (and BatchNormalization gamma / beta, PReLU alpha with ``apply_to_batch_normal``; biases with
    ``apply_to_bias``). With SGD + momentum this reproduces MXNet's weight decay ``wd``: MXNet's SGD adds ``wd * w`` to the
    gradient, which is the gradient of an L2 of ``wd / 2``.

    The model is changed in place (weights untouched) and returned: both the layer config (so saving keeps it)
    and the variables (so ``model.losses`` includes it) get the regularizer. ``custom_objects`` is accepted for
    API compatibility with Keras_insightface and unused.
    """
    del custom_objects
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    for layer in _flat_layers(model):
        if not layer.trainable:
            continue
        for regularizer_attr, weight_attr in _regularizer_targets(layer, apply_to_batch_normal, apply_to_bias):
            regularizer = keras.regularizers.L2(weight_decay / 2) if weight_decay > 0 else None
            setattr(layer, regularizer_attr, regularizer)
            getattr(layer, weight_attr).regularizer = regularizer
    return model


def get_l2_regularizer_value(model):
    """The L2 factor of the first regularized kernel in ``model`` (0 if none): used to scale the output layer's
    weight decay (``output_weight_decay >= 1``)."""
    for layer in _flat_layers(model):
        for regularizer_attr, _ in _regularizer_targets(layer, False, False):
            regularizer = getattr(layer, regularizer_attr, None)
            if isinstance(regularizer, keras.regularizers.L2):
                return float(regularizer.l2)
    return 0.0


def _is_residual_add(layer):
    """A two-input ``Add``; branch merges named ``*merge`` (VarGFaceNet) are not residual adds."""
    if not isinstance(layer, keras.layers.Add) or layer.name.endswith("merge"):
        return False
    return len(layer._inbound_nodes[0].input_tensors) == 2


def add_stochastic_depth(model, survivals=(1, 0.8), seed=None):
    """Replace every two-input ``Add`` (a residual add) with ``StochasticDepth``; the survival probability falls
    linearly from ``survivals[0]`` at the first add to ``survivals[1]`` at the last (a float: the same for all).

    The input of the add that is closer to the model input (fewer layers deep) is taken as the shortcut.
    Weights are kept.
    """
    add_names = [layer.name for layer in _flat_layers(model) if _is_residual_add(layer)]
    if not add_names:
        raise ValueError(f"model {model.name!r} has no residual Add layer to replace")
    start, end = (survivals, survivals) if isinstance(survivals, (int, float)) else survivals
    steps = max(len(add_names) - 1, 1)
    probabilities = {name: start + (end - start) * idx / steps for idx, name in enumerate(add_names)}
    depths = {}

    def convert(layer):
        if layer.name not in probabilities:
            return _clone_layer(layer)
        return StochasticDepth(probabilities[layer.name], seed=seed, name=layer.name, dtype=layer.dtype_policy)

    def call(layer, *args, **kwargs):
        inputs = args[0] if args else None
        if isinstance(layer, StochasticDepth):
            inputs = sorted(inputs, key=lambda tensor: depths.get(id(tensor), 0))
            args = (inputs,) + args[1:]
        outputs = layer(*args, **kwargs)
        input_depth = max((depths.get(id(tensor), 0) for tensor in keras.tree.flatten((args, kwargs))), default=0)
        for tensor in keras.tree.flatten(outputs):
            depths[id(tensor)] = input_depth + 1
        return outputs

    return _clone_keeping_weights(model, convert, call)


def replace_stochastic_depth_with_add(model):
    """Replace every ``StochasticDepth`` with a plain ``Add`` of the same name (identical at inference)."""

    def convert(layer):
        if isinstance(layer, StochasticDepth):
            return keras.layers.Add(name=layer.name, dtype=layer.dtype_policy)
        return _clone_layer(layer)

    return _clone_keeping_weights(model, convert)


def convert_to_mixed_float16(model, policy="mixed_float16"):
    """Return a copy of ``model`` computing under ``policy`` (``mixed_float16`` / ``mixed_bfloat16``), weights
    kept (variables stay float32); the ``embedding`` layer stays float32 so outputs are float32."""
    if policy not in ("mixed_float16", "mixed_bfloat16", "float32"):
        raise ValueError(f"policy must be 'mixed_float16', 'mixed_bfloat16' or 'float32', got {policy!r}")

    def convert(layer):
        if layer.name == EMBEDDING_LAYER_NAME:
            return _clone_layer(layer, dtype="float32")
        return _clone_layer(layer, dtype=policy)

    return _clone_keeping_weights(model, convert)


def convert_mixed_float16_to_float32(model):
    """Return a float32 copy of a mixed-precision ``model``, weights kept."""
    return convert_to_mixed_float16(model, policy="float32")


def extract_basic_model(model, layer=EMBEDDING_LAYER_NAME):
    """The input -> embedding sub-model of a full training model (layer name or index), sharing its weights."""
    output = model.get_layer(layer).output if isinstance(layer, str) else model.layers[layer].output
    return keras.Model(model.inputs[0], output, name=model.name + "_basic")


def is_training_model(model):
    """True for a full training model (the basic model with its heads): a layer named ``embedding`` whose output is
    not the model's only output."""
    names = {layer.name for layer in model.layers}
    return EMBEDDING_LAYER_NAME in names and (
        len(model.outputs) != 1 or model.outputs[0] is not model.get_layer(EMBEDDING_LAYER_NAME).output
    )


def describe_model(model):
    """A short description of a basic model's network: input, embedding size and parameter count (two models with
    equal descriptions are taken as the same network, whatever their names)."""
    height, width, channels = model.input_shape[1:4]
    return f"input {height}x{width}x{channels}, embedding {model.output_shape[-1]}, {model.count_params():,} parameters"


def load_basic_model(model, custom_objects=None, safe_mode=True):
    """``load_model`` for the tools that use embeddings: a training checkpoint (the full model, heads included)
    gives its embedding model, said in one line."""
    loaded = load_model(model, custom_objects, safe_mode=safe_mode)
    if not is_training_model(loaded):
        return loaded
    print(f">>>> {model if isinstance(model, str) else loaded.name} is a training model: using its embedding model")
    return extract_basic_model(loaded)


# ---------------------------------------------------------------------------------------------------------
# Deployment wrappers (export.build_deploy_model) and the one model loader.
# ---------------------------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="insightface")
class NormalizeImage(keras.layers.Layer):
    """Baked-in preprocessing: 0..255 RGB (uint8) to the model input range, ``formats.normalize_image``."""

    def call(self, inputs):
        return normalize_image(keras.ops.cast(inputs, "float32"))

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="insightface")
class ResizeImage(keras.layers.Layer):
    """Bilinear resize of any HxW input to the model's ``(height, width)``.

    Used instead of ``keras.layers.Resizing``, whose ``call(training=True)`` default puts the rest of the graph
    (BatchNormalization included) in training mode when the deploy model is called without ``training``.
    """

    def __init__(self, height, width, **kwargs):
        super().__init__(**kwargs)
        self.height, self.width = int(height), int(width)

    def call(self, inputs):
        return keras.ops.image.resize(inputs, (self.height, self.width), interpolation="bilinear")

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.height, self.width, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "height": self.height, "width": self.width}


def load_model(model, custom_objects=None, compile=False, safe_mode=True):
    """Load a ``.keras`` or ``.h5`` model saved by this library (a model object is returned as it is), or import a
    pretrained model of another tool (an insightface ``.onnx``, an arcface_torch ``.pth`` / ``.pt``, a
    Keras_insightface ``.h5``) as the same network built here (``import_foreign_model``).

    Every custom object of the library (backbone layers, heads, losses, lazy optimizers, deployment layers) is
    registered first, so ``custom_objects`` is only needed for the user's own. ``safe_mode=True`` refuses models
    that would run pickled Python code (lambdas); pass False only for files you trust.
    """
    from keras_insightface.models import foreign as foreign_models
    from keras_insightface.nn import (
        heads,  # noqa: F401 (importing heads, losses and optimizers registers their classes)
        losses,  # noqa: F401
        optimizers,  # noqa: F401
    )

    if isinstance(model, keras.Model):
        return model
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model not found: {path}")
    if foreign_models.foreign_model_kind(path):
        return import_foreign_model(path)
    _check_model_file(path)
    try:
        return keras.models.load_model(path, custom_objects=custom_objects, compile=compile, safe_mode=safe_mode)
    except (TypeError, KeyError, AttributeError) as err:  # a saved configuration this Python / Keras cannot rebuild
        raise ValueError(f"{path}: cannot rebuild the saved model: {_rebuild_failure(err)}") from None
    except ValueError:
        if not (compile and path.endswith(".keras")):
            raise
        return _load_fitting_optimizer_slots(path, custom_objects, safe_mode)


def _load_fitting_optimizer_slots(path, custom_objects, safe_mode):
    """A ``.keras`` checkpoint whose optimizer slots do not fit the model they load into: those of a cosine head
    saved with padding classes (a run with ``sharded_head``) loading onto one without them, or the reverse. The
    model loads as saved, the optimizer is rebuilt from the saved compile configuration, and each slot is cut to,
    or padded with zeros to, its variable's shape (padding classes sit at the end of the class axis)."""
    import io
    import json
    import zipfile

    import h5py

    from keras_insightface.nn.heads import fit_to_shape

    model = keras.models.load_model(path, custom_objects=custom_objects, compile=False, safe_mode=safe_mode)
    with zipfile.ZipFile(path) as archive:
        compile_config = json.loads(archive.read("config.json")).get("compile_config")
        weights = archive.read("model.weights.h5")
    with h5py.File(io.BytesIO(weights), "r") as store:
        saved = store.get("optimizer/vars", {})
        values = [saved[str(index)][()] for index in range(len(saved))]
    if compile_config is None or not values:
        raise ValueError(f"{path}: the saved optimizer state does not load into this model")
    with keras.saving.custom_object_scope(custom_objects or {}):
        model.compile_from_config(compile_config)
    variables = model.optimizer.variables
    if len(values) != len(variables):
        raise ValueError(f"{path}: {len(values)} saved optimizer variables, {len(variables)} in this model's optimizer")
    resized = 0
    for variable, value in zip(variables, values):
        resized += tuple(value.shape) != tuple(variable.shape)
        variable.assign(fit_to_shape(value, tuple(variable.shape), f"{path}: a saved optimizer slot"))
    if resized:
        print(f">>>> {path}: {resized} optimizer slot(s) of the head fitted to its classes (saved with other padding)")
    return model


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _check_model_file(path):
    """A clear error for an unknown extension, or a file whose content is not what its extension says (Keras would
    report a text file named ``.keras`` as "File not found")."""
    import zipfile

    if not path.endswith((".keras", ".h5", ".hdf5")):
        raise ValueError(f"unsupported model file {path!r}: expected a .keras or .h5 file")
    if path.endswith(".keras") and not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a Keras model file (a .keras model is a zip archive, this file is not one)")
    if not path.endswith(".keras"):
        with open(path, "rb") as ff:
            if ff.read(len(HDF5_SIGNATURE)) != HDF5_SIGNATURE:
                raise ValueError(f"{path}: not a Keras model file (a .h5 model is an HDF5 file, this file is not one)")


def _rebuild_failure(err):
    """The layer class and the root error of Keras' chain of deserialization errors, as one short phrase."""
    chain = [err]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    matches = [re.search(r"\.(\w+)'> could not be deserialized", str(link)) for link in chain]
    layers = [match.group(1) for match in matches if match]
    root = chain[-1]
    where = f"its {layers[-1]} layer " if layers else ""
    return f"{where}failed with {type(root).__name__}: {' '.join(str(root).split())}"


def import_foreign_model(path, verbose=True):
    """A basic model of this library holding a pretrained model of another tool: the backbone and head are built here
    with the file's architecture and input size, and every weight is assigned (``foreign_models``); the result
    trains, saves and takes heads like any built-in model. Its input is the library's ``(x - 127.5) * 0.0078125``."""
    from keras_insightface.models import foreign as foreign_models

    foreign = foreign_models.read_foreign_model(path)
    model = foreign_models.assign_weights(buildin_models(foreign.backbone, **foreign.head), foreign)
    if verbose:
        print(f">>>> Imported {foreign.description}")
    return model


def load_weights(model, path):
    """Load the weights in ``path`` into ``model``: Keras weights or a Keras model file (``model.load_weights``), or a
    pretrained model of another tool, imported and copied layer by layer (``copy_weights``)."""
    from keras_insightface.models import foreign as foreign_models

    if foreign_models.foreign_model_kind(path):
        return copy_weights(import_foreign_model(path), model)
    model.load_weights(path)
    return model


def copy_weights(source, target):
    """Copy every weight (and batch-norm epsilon) of ``source`` into the layer of the same name in ``target``. The two
    must be the same network:
    the same layers holding weights, with the same shapes, and the same padding layers (a network padded the PyTorch
    way computes other outputs from the same weights)."""
    source_layers, target_layers = (
        {ll.name: ll for ll in _flat_layers(source)},
        {ll.name: ll for ll in _flat_layers(target)},
    )

    def named(layers, kind):
        return {name for name, layer in layers.items() if kind(layer)}

    for kind, what in ((lambda layer: bool(layer.weights), "weights"), (_is_padding, "padding")):
        differ = sorted(named(source_layers, kind) ^ named(target_layers, kind))
        if differ:
            side = "the pretrained model" if differ[0] in source_layers else "the model"
            raise ValueError(f"layer '{differ[0]}' ({what}) is only in {side}: {source.name} is another network")
    for name, layer in ((name, layer) for name, layer in source_layers.items() if layer.weights):
        found, needed = [tuple(w.shape) for w in layer.weights], [tuple(w.shape) for w in target_layers[name].weights]
        if found != needed:
            raise ValueError(
                f"layer '{name}': weights of shapes {found} in the pretrained model, the model needs {needed}"
            )
        target_layers[name].set_weights(layer.get_weights())
        if isinstance(layer, keras.layers.BatchNormalization | keras.layers.LayerNormalization):  # trained with it
            target_layers[name].epsilon = layer.epsilon
    return target


def _is_padding(layer):
    return isinstance(layer, keras.layers.ZeroPadding2D)

"""Face-recognition models trained with other tools, read as this library's own networks: insightface model-zoo
ONNX graphs, arcface_torch checkpoints (``backbone.pth`` / ``model.pt``) and ONNX exports (IResNet, MobileFaceNet and
its vision transformers) and Keras_insightface ``.h5`` releases.

``read_foreign_model(path)`` returns a :class:`ForeignModel`: the backbone built from ``backbones/`` with the
file's depth, widths and input size (strided convolutions padded as PyTorch / MXNet do when the weights come from
there), the ``models.buildin_models`` arguments of its embedding head, and every layer's weights under the library's
layer names in Keras layouts; ``assign_weights`` puts them into the built model and refuses any mismatch (a layer
without weights, weights without a layer, a shape that differs). ``models.load_model`` does both, so every model
path the library accepts takes these files too.

Input convention. The library feeds ``(x - 127.5) * 0.0078125``. PyTorch models expect ``(x - 127.5) / 127.5``, a
factor ``128 / 127.5`` away, which is folded exactly into the first convolution's kernel (its zero padding stays
zero); MXNet graphs normalize inside with ``Sub`` / ``Mul`` nodes, which are absorbed the same way. A normalization
that is not a pure per-channel scale of ours cannot be folded exactly and is refused.
"""

import dataclasses
import json
import math
import os
import re

import numpy as np

from keras_insightface.data.formats import IMAGE_MEAN, SEEDS_SCALE
from keras_insightface.models import onnx_graph, onnx_vit, torch_checkpoint
from keras_insightface.models.backbones import mobile_facenet, resnet, vit

TORCH_SUFFIXES = (".pth", ".pt")
ONNX_SUFFIXES = (".onnx",)
KERAS2_SUFFIXES = (".h5", ".hdf5")
TORCH_NORMALIZATION = (np.full(3, 1 / IMAGE_MEAN), np.full(3, -1.0))  # arcface_torch: (x - 127.5) / 127.5
STRIDED_STAGES = 4  # IResNet and MobileFaceNet halve the input four times before the head
FIRST_CONVS = {"iresnet": "stem_conv", "mbf": "stem_conv", "vit": "patch_embed"}  # where the input scale is folded
VIT_BATCH_NORM = (vit.FEATURE_HEAD["bn_epsilon"], vit.FEATURE_HEAD["bn_momentum"])


@dataclasses.dataclass
class ForeignModel:
    """A model read from another tool's file, ready to build as ``models.buildin_models(backbone, **head)``."""

    description: str
    backbone: object  # a keras.Model from backbones/
    head: dict
    weights: dict  # layer name -> weights in the layer's order and Keras layout
    batch_norms: dict  # normalization layer name -> (epsilon, momentum); a LayerNorm's momentum is None
    path: str = ""


class _StateDict:
    """A state dict read by name; entries nobody reads are an error (nothing in a file is dropped silently)."""

    def __init__(self, state_dict, path):
        self.path, self.taken = path, set()
        self.values = {key: value for key, value in state_dict.items() if not key.endswith("num_batches_tracked")}

    def __contains__(self, key):
        return key in self.values

    def __getitem__(self, key):
        """The float32 value of ``key``, which is marked as read."""
        self.taken.add(key)
        return np.asarray(self._value(key), dtype=np.float32)

    def shape(self, key):
        """The shape of ``key`` (not marked as read)."""
        return np.shape(self._value(key))

    def _value(self, key):
        if key not in self.values:
            raise ValueError(f"{self.path}: key '{key}' is missing from the state dict")
        return self.values[key]

    def count(self, prefix, suffix):
        """How many ``prefix{k}suffix`` keys exist for k = 0, 1, ..."""
        return _count(self.values, prefix + "{}" + suffix, first=0)

    def check_all_taken(self):
        left = sorted(set(self.values) - self.taken)
        if left:
            raise ValueError(f"{self.path}: key '{left[0]}' has no place in the network ({len(left)} keys unassigned)")


# ---------------------------------------------------------------------------------------------------------
# arcface_torch state dicts (read from .pth files, or from ONNX graphs by onnx_graph)
# ---------------------------------------------------------------------------------------------------------
def _torch_weights(state_dict, torch_name, kind):
    """Keras weights of one PyTorch module: ``conv``, ``depthwise``, ``bn``, ``prelu`` or ``linear_as_conv``."""
    if kind == "bn":
        return [state_dict[f"{torch_name}.{key}"] for key in ("weight", "bias", "running_mean", "running_var")]
    weight = state_dict[torch_name + ".weight"]
    if kind == "conv":  # (out, in / groups, kh, kw) -> (kh, kw, in / groups, out)
        return [weight.transpose(2, 3, 1, 0)]
    if kind == "depthwise":  # (channels, 1, kh, kw) -> (kh, kw, channels, 1)
        return [weight.transpose(2, 3, 0, 1)]
    if kind == "prelu":
        return [weight.reshape(1, 1, -1)]
    return [weight.T[None, None]]  # a Linear on a 1x1 map as the head's 1x1 conv


def _convert(state_dict, names, batch_norms):
    """``(weights, batch_norms)`` under our layer names for ``names`` = ``[(torch module, our layer, kind)]``."""
    weights = {ours: _torch_weights(state_dict, torch_name, kind) for torch_name, ours, kind in names}
    default = (onnx_graph.TORCH_BN_EPSILON, onnx_graph.TORCH_BN_MOMENTUM)
    ours_batch_norms = {ours: batch_norms.get(torch_name, default) for torch_name, ours, kind in names if kind == "bn"}
    return weights, ours_batch_norms


def _conv_block_names(torch_prefix, ours_prefix, kind="conv", prelu=True):
    """arcface_torch ``ConvBlock`` / ``LinearBlock`` (``layers.0`` conv, ``layers.1`` BN, ``layers.2`` PReLU)."""
    names = [
        (torch_prefix + "layers.0", ours_prefix + "conv", kind),
        (torch_prefix + "layers.1", ours_prefix + "bn", "bn"),
    ]
    return names + ([(torch_prefix + "layers.2", ours_prefix + "prelu", "prelu")] if prelu else [])


def _dense_from_channels_first(weight, channels):
    """A PyTorch Linear over an NCHW flatten (index c*H*W + h*W + w) as a Keras Dense kernel over our NHWC flatten."""
    outputs, inputs = weight.shape
    return weight.reshape(outputs, channels, -1).transpose(2, 1, 0).reshape(inputs, outputs)


def _feature_map_side(state_dict, inputs, channels, what):
    side = math.isqrt(inputs // channels) if inputs % channels == 0 else 0
    if side * side * channels != inputs:
        raise ValueError(f"{state_dict.path}: {what} takes {inputs} inputs, not a square map of {channels} channels")
    return side


IRESNET_BLOCK_NAMES = (("bn1", "1_bn", "bn"), ("conv1", "1_conv", "conv"), ("bn2", "2_bn", "bn"))
IRESNET_BLOCK_NAMES += (("prelu", "2_prelu", "prelu"), ("conv2", "2_conv", "conv"), ("bn3", "3_bn", "bn"))
IRESNET_SHORTCUT_NAMES = (("downsample.0", "shortcut_conv", "conv"), ("downsample.1", "shortcut_bn", "bn"))


def _iresnet_names(blocks_per_stage):
    names = [("conv1", "stem_conv", "conv"), ("bn1", "stem_bn", "bn"), ("prelu", "stem_prelu", "prelu")]
    for stage, repeats in enumerate(blocks_per_stage, 1):
        for block in range(repeats):
            table = IRESNET_BLOCK_NAMES + (IRESNET_SHORTCUT_NAMES if block == 0 else ())
            names += [
                (f"layer{stage}.{block}.{torch}", f"stack{stage}_block{block + 1}_{ours}", k)
                for torch, ours, k in table
            ]
    return names + [("bn2", "E_batchnorm", "bn"), ("features", "pre_embedding", "bn")]


def _iresnet_from_state_dict(state_dict, batch_norms):
    """arcface_torch IResNet (any depth and widths) -> ``(backbone, head, weights, batch_norms, summary)``."""
    blocks = tuple(state_dict.count(f"layer{stage}.", ".conv1.weight") for stage in range(1, STRIDED_STAGES + 1))
    if 0 in blocks or f"layer{STRIDED_STAGES + 1}.0.conv1.weight" in state_dict:
        raise ValueError(f"{state_dict.path}: an IResNet has 4 stages of blocks, found {blocks}")
    filters = tuple(state_dict.shape(f"layer{stage}.0.conv2.weight")[0] for stage in range(1, STRIDED_STAGES + 1))
    emb_shape, inputs = state_dict.shape("fc.weight")
    side = _feature_map_side(state_dict, inputs, filters[-1], "fc") << STRIDED_STAGES
    backbone, summary = _iresnet_backbone(blocks, filters, (side, side, 3), symmetric_padding=True)
    weights, ours_batch_norms = _convert(state_dict, _iresnet_names(blocks), batch_norms)
    weights["head_dense"] = [_dense_from_channels_first(state_dict["fc.weight"], filters[-1]), state_dict["fc.bias"]]
    head = dict(output_layer="E", emb_shape=int(emb_shape), use_bias=True)
    return backbone, head, weights, ours_batch_norms, summary


def _iresnet_backbone(blocks, filters, input_shape, symmetric_padding):
    """``(backbone, summary)``: our IResNet of these blocks per stage and widths, named ``r<depth>`` when the blocks
    are those of a known depth."""
    depth = next((depth for depth, known in resnet.IRESNET_DEPTHS.items() if known == blocks), None)
    name = f"r{depth}" if depth else "iresnet"
    backbone = resnet.iresnet(depth, input_shape, False, name, blocks, filters, symmetric_padding)
    return backbone, f"IResNet {name} (blocks {list(blocks)}, widths {list(filters)})"


def _depthwise_block_names(torch_prefix, ours_prefix):
    """arcface_torch ``DepthWise`` -> our inverted-residual block (expand, depthwise, project)."""
    return (
        _conv_block_names(torch_prefix + "layers.0.", ours_prefix + "expand_")
        + _conv_block_names(torch_prefix + "layers.1.", ours_prefix + "dw_", "depthwise")
        + _conv_block_names(torch_prefix + "layers.2.", ours_prefix + "project_", prelu=False)
    )


MBF_HEAD_NAMES = [
    ("features.layers.0.layers.0", "GDC_dw", "depthwise"),
    ("features.layers.0.layers.1", "GDC_batchnorm", "bn"),
    ("features.layers.2", "GDC_conv", "linear_as_conv"),
    ("features.layers.3", "pre_embedding", "bn"),
]


def _mbf_stack(state_dict, torch_prefix, stack, residual):
    """``(stage, names)`` of one ``DepthWise`` (strided, no residual) or ``Residual`` module as our stack ``stack``."""
    prefixes = [torch_prefix]
    if residual:
        prefixes = [
            f"{torch_prefix}layers.{k}."
            for k in range(state_dict.count(torch_prefix + "layers.", ".layers.0.layers.0.weight"))
        ]
    names = []
    for block, prefix in enumerate(prefixes, 1):
        names += _depthwise_block_names(prefix, f"stack{stack}_block{block}_")
    hidden = state_dict.shape(prefixes[0] + "layers.0.layers.0.weight")[0] if prefixes else 0
    width = state_dict.shape(prefixes[0] + "layers.2.layers.0.weight")[0] if prefixes else 0
    return (hidden, width, len(prefixes), 1 if residual else 2), names


def _mbf_from_state_dict(state_dict, batch_norms):
    """arcface_torch MobileFaceNet (``mbf``, ``mbf_large``, any widths) -> ``(backbone, head, weights, batch_norms,
    summary)``: ``layers.0`` stem, ``layers.1`` grouped conv or residual stack, ``layers.2-7`` (DepthWise,
    Residual) pairs, ``conv_sep``, ``features`` (GDC)."""
    stem_width = state_dict.shape("layers.0.layers.0.weight")[0]
    names, stages, stem_conv = _conv_block_names("layers.0.", "stem_"), [], None
    if "layers.1.layers.0.weight" in state_dict:
        stem_conv = stem_width // state_dict.shape("layers.1.layers.0.weight")[1]
        names += _conv_block_names("layers.1.", "stem_group_")
    for position in range(1 if stem_conv is None else 2, 8):
        stage, stage_names = _mbf_stack(state_dict, f"layers.{position}.", len(stages) + 1, position % 2 == 1)
        if stage[2]:
            stages.append(stage)
            names += stage_names
    names += _conv_block_names("conv_sep.", "features_") + MBF_HEAD_NAMES
    side = state_dict.shape("features.layers.0.layers.0.weight")[-1] << STRIDED_STAGES
    output_width = state_dict.shape("conv_sep.layers.0.weight")[0]
    backbone = mobile_facenet.mobile_facenet(
        (side, side, 3),
        False,
        "mbf",
        stem_width,
        stem_conv,
        tuple(stages),
        output_width=output_width,
        symmetric_padding=True,
    )
    weights, ours_batch_norms = _convert(state_dict, names, batch_norms)
    head = dict(output_layer="GDC", emb_shape=int(state_dict.shape("features.layers.2.weight")[0]), use_bias=False)
    blocks = [stage[2] for stage in stages]
    return (
        backbone,
        head,
        weights,
        ours_batch_norms,
        f"MobileFaceNet mbf (stem {stem_width}, stacks of {blocks} blocks)",
    )


def _vit_input_size(state_dict, settings, patch):
    """``(height, width)``: the graph's when it says, else square; 112 (arcface_torch's) when it gives as many
    patches, else exactly the patches' pixels."""
    tokens = state_dict.shape("pos_embed")[1]
    height, width = settings.get("input_size", (None, None))
    if height and width:
        if (height // patch) * (width // patch) != tokens:
            raise ValueError(f"{state_dict.path}: {tokens} position embeddings for a {height}x{width} input")
        return height, width
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"{state_dict.path}: {tokens} position embeddings are not a square grid of patches")
    size = 112 if 112 // patch == side else side * patch
    return size, size


def _vit_layout_name(width, depth, patch, hidden, heads):
    """The arcface_torch size (``vit_t``, ``vit_s``, ``vit_b``, ``vit_l``) with this layout, else ``vit``."""
    for name, (known_width, known_depth, _, _) in vit.VIT_LAYOUTS.items():
        arcface = (known_width, known_depth, vit.PATCH_SIZE, known_width * vit.MLP_RATIO, vit.NUM_HEADS)
        if (width, depth, patch, hidden, heads) == arcface:
            return name.split("_dp")[0]
    return "vit"


def _vit_weights(state_dict, depth, width):
    """Keras weights of every layer of our ViT and its VIT head; an export has no mask token (zeros then)."""

    def linear(name):
        bias = [state_dict[name + ".bias"]] if name + ".bias" in state_dict else []
        return [state_dict[name + ".weight"].T, *bias]

    def norm(name):
        return [state_dict[name + ".weight"], state_dict[name + ".bias"]]

    mask_token = state_dict["mask_token"] if "mask_token" in state_dict else np.zeros((1, 1, width), np.float32)
    weights = {
        "patch_embed": [
            state_dict["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
            state_dict["patch_embed.proj.bias"],
        ],
        "pos_embed": [state_dict["pos_embed"]],
        "mask_tokens": [mask_token],
        "norm": norm("norm"),
        "VIT_dense": linear("feature.0"),
        "VIT_batchnorm": _torch_weights(state_dict, "feature.1", "bn"),
        "head_dense": linear("feature.2"),
        "pre_embedding": _torch_weights(state_dict, "feature.3", "bn"),
    }
    for index in range(depth):
        torch_prefix, ours = f"blocks.{index}.", f"block{index + 1}_"
        for torch_name, kind in (("norm1", norm), ("attn.qkv", linear), ("attn.proj", linear), ("norm2", norm)):
            weights[ours + torch_name.replace(".", "_")] = kind(torch_prefix + torch_name)
        weights[ours + "mlp_fc1"], weights[ours + "mlp_fc2"] = (
            linear(torch_prefix + "mlp.fc1"),
            linear(torch_prefix + "mlp.fc2"),
        )
    return weights


def _vit_from_state_dict(state_dict, batch_norms, settings):
    """arcface_torch VisionTransformer (any width, depth, patch size and MLP width) -> ``(backbone, head, weights,
    normalizations, summary)``, built without drop path and masking (inference, fine-tuning). A state dict does not
    record the heads: arcface_torch's 8 unless the graph shows them (``settings``)."""
    width, _, patch, _ = state_dict.shape("patch_embed.proj.weight")
    depth = state_dict.count("blocks.", ".attn.qkv.weight")
    hidden = state_dict.shape("blocks.0.mlp.fc1.weight")[0]
    heads = settings.get("num_heads", vit.NUM_HEADS)
    name = _vit_layout_name(width, depth, patch, hidden, heads)
    size = _vit_input_size(state_dict, settings, patch)
    backbone = vit.vit((*size, 3), patch, width, depth, heads, hidden / width, 0.0, 0.0, name=name)
    weights = _vit_weights(state_dict, depth, width)
    normalizations = {
        "VIT_batchnorm": batch_norms.get("feature.1", VIT_BATCH_NORM),
        "pre_embedding": batch_norms.get("feature.3", VIT_BATCH_NORM),
    }
    epsilons = settings.get("layer_norm_epsilon", {})
    layer_norms = [("norm", "norm")] + [
        (f"blocks.{index}.{norm}", f"block{index + 1}_{norm}") for index in range(depth) for norm in ("norm1", "norm2")
    ]
    normalizations.update({ours: (epsilons.get(key, vit.LAYER_NORM_EPSILON), None) for key, ours in layer_norms})
    head = dict(output_layer="VIT", emb_shape=int(state_dict.shape("feature.2.weight")[0]), use_bias=False)
    heads_from = "" if "num_heads" in settings else " as arcface_torch's"
    summary = f"ViT {name} (width {width}, depth {depth}, {heads} heads{heads_from}, patch {patch}, MLP {hidden})"
    return backbone, head, weights, normalizations, summary


def _input_scale(affine, path):
    """Per input channel, the factor that turns our input into what the network's first conv expects.

    ``affine = (scale, offset)`` is what the network expects of 0..255 pixels, ``x * scale + offset``; ours is
    ``(x - 127.5) * 0.0078125``, so they differ by a pure scale only when ``127.5 * scale + offset == 0``.
    """
    scale, offset = (np.asarray(values, np.float64) for values in affine)
    residue = IMAGE_MEAN * scale + offset
    if np.any(np.abs(residue) > 1e-6 * np.maximum(np.abs(IMAGE_MEAN * scale), 1)):
        raise ValueError(
            f"{path}: the network normalizes its input as x * {scale.tolist()} + {offset.tolist()}, which is not a"
            f" scale of the library's (x - 127.5) * {SEEDS_SCALE}: it cannot be folded exactly into the first conv"
        )
    return scale / SEEDS_SCALE


def _from_state_dict(state_dict, batch_norms, affine, architecture, origin, path, settings=None):
    """A :class:`ForeignModel` of an arcface_torch state dict, the input normalization folded in; ``settings`` are
    what an ONNX graph shows beyond its weights (a ViT's heads, input size, LayerNorm epsilons)."""
    state_dict = _StateDict(state_dict, path)
    if architecture == "vit":
        backbone, head, weights, batch_norms, summary = _vit_from_state_dict(state_dict, batch_norms, settings or {})
    else:
        build = {"iresnet": _iresnet_from_state_dict, "mbf": _mbf_from_state_dict}[architecture]
        backbone, head, weights, batch_norms, summary = build(state_dict, batch_norms)
    state_dict.check_all_taken()
    factor = _input_scale(affine, path)
    first = FIRST_CONVS[architecture]  # a scale folds exactly into its kernel: its padding, if any, stays zero
    weights[first] = [weights[first][0] * factor[None, None, :, None].astype(np.float32), *weights[first][1:]]
    size = "x".join(str(dim) for dim in backbone.input_shape[1:3])
    convention = "no input scale" if np.allclose(factor, 1) else f"its input scale x{float(np.mean(factor)):.6f} folded"
    description = (
        f"{os.path.basename(path)}: {origin} {summary}, {size} input, {head['emb_shape']}-d embedding"
        f" ({convention} into the first conv; feed it as every model here: (x - 127.5) * {SEEDS_SCALE})"
    )
    return ForeignModel(description, backbone, head, weights, batch_norms, path)


def _torch_architecture(state_dict, path):
    if "layer1.0.conv1.weight" in state_dict and "fc.weight" in state_dict:
        return "iresnet"
    if "layers.0.layers.0.weight" in state_dict and "conv_sep.layers.0.weight" in state_dict:
        return "mbf"
    if "patch_embed.proj.weight" in state_dict and "pos_embed" in state_dict:
        return "vit"
    raise ValueError(
        f"{path}: not an arcface_torch IResNet, MobileFaceNet or ViT state dict (keys start"
        f" {', '.join(list(state_dict)[:4])})"
    )


def _read_torch(path):
    state_dict = torch_checkpoint.load_state_dict(path)
    architecture = _torch_architecture(state_dict, path)
    return _from_state_dict(state_dict, {}, TORCH_NORMALIZATION, architecture, "arcface_torch checkpoint", path)


def _read_onnx(path):
    model, settings = onnx_graph.load_onnx(path), {}
    if onnx_vit.is_transformer(model):
        state_dict, batch_norms, affine, settings = onnx_vit.read_vit_state_dict(path, model)
        architecture = "vit"
    else:
        state_dict, batch_norms, affine, architecture = onnx_graph.read_onnx_state_dict(path, model)
    origin = "insightface ONNX" + (
        " (PyTorch export)" if affine is None else " (normalizing in the graph, MXNet style)"
    )
    affine = TORCH_NORMALIZATION if affine is None else affine
    return _from_state_dict(state_dict, batch_norms, affine, architecture, origin, path, settings)


# ---------------------------------------------------------------------------------------------------------
# Keras_insightface .h5 basic models (tf-keras 2): same networks, other layer names
# ---------------------------------------------------------------------------------------------------------
KERAS2_STEMS = {"0_conv": "iresnet", "stem_1_conv": "mobilefacenet"}  # the first conv names the backbone
_BLOCK = r"(stack\d+_block\d+_)"
KERAS2_HEAD_NAMES = (
    (r"(E_batchnorm|GAP_batchnorm|GDC_dw|GDC_batchnorm|GDC_conv|pw_conv|pw_bn|pre_embedding)", r"\1"),
    (r"(E|GAP|F)_dense", "head_dense"),
    (r"pw_(prelu|relu)", "pw_prelu"),
)
KERAS2_IRESNET_NAMES = (
    (r"0_conv", "stem_conv"),
    (r"0_bn", "stem_bn"),
    (r"0_(prelu|relu)", "stem_prelu"),
    (_BLOCK + r"(1_bn|1_conv|2_bn|2_conv|3_bn|shortcut_conv|shortcut_bn)", r"\1\2"),
    (_BLOCK + r"2_(prelu|relu)", r"\g<1>2_prelu"),
)
KERAS2_MOBILE_FACENET_NAMES = (
    (r"stem_1_(conv|bn|prelu)", r"stem_\1"),
    (r"stem_2_(separable|depthwise)", "stem_2_conv"),
    (r"stem_2_(bn|prelu)", r"stem_2_\1"),
    (_BLOCK + r"1_(conv|bn|prelu)", r"\1expand_\2"),
    (_BLOCK + r"2_depthwise", r"\1dw_conv"),
    (_BLOCK + r"2_(bn|prelu)", r"\1dw_\2"),
    (_BLOCK + r"3_(conv|bn)", r"\1project_\2"),
    (_BLOCK + r"se_1_conv", r"\1se_reduce"),
    (_BLOCK + r"se_prelu", r"\1se_prelu"),
    (_BLOCK + r"se_2_conv", r"\1se_expand"),
)


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _keras2_config_layers(h5_file):
    """The layer configs of a tf-keras model file by name, or None when it is not a Keras 2 model."""
    if not _text(h5_file.attrs.get("keras_version", "")).startswith("2.") or "model_config" not in h5_file.attrs:
        return None
    config = json.loads(_text(h5_file.attrs["model_config"]))
    return {layer["config"]["name"]: layer for layer in config["config"]["layers"]}


def _keras2_family(path):
    """``"iresnet"`` / ``"mobilefacenet"`` for a Keras_insightface basic model saved by tf-keras, else None."""
    import h5py

    try:
        with h5py.File(path, "r") as h5_file:
            layers = _keras2_config_layers(h5_file)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return _keras2_family_of(layers)


def _keras2_family_of(layers):
    if not layers or "embedding" not in layers:
        return None
    return next((family for stem, family in KERAS2_STEMS.items() if stem in layers), None)


def _read_keras2_file(path):
    """``(layer configs by name, weight arrays by layer name)`` of a tf-keras ``.h5`` model."""
    import h5py

    with h5py.File(path, "r") as h5_file:
        layers, group = _keras2_config_layers(h5_file), h5_file["model_weights"]
        weights = {}
        for name in map(_text, group.attrs["layer_names"]):
            names = map(_text, group[name].attrs["weight_names"])
            weights[name] = [np.asarray(group[name][weight_name], np.float32) for weight_name in names]
    return layers, {name: values for name, values in weights.items() if values}


def _count(names, template, first=1):
    """How many of ``template.format(first), template.format(first + 1) ...`` are in ``names``."""
    count = 0
    while template.format(first + count) in names:
        count += 1
    return count


def _keras2_input_shape(layers):
    layer = next(layer for layer in layers.values() if layer["class_name"] == "InputLayer")
    config = layer["config"]
    return tuple(config.get("batch_input_shape", config.get("batch_shape"))[1:])


def _keras2_iresnet(layers, weights):
    """``(backbone, names)`` of a Keras_insightface IResNet (PReLU or ReLU; "same" or symmetric padding)."""
    stages = _count(layers, "stack{}_block1_1_conv")
    blocks = tuple(_count(layers, f"stack{stage}_block{{}}_1_conv") for stage in range(1, stages + 1))
    filters = tuple(weights[f"stack{stage}_block1_1_conv"][0].shape[-1] for stage in range(1, stages + 1))
    symmetric = layers["stack1_block1_2_conv"]["config"]["padding"] == "valid"  # after a ZeroPadding2D
    backbone, summary = _iresnet_backbone(blocks, filters, _keras2_input_shape(layers), symmetric)
    return backbone, KERAS2_IRESNET_NAMES, summary


def _keras2_mobile_facenet(layers, weights):
    """``(backbone, names)`` of a Keras_insightface MobileFaceNet (separable stem conv, no residual on the first block
    of a stack, the 1x1 conv to 512 in the head)."""
    stem_conv = next((kind for kind in ("separable", "depthwise") if f"stem_2_{kind}" in layers), None)
    stages = []
    for stage in range(1, _count(layers, "stack{}_block1_1_conv") + 1):
        first = f"stack{stage}_block1_"
        hidden, width = weights[first + "1_conv"][0].shape[-1], weights[first + "3_conv"][0].shape[-1]
        strides = layers[first + "2_depthwise"]["config"]["strides"][0]
        stages.append((hidden, width, _count(layers, f"stack{stage}_block{{}}_1_conv"), strides))
    backbone = mobile_facenet.mobile_facenet(
        _keras2_input_shape(layers),
        use_se=any(name.endswith("se_1_conv") for name in layers),
        stem_width=weights["stem_1_conv"][0].shape[-1],
        stem_conv=stem_conv,
        stages=tuple(stages),
        first_block_residual=False,
        output_width=None,
        symmetric_padding=layers["stem_1_conv"]["config"]["padding"] == "valid",
    )
    stem_prefix = mobile_facenet.STEM_PREFIXES.get(stem_conv, "stem_2_")
    names = tuple((pattern, ours.replace("stem_2_", stem_prefix)) for pattern, ours in KERAS2_MOBILE_FACENET_NAMES)
    return backbone, names, f"MobileFaceNet (stacks of {[stage[2] for stage in stages]} blocks)"


def _keras2_head(layers, weights):
    """``models.buildin_models`` head arguments matching the file's E / GDC / GAP / F head."""
    heads = (("E", "E_dense"), ("GDC", "GDC_conv"), ("GAP", "GAP_dense"), ("F", "F_dense"))
    output_layer, dense = next(((kind, name) for kind, name in heads if name in weights), (None, None))
    if output_layer is None:
        raise ValueError("no E_dense / GDC_conv / GAP_dense / F_dense layer: not a Keras_insightface basic model")
    return dict(
        output_layer=output_layer,
        emb_shape=int(weights[dense][0].shape[-1]),
        use_bias=len(weights[dense]) == 2,
        scale=bool(layers["pre_embedding"]["config"].get("scale", True)),
        add_pointwise_conv="pw_conv" in weights,
    )


def _our_name(name, names):
    for pattern, ours in names + KERAS2_HEAD_NAMES:
        if re.fullmatch(pattern, name, re.IGNORECASE):
            return re.sub(pattern, ours, name, flags=re.IGNORECASE)
    return None


def _keras2_weights(layers, weights, names, path):
    """Weights by our layer names; a ReLU becomes a PReLU of zero slope (the same function)."""
    ours = {}
    for name, values in weights.items():
        target = _our_name(name, names)
        if target is None:
            raise ValueError(
                f"{path}: layer '{name}' ({layers[name]['class_name']}) has no counterpart in this network"
            )
        ours[target] = values
    for name, layer in layers.items():
        target = (
            _our_name(name, names)
            if layer["config"].get("activation") == "relu" or layer["class_name"] == "ReLU"
            else None
        )
        if target and target.endswith("prelu"):
            channels = weights[layer["inbound_nodes"][0][0][0]][0].shape[-1]
            ours[target] = [np.zeros((1, 1, channels), np.float32)]
    return ours


def _read_keras2(path):
    layers, weights = _read_keras2_file(path)
    family = _keras2_family_of(layers)
    backbone, names, summary = (_keras2_iresnet if family == "iresnet" else _keras2_mobile_facenet)(layers, weights)
    try:
        head = _keras2_head(layers, weights)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    batch_norms = {
        name: layer["config"] for name, layer in layers.items() if layer["class_name"] == "BatchNormalization"
    }
    batch_norms = {
        _our_name(name, names): (config["epsilon"], config["momentum"]) for name, config in batch_norms.items()
    }
    size = "x".join(str(dim) for dim in backbone.input_shape[1:3])
    description = (
        f"{os.path.basename(path)}: Keras_insightface {summary}, {size} input, {head['emb_shape']}-d embedding, "
        f"{head['output_layer']} head"
    )
    return ForeignModel(description, backbone, head, _keras2_weights(layers, weights, names, path), batch_norms, path)


# ---------------------------------------------------------------------------------------------------------
# The entry points: which files, read, assign
# ---------------------------------------------------------------------------------------------------------
def foreign_model_kind(path):
    """``"torch"``, ``"onnx"`` or ``"keras2"`` when ``path`` is a file this module reads (by its suffix; a ``.h5``
    only when it is a Keras_insightface model saved by tf-keras), else None."""
    name = os.fspath(path).lower()
    if name.endswith(TORCH_SUFFIXES):
        return "torch"
    if name.endswith(ONNX_SUFFIXES):
        return "onnx"
    if name.endswith(KERAS2_SUFFIXES) and os.path.isfile(path) and _keras2_family(path):
        return "keras2"
    return None


def read_foreign_model(path):
    """The :class:`ForeignModel` of an insightface ONNX graph, an arcface_torch checkpoint or a Keras_insightface
    ``.h5``; anything it cannot map is a one-line ValueError naming the op, layer or key."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model not found: {path}")
    readers = {"torch": _read_torch, "onnx": _read_onnx, "keras2": _read_keras2}
    kind = foreign_model_kind(path)
    if kind is None:
        raise ValueError(f"{path}: not an insightface ONNX graph, arcface_torch checkpoint or Keras_insightface .h5")
    return readers[kind](path)


def assign_weights(model, foreign):
    """Set every weight of ``model`` (built from ``foreign``) from ``foreign.weights``: a layer without weights in the
    file, weights without a layer, or a shape that differs is an error naming the layer."""
    layers = {layer.name: layer for layer in model.layers}
    unassigned = [name for name, layer in layers.items() if layer.weights and name not in foreign.weights]
    if unassigned:
        raise ValueError(
            f"{foreign.path}: no weights for layer '{unassigned[0]}' ({len(unassigned)} layers unassigned)"
        )
    extra = [name for name in foreign.weights if name not in layers]
    if extra:
        raise ValueError(f"{foreign.path}: weights for a layer '{extra[0]}' that the network does not have")
    for name, values in foreign.weights.items():
        needed, found = [tuple(weight.shape) for weight in layers[name].weights], [np.shape(value) for value in values]
        if needed != found:
            raise ValueError(
                f"{foreign.path}: layer '{name}': weights of shapes {found} in the file, the layer needs {needed}"
            )
        layers[name].set_weights(values)
    for name, (epsilon, momentum) in foreign.batch_norms.items():
        layers[name].epsilon = float(epsilon)
        if momentum is not None:
            layers[name].momentum = float(momentum)
    return model

"""Pretrained-model files of other tools, written here the way those tools write them, and references to check an
import against that never use the importer:

- arcface_torch state dicts (IResNet, MobileFaceNet) with random weights, batch norms calibrated on images (as a
  trained network's are), and a numpy forward pass of each (NCHW, PyTorch padding);
- PyTorch zip checkpoints (``archive/data.pkl`` written opcode by opcode as ``torch.save`` pickles a state dict,
  raw storages in ``archive/data/<key>``), and one whose pickle would run code;
- insightface ONNX graphs as ``torch.onnx.export`` writes an eval-mode network (batch norms after convolutions
  folded, ``onnx::Conv_N`` initializers, PReLU slopes (C, 1, 1), ``Flatten`` + ``Gemm``) and as MXNet's converter
  writes ``arcface_r100_v1`` (``_minusscalar0`` / ``_mulscalar0`` prologue, every batch norm a node), run by
  onnxruntime as the reference;
- Keras_insightface ``.h5`` files (tf-keras layout: ``model_config`` JSON and ``model_weights/<layer>/<layer>/<w>:0``)
  written with h5py from a replica of the upstream network built here with its layer names, whose predictions are
  the reference.
"""

import dataclasses
import json
import math
import struct
import zipfile

import h5py
import keras
import numpy as np
import skimage.data
from PIL import Image

# ---------------------------------------------------------------------------------------------------------
# Probe images and the acceptance check
# ---------------------------------------------------------------------------------------------------------
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "camera", "coins")


def real_images(size, count=16):
    """``count`` float32 0..255 RGB crops of skimage.data photos (two per photo), resized to ``size`` x ``size``."""
    crops = []
    for name in PHOTOS:
        photo = getattr(skimage.data, name)()
        photo = np.stack([photo] * 3, axis=-1) if photo.ndim == 2 else photo[..., :3]
        height, width = photo.shape[:2]
        side = min(height, width) // 2
        for top, left in ((height // 4, width // 4), (0, width - side)):
            crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size), Image.BILINEAR)
            crops.append(np.asarray(crop, np.float32))
    return np.stack(crops[:count])


def probe_images(size, seed=0):
    """16 random images and 16 real ones, 0..255 float32 NHWC."""
    noise = np.random.default_rng(seed).uniform(0, 255, (16, size, size, 3)).astype(np.float32)
    return np.concatenate([noise, real_images(size)])


def ours(images):
    """The library's input convention."""
    return (images - 127.5) * 0.0078125


def torch_style(images):
    """arcface_torch's / insightface's input convention, NCHW."""
    return np.ascontiguousarray(((images - 127.5) / 127.5).transpose(0, 3, 1, 2))


def assert_same_embeddings(found, reference, min_cosine=0.99999, max_abs_diff=1e-4):
    found, reference = np.asarray(found, np.float64), np.asarray(reference, np.float64)
    assert found.shape == reference.shape
    cosine = np.sum(found * reference, axis=1) / np.linalg.norm(found, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() >= min_cosine, cosine.min()
    assert np.abs(found - reference).max() <= max_abs_diff, np.abs(found - reference).max()
    assert np.abs(reference).max() > 0.1  # a meaningful scale: the comparison is not between near-zero vectors


# ---------------------------------------------------------------------------------------------------------
# numpy layers (NCHW, PyTorch semantics)
# ---------------------------------------------------------------------------------------------------------
def conv2d(x, weight, stride=1, pads=None, groups=1):
    """PyTorch ``conv2d`` of ``x`` (N, C, H, W) with ``weight`` (O, C / groups, kh, kw), ``pads`` (top, bottom, left,
    right), default ``kernel // 2`` on every side."""
    out_channels, group_channels, kh, kw = weight.shape
    top, bottom, left, right = pads if pads is not None else (kh // 2, kh // 2, kw // 2, kw // 2)
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
    batch, channels, height, width = windows.shape[:4]
    if groups == 1:
        columns = windows.transpose(0, 2, 3, 1, 4, 5).reshape(batch * height * width, channels * kh * kw)
        out = columns @ weight.reshape(out_channels, -1).T
        return out.reshape(batch, height, width, out_channels).transpose(0, 3, 1, 2)
    windows = windows.reshape(batch, groups, channels // groups, height, width, kh, kw)
    grouped = weight.reshape(groups, out_channels // groups, group_channels, kh, kw)
    return np.einsum("ngchwij,gocij->ngohw", windows, grouped, optimize=True).reshape(
        batch, out_channels, height, width
    )


def batch_norm(x, state_dict, name, eps=1e-5, calibrate=False):
    """Inference batch norm over axis 1; ``calibrate`` first sets the running statistics to those of ``x``."""
    axes = (0, 2, 3) if x.ndim == 4 else (0,)
    if calibrate:
        state_dict[name + ".running_mean"] = x.mean(axes).astype(np.float32)
        state_dict[name + ".running_var"] = x.var(axes).astype(np.float32) + 0.01
    shape = (1, -1, 1, 1) if x.ndim == 4 else (1, -1)
    scale = state_dict[name + ".weight"] / np.sqrt(state_dict[name + ".running_var"] + eps)
    return (x - state_dict[name + ".running_mean"].reshape(shape)) * scale.reshape(shape) + state_dict[
        name + ".bias"
    ].reshape(shape)


def prelu(x, slope):
    return np.where(x > 0, x, x * slope.reshape(1, -1, 1, 1))


# ---------------------------------------------------------------------------------------------------------
# arcface_torch state dicts with random weights
# ---------------------------------------------------------------------------------------------------------
def _conv_weight(rng, out_channels, in_channels, kernel):
    return rng.normal(0, math.sqrt(2 / (in_channels * kernel * kernel)), (out_channels, in_channels, kernel, kernel))


def _add_batch_norm(state_dict, rng, name, channels):
    state_dict[name + ".weight"] = rng.uniform(0.5, 1.5, channels)
    state_dict[name + ".bias"] = rng.uniform(-0.3, 0.3, channels)
    state_dict[name + ".running_mean"] = np.zeros(channels)
    state_dict[name + ".running_var"] = np.ones(channels)
    state_dict[name + ".num_batches_tracked"] = np.array(1000, np.int64)


def _float32(state_dict):
    return {key: value if value.dtype == np.int64 else value.astype(np.float32) for key, value in state_dict.items()}


def iresnet_state_dict(rng, blocks=(1, 2, 1, 1), widths=(8, 8, 16, 16), emb=16, side=2):
    """arcface_torch ``IResNet`` names and shapes (stem width ``widths[0]``; ``side`` x ``side`` final map)."""
    sd = {"conv1.weight": _conv_weight(rng, widths[0], 3, 3)}
    _add_batch_norm(sd, rng, "bn1", widths[0])
    sd["prelu.weight"] = rng.uniform(0.1, 0.4, widths[0])
    inplanes = widths[0]
    for stage, (repeats, planes) in enumerate(zip(blocks, widths), 1):
        for block in range(repeats):
            prefix = f"layer{stage}.{block}."
            _add_batch_norm(sd, rng, prefix + "bn1", inplanes)
            sd[prefix + "conv1.weight"] = _conv_weight(rng, planes, inplanes, 3)
            _add_batch_norm(sd, rng, prefix + "bn2", planes)
            sd[prefix + "prelu.weight"] = rng.uniform(0.1, 0.4, planes)
            sd[prefix + "conv2.weight"] = _conv_weight(rng, planes, planes, 3)
            _add_batch_norm(sd, rng, prefix + "bn3", planes)
            if block == 0:
                sd[prefix + "downsample.0.weight"] = _conv_weight(rng, planes, inplanes, 1)
                _add_batch_norm(sd, rng, prefix + "downsample.1", planes)
            inplanes = planes
    _add_batch_norm(sd, rng, "bn2", widths[-1])
    sd["fc.weight"] = rng.normal(0, 1 / math.sqrt(widths[-1] * side * side), (emb, widths[-1] * side * side))
    sd["fc.bias"] = rng.normal(0, 0.1, emb)
    _add_batch_norm(sd, rng, "features", emb)
    return _float32(sd)


def iresnet_forward(sd, x, eps=1e-5, calibrate=False):
    """arcface_torch ``IResNet.forward`` (eval mode) on NCHW ``x``."""

    def bn(tensor, name):
        return batch_norm(tensor, sd, name, eps, calibrate)

    x = prelu(bn(conv2d(x, sd["conv1.weight"]), "bn1"), sd["prelu.weight"])
    stage = 1
    while f"layer{stage}.0.conv1.weight" in sd:
        block = 0
        while f"layer{stage}.{block}.conv1.weight" in sd:
            prefix, stride = f"layer{stage}.{block}.", 2 if block == 0 else 1
            out = prelu(
                bn(conv2d(bn(x, prefix + "bn1"), sd[prefix + "conv1.weight"]), prefix + "bn2"),
                sd[prefix + "prelu.weight"],
            )
            out = bn(conv2d(out, sd[prefix + "conv2.weight"], stride), prefix + "bn3")
            if block == 0:
                x = bn(conv2d(x, sd[prefix + "downsample.0.weight"], 2, (0, 0, 0, 0)), prefix + "downsample.1")
            x, block = x + out, block + 1
        stage += 1
    x = bn(x, "bn2").reshape(len(x), -1)  # NCHW flatten
    return bn(x @ sd["fc.weight"].T + sd["fc.bias"], "features")


@dataclasses.dataclass(frozen=True)
class MbfSpec:
    """A small arcface_torch ``MobileFaceNet``: ``stem`` width; ``first`` = ("grouped", groups) or ("residual", n);
    three (DepthWise hidden, width, Residual hidden, Residual blocks) stages; ``conv_sep`` width; GDC ``side``."""

    stem: int = 8
    first: tuple = ("grouped", 4)
    stages: tuple = ((8, 8, 8, 1), (16, 16, 16, 2), (32, 16, 16, 1))
    conv_sep: int = 32
    side: int = 2
    emb: int = 8


TINY_MBF = MbfSpec()


def _add_conv_block(sd, rng, prefix, in_channels, out_channels, kernel=1, groups=1, prelu_too=True):
    sd[prefix + "layers.0.weight"] = _conv_weight(rng, out_channels, in_channels // groups, kernel)
    _add_batch_norm(sd, rng, prefix + "layers.1", out_channels)
    if prelu_too:
        sd[prefix + "layers.2.weight"] = rng.uniform(0.1, 0.4, out_channels)


def _add_depthwise(sd, rng, prefix, in_channels, hidden, out_channels):
    _add_conv_block(sd, rng, prefix + "layers.0.", in_channels, hidden)
    _add_conv_block(sd, rng, prefix + "layers.1.", hidden, hidden, 3, groups=hidden)
    _add_conv_block(sd, rng, prefix + "layers.2.", hidden, out_channels, prelu_too=False)


def mbf_state_dict(rng, spec=TINY_MBF):
    """arcface_torch ``MobileFaceNet`` names and shapes for ``spec``."""
    sd = {}
    _add_conv_block(sd, rng, "layers.0.", 3, spec.stem, 3)
    if spec.first[0] == "grouped":
        _add_conv_block(sd, rng, "layers.1.", spec.stem, spec.stem, 3, groups=spec.first[1])
    else:
        for block in range(spec.first[1]):
            _add_depthwise(sd, rng, f"layers.1.layers.{block}.", spec.stem, spec.stem, spec.stem)
    channels = spec.stem
    for position, (down_hidden, width, hidden, repeats) in zip((2, 4, 6), spec.stages):
        _add_depthwise(sd, rng, f"layers.{position}.", channels, down_hidden, width)
        for block in range(repeats):
            _add_depthwise(sd, rng, f"layers.{position + 1}.layers.{block}.", width, hidden, width)
        channels = width
    _add_conv_block(sd, rng, "conv_sep.", channels, spec.conv_sep)
    _add_conv_block(sd, rng, "features.layers.0.", spec.conv_sep, spec.conv_sep, spec.side, spec.conv_sep, False)
    sd["features.layers.2.weight"] = rng.normal(0, 1 / math.sqrt(spec.conv_sep), (spec.emb, spec.conv_sep))
    _add_batch_norm(sd, rng, "features.layers.3", spec.emb)
    return _float32(sd)


def mbf_forward(sd, x, spec=TINY_MBF, calibrate=False):
    """arcface_torch ``MobileFaceNet.forward`` (eval mode) on NCHW ``x``."""

    def block(tensor, prefix, stride=1, groups=1, pads=None, prelu_too=True):
        weight = sd[prefix + "layers.0.weight"]
        tensor = batch_norm(conv2d(tensor, weight, stride, pads, groups), sd, prefix + "layers.1", calibrate=calibrate)
        return prelu(tensor, sd[prefix + "layers.2.weight"]) if prelu_too else tensor

    def depthwise(tensor, prefix, stride):
        hidden = block(
            block(tensor, prefix + "layers.0."),
            prefix + "layers.1.",
            stride,
            sd[prefix + "layers.1.layers.0.weight"].shape[0],
        )
        return block(hidden, prefix + "layers.2.", prelu_too=False)

    x = block(x, "layers.0.", 2)
    if spec.first[0] == "grouped":
        x = block(x, "layers.1.", groups=spec.first[1])
    else:
        for index in range(spec.first[1]):
            x = x + depthwise(x, f"layers.1.layers.{index}.", 1)
    for position, (_, _, _, repeats) in zip((2, 4, 6), spec.stages):
        x = depthwise(x, f"layers.{position}.", 2)
        for index in range(repeats):
            x = x + depthwise(x, f"layers.{position + 1}.layers.{index}.", 1)
    x = block(block(x, "conv_sep."), "features.layers.0.", groups=spec.conv_sep, pads=(0, 0, 0, 0), prelu_too=False)
    x = x.reshape(len(x), -1) @ sd["features.layers.2.weight"].T
    return batch_norm(x, sd, "features.layers.3", calibrate=calibrate)


def calibrated(state_dict, forward, images, **kwargs):
    """``state_dict`` with every batch norm's running statistics measured on ``images`` (NCHW), layer by layer."""
    state_dict = dict(state_dict)
    forward(state_dict, images, calibrate=True, **kwargs)
    return state_dict


# ---------------------------------------------------------------------------------------------------------
# PyTorch zip checkpoints, pickled opcode by opcode as torch.save writes a state dict (protocol 2)
# ---------------------------------------------------------------------------------------------------------
STORAGE_TYPES = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(np.int64): "LongStorage",
}


def _global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _text(value):
    raw = value.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(value):
    return b"J" + struct.pack("<i", value)


def _tuple(items):
    return b"(" + b"".join(items) + b"t"


def _tensor_opcodes(key, array, size, stride):
    """``torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())`` of storage ``key``."""
    storage = _tuple(
        [_text("storage"), _global("torch", STORAGE_TYPES[array.dtype]), _text(key), _text("cpu"), _int(array.size)]
    )
    hooks = _global("collections", "OrderedDict") + b")R"
    arguments = [storage + b"Q", _int(0), _tuple(map(_int, size)), _tuple(map(_int, stride)), b"\x89", hooks]
    return _global("torch._utils", "_rebuild_tensor_v2") + _tuple(arguments) + b"R"


def _contiguous_strides(shape):
    return tuple(int(np.prod(shape[index + 1 :])) for index in range(len(shape)))


def write_torch_checkpoint(path, state_dict, archive="archive", transposed=(), wrap=None):
    """A ``torch.save(state_dict)`` zip. Keys in ``transposed`` (2-D) are stored column-major with their strides, as a
    ``.t()`` view is saved; ``wrap`` nests the state dict in ``{wrap: state_dict, "epoch": 3}`` like a training
    checkpoint."""
    items, storages = [], {}
    for index, (name, value) in enumerate(state_dict.items()):
        value, key = np.asarray(value), str(index)
        if name in transposed:
            storages[key] = np.ascontiguousarray(value.T)
            stride = (1, value.shape[0])
        else:
            storages[key] = np.ascontiguousarray(value)
            stride = _contiguous_strides(value.shape)
        items.append(_text(name) + _tensor_opcodes(key, storages[key], value.shape, stride))
    body = _global("collections", "OrderedDict") + b")R(" + b"".join(items) + b"u"
    if wrap:
        body = b"}(" + _text(wrap) + body + _text("epoch") + _int(3) + b"u"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zip_file:
        zip_file.writestr(f"{archive}/data.pkl", b"\x80\x02" + body + b".")
        zip_file.writestr(f"{archive}/byteorder", b"little")
        for key, array in storages.items():
            zip_file.writestr(f"{archive}/data/{key}", array.astype(array.dtype.newbyteorder("<")).tobytes())
        zip_file.writestr(f"{archive}/version", b"3\n")
    return path


def code_executing_pickle(target):
    """A pickle that calls ``builtins.open(target, "w")``: plain unpickling creates ``target``."""
    return b"\x80\x02" + _global("builtins", "open") + _tuple([_text(str(target)), _text("w")]) + b"R."


def write_code_executing_checkpoint(path, marker):
    """A checkpoint zip whose ``data.pkl`` is ``code_executing_pickle(marker)``."""
    with zipfile.ZipFile(path, "w") as zip_file:
        zip_file.writestr("archive/data.pkl", code_executing_pickle(marker))
        zip_file.writestr("archive/version", b"3\n")
    return path


# ---------------------------------------------------------------------------------------------------------
# insightface ONNX graphs
# ---------------------------------------------------------------------------------------------------------
class _OnnxWriter:
    """Nodes and initializers of a graph being written; unnamed weights get torch.onnx.export's ``onnx::Op_N``."""

    def __init__(self):
        import onnx

        self.onnx, self.nodes, self.initializers, self.counter = onnx, [], [], 100

    def constant(self, value, name=None, kind="Conv", dtype=np.float32):
        if name is None:
            self.counter += 1
            name = f"onnx::{kind}_{self.counter}"
        self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def node(self, op_type, inputs, name, **attributes):
        output = f"{name}_output_0"
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, [output], name=name, **attributes))
        return output

    def conv(self, tensor, weight, name, bias=None, stride=1, pads=None, groups=1):
        kernel = weight.shape[-1]
        inputs = [tensor, self.constant(weight)] + ([self.constant(bias)] if bias is not None else [])
        pads = pads if pads is not None else [kernel // 2] * 4
        attributes = dict(
            dilations=[1, 1], group=groups, kernel_shape=[kernel, kernel], pads=pads, strides=[stride] * 2
        )
        return self.node("Conv", inputs, name + "/Conv", **attributes)

    def folded_conv(self, tensor, sd, conv, bn, name, eps=1e-5, **kwargs):
        """A conv followed by a batch norm, folded as torch.onnx.export does in eval mode."""
        scale = sd[bn + ".weight"].astype(np.float64) / np.sqrt(sd[bn + ".running_var"].astype(np.float64) + eps)
        weight = sd[conv + ".weight"] * scale[:, None, None, None]
        bias = sd[bn + ".bias"] - sd[bn + ".running_mean"] * scale
        return self.conv(tensor, weight, name, bias, **kwargs)

    def batch_norm(self, tensor, sd, bn, name, eps=1e-5):
        keys = ("weight", "bias", "running_mean", "running_var")
        inputs = [tensor] + [self.constant(sd[f"{bn}.{key}"], f"{bn}.{key}") for key in keys]
        return self.node("BatchNormalization", inputs, name + "/BatchNormalization", epsilon=eps, momentum=0.9)

    def prelu(self, tensor, slope, name):
        return self.node("PRelu", [tensor, self.constant(slope.reshape(-1, 1, 1), kind="PRelu")], name + "/PRelu")

    def model(self, output, side, opset=11, producer="pytorch"):
        helper, onnx = self.onnx.helper, self.onnx
        data = helper.make_tensor_value_info("data", onnx.TensorProto.FLOAT, ["None", 3, side, side])
        result = helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, ["None", None])
        graph = helper.make_graph(self.nodes, "main_graph", [data], [result], self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name=producer)
        onnx.checker.check_model(model)
        return model


def torch_iresnet_onnx(sd, side):
    """``torch.onnx.export`` of an eval-mode arcface_torch IResNet (input ``side`` x ``side``)."""
    writer = _OnnxWriter()
    x = writer.folded_conv("data", sd, "conv1", "bn1", "/conv1")
    x = writer.prelu(x, sd["prelu.weight"], "/prelu")
    stage = 1
    while f"layer{stage}.0.conv1.weight" in sd:
        block = 0
        while f"layer{stage}.{block}.conv1.weight" in sd:
            prefix, name = f"layer{stage}.{block}.", f"/layer{stage}/layer{stage}.{block}"
            out = writer.batch_norm(x, sd, prefix + "bn1", name + "/bn1")
            out = writer.folded_conv(out, sd, prefix + "conv1", prefix + "bn2", name + "/conv1")
            out = writer.prelu(out, sd[prefix + "prelu.weight"], name + "/prelu")
            out = writer.folded_conv(
                out, sd, prefix + "conv2", prefix + "bn3", name + "/conv2", stride=2 if block == 0 else 1
            )
            if block == 0:
                x = writer.folded_conv(
                    x,
                    sd,
                    prefix + "downsample.0",
                    prefix + "downsample.1",
                    name + "/downsample.0",
                    stride=2,
                    pads=[0] * 4,
                )
            x, block = writer.node("Add", [out, x], name + "/Add"), block + 1
        stage += 1
    x = writer.node("Flatten", [writer.batch_norm(x, sd, "bn2", "/bn2")], "/Flatten", axis=1)
    x = writer.node(
        "Gemm",
        [x, writer.constant(sd["fc.weight"], "fc.weight"), writer.constant(sd["fc.bias"], "fc.bias")],
        "/fc/Gemm",
        alpha=1.0,
        beta=1.0,
        transB=1,
    )
    return writer.model(writer.batch_norm(x, sd, "features", "/features"), side)


def _torch_depthwise(writer, x, sd, prefix, stride):
    hidden = sd[prefix + "layers.1.layers.0.weight"].shape[0]
    for index, (kind, kwargs) in enumerate(
        (("expand", {}), ("dw", dict(stride=stride, groups=hidden)), ("project", {}))
    ):
        sub = f"{prefix}layers.{index}."
        x = writer.folded_conv(
            x, sd, sub + "layers.0", sub + "layers.1", "/" + sub.replace(".", "/") + "Conv", **kwargs
        )
        if kind != "project":
            x = writer.prelu(x, sd[sub + "layers.2.weight"], "/" + sub.replace(".", "/") + "PRelu")
    return x


def torch_mbf_onnx(sd, spec=TINY_MBF):
    """``torch.onnx.export`` of an eval-mode arcface_torch MobileFaceNet, its ``x.view(x.size(0), -1)`` exported with
    a dynamic batch (``Shape`` -> ``Gather`` -> ``Unsqueeze`` -> ``Concat`` -> ``Reshape``), its bias-free Linear as a
    ``MatMul`` with the transposed weight."""
    writer = _OnnxWriter()

    def conv_block(x, prefix, stride=1, groups=1):
        x = writer.folded_conv(
            x, sd, prefix + "layers.0", prefix + "layers.1", "/" + prefix, stride=stride, groups=groups
        )
        return writer.prelu(x, sd[prefix + "layers.2.weight"], "/" + prefix)

    x = conv_block("data", "layers.0.", 2)
    if spec.first[0] == "grouped":
        x = conv_block(x, "layers.1.", groups=spec.first[1])
    else:
        for index in range(spec.first[1]):
            x = writer.node(
                "Add", [x, _torch_depthwise(writer, x, sd, f"layers.1.layers.{index}.", 1)], f"/layers.1/{index}/Add"
            )
    for position, (_, _, _, repeats) in zip((2, 4, 6), spec.stages):
        x = _torch_depthwise(writer, x, sd, f"layers.{position}.", 2)
        for index in range(repeats):
            x = writer.node(
                "Add",
                [x, _torch_depthwise(writer, x, sd, f"layers.{position + 1}.layers.{index}.", 1)],
                f"/layers.{position + 1}/{index}/Add",
            )
    x = conv_block(x, "conv_sep.")
    x = writer.folded_conv(
        x,
        sd,
        "features.layers.0.layers.0",
        "features.layers.0.layers.1",
        "/features/gdc",
        groups=spec.conv_sep,
        pads=[0] * 4,
    )
    batch = writer.node(
        "Gather",
        [writer.node("Shape", [x], "/features/Shape"), writer.constant(0, "gather_0", dtype=np.int64)],
        "/features/Gather",
        axis=0,
    )
    batch = writer.node("Unsqueeze", [batch], "/features/Unsqueeze", axes=[0])
    shape = writer.node(
        "Concat", [batch, writer.constant([-1], "minus_one", dtype=np.int64)], "/features/Concat", axis=0
    )
    x = writer.node("Reshape", [x, shape], "/features/Reshape")
    x = writer.node("MatMul", [x, writer.constant(sd["features.layers.2.weight"].T, kind="MatMul")], "/features/MatMul")
    return writer.model(writer.batch_norm(x, sd, "features.layers.3", "/features/layers.3"), spec.side << 4)


def mxnet_iresnet_onnx(sd, side, eps=2e-5):
    """MXNet's ONNX converter on an insightface ``fresnet`` (``arcface_r100_v1`` layout): ``_minusscalar0`` (Sub
    127.5) and ``_mulscalar0`` (Mul 0.0078125) at the input, convolutions without bias each followed by its
    ``BatchNormalization`` node (epsilon 2e-5), PReLU ``relu`` nodes, ``conv1sc`` / ``sc`` shortcuts, a ``Dropout``,
    ``pre_fc1`` as Flatten + Gemm, ``fc1`` batch norm. Initializers are named after MXNet's arguments."""
    writer = _OnnxWriter()

    def mx_batch_norm(x, bn, name):
        inputs = [x] + [
            writer.constant(sd[f"{bn}.{key}"], f"{name}_{mx}")
            for key, mx in (
                ("weight", "gamma"),
                ("bias", "beta"),
                ("running_mean", "moving_mean"),
                ("running_var", "moving_var"),
            )
        ]
        return writer.node("BatchNormalization", inputs, name, epsilon=eps, momentum=0.9)

    def mx_conv(x, conv, name, stride=1, pads=None):
        kernel = sd[conv + ".weight"].shape[-1]
        pads = pads if pads is not None else [kernel // 2] * 4
        inputs = [x, writer.constant(sd[conv + ".weight"], name + "_weight")]
        return writer.node(
            "Conv", inputs, name, dilations=[1, 1], group=1, kernel_shape=[kernel] * 2, pads=pads, strides=[stride] * 2
        )

    def mx_prelu(x, prelu_name, name):
        return writer.node(
            "PRelu", [x, writer.constant(sd[prelu_name + ".weight"].reshape(-1, 1, 1), name + "_gamma")], name
        )

    x = writer.node("Sub", ["data", writer.constant(np.float32(127.5), "_minusscalar0_second")], "_minusscalar0")
    x = writer.node("Mul", [x, writer.constant(np.float32(0.0078125), "_mulscalar0_second")], "_mulscalar0")
    x = mx_prelu(mx_batch_norm(mx_conv(x, "conv1", "conv0"), "bn1", "bn0"), "prelu", "relu0")
    stage, unit_index = 1, 1
    while f"layer{stage}.0.conv1.weight" in sd:
        block = 0
        while f"layer{stage}.{block}.conv1.weight" in sd:
            prefix, unit = f"layer{stage}.{block}.", f"stage{stage}_unit{block + 1}"
            out = mx_conv(mx_batch_norm(x, prefix + "bn1", unit + "_bn1"), prefix + "conv1", unit + "_conv1")
            out = mx_prelu(mx_batch_norm(out, prefix + "bn2", unit + "_bn2"), prefix + "prelu", unit + "_relu1")
            out = mx_batch_norm(
                mx_conv(out, prefix + "conv2", unit + "_conv2", 2 if block == 0 else 1), prefix + "bn3", unit + "_bn3"
            )
            if block == 0:
                x = mx_batch_norm(
                    mx_conv(x, prefix + "downsample.0", unit + "_conv1sc", 2, [0] * 4),
                    prefix + "downsample.1",
                    unit + "_sc",
                )
            x, block, unit_index = writer.node("Add", [out, x], f"_plus{unit_index}"), block + 1, unit_index + 1
        stage += 1
    x = writer.node("Dropout", [mx_batch_norm(x, "bn2", "bn1")], "dropout0")
    x = writer.node("Flatten", [x], "pre_fc1_flatten", axis=1)
    inputs = [x, writer.constant(sd["fc.weight"], "pre_fc1_weight"), writer.constant(sd["fc.bias"], "pre_fc1_bias")]
    x = writer.node("Gemm", inputs, "pre_fc1", alpha=1.0, beta=1.0, transA=0, transB=1)
    return writer.model(mx_batch_norm(x, "features", "fc1"), side, producer="mxnet")


# ---------------------------------------------------------------------------------------------------------
# Keras_insightface .h5 basic models: replicas of the upstream networks, saved in tf-keras' layout
# ---------------------------------------------------------------------------------------------------------
def _upstream_conv(x, filters, kernel, strides, name):
    """Keras_insightface's IResNet conv: a 3x3 conv is ``ZeroPadding2D(1)`` + "valid" (PyTorch's padding)."""
    if kernel == 3:
        x = keras.layers.ZeroPadding2D(((1, 1), (1, 1)))(x)
    return keras.layers.Conv2D(filters, kernel, strides, padding="valid", use_bias=False, name=name + "conv")(x)


def _upstream_bn(x, name, momentum=0.9, epsilon=1e-5):
    return keras.layers.BatchNormalization(momentum=momentum, epsilon=epsilon, name=name)(x)


def _upstream_activation(x, name, activation):
    if activation == "PReLU":
        return keras.layers.PReLU(shared_axes=[1, 2], name=name + "PReLU")(x)
    return keras.layers.Activation("relu", name=name + "relu")(x)


def _upstream_head(nn, output_layer, emb, use_bias, scale):
    """Keras_insightface ``buildin_models`` heads: E (``E_batchnorm``, ``E_flatten``, ``E_dense``), GAP, F or GDC."""
    if output_layer == "E":
        nn = keras.layers.BatchNormalization(name="E_batchnorm")(nn)
        nn = keras.layers.Dense(emb, use_bias=use_bias, name="E_dense")(keras.layers.Flatten(name="E_flatten")(nn))
    elif output_layer == "GAP":
        nn = keras.layers.GlobalAveragePooling2D(name="GAP_pool")(
            keras.layers.BatchNormalization(name="GAP_batchnorm")(nn)
        )
        nn = keras.layers.Dense(emb, use_bias=use_bias, name="GAP_dense")(nn)
    elif output_layer == "F":
        nn = keras.layers.Dense(emb, use_bias=use_bias, name="F_dense")(keras.layers.Flatten(name="F_flatten")(nn))
    else:
        nn = keras.layers.DepthwiseConv2D(nn.shape[1], use_bias=False, name="GDC_dw")(nn)
        nn = keras.layers.BatchNormalization(name="GDC_batchnorm")(nn)
        nn = keras.layers.Conv2D(emb, 1, use_bias=use_bias, name="GDC_conv")(nn)
        nn = keras.layers.Flatten(name="GDC_flatten")(nn)
    nn = keras.layers.BatchNormalization(scale=scale, name="pre_embedding")(nn)
    return keras.layers.Activation("linear", dtype="float32", name="embedding")(nn)


def keras_insightface_iresnet(
    blocks=(1, 2, 1, 1), widths=(8, 8, 16, 16), emb=16, size=32, activation="PReLU", head="E"
):
    """Keras_insightface's IResNet (``0_conv`` / ``0_bn`` / ``0_PReLU``, ``stack{i}_block{j}_...``) + E head."""
    inputs = keras.Input((size, size, 3))
    nn = _upstream_activation(_upstream_bn(_upstream_conv(inputs, widths[0], 3, 1, "0_"), "0_bn"), "0_", activation)
    for stage, (repeats, filters) in enumerate(zip(blocks, widths), 1):
        for block in range(1, repeats + 1):
            name, strides = f"stack{stage}_block{block}", 2 if block == 1 else 1
            shortcut = nn
            if block == 1:
                shortcut = _upstream_bn(
                    _upstream_conv(nn, filters, 1, strides, name + "_shortcut_"), name + "_shortcut_bn"
                )
            x = _upstream_conv(_upstream_bn(nn, name + "_1_bn"), filters, 3, 1, name + "_1_")
            x = _upstream_activation(_upstream_bn(x, name + "_2_bn"), name + "_2_", activation)
            x = _upstream_bn(_upstream_conv(x, filters, 3, strides, name + "_2_"), name + "_3_bn")
            nn = keras.layers.Add(name=name + "_add")([shortcut, x])
    return keras.Model(inputs, _upstream_head(nn, head, emb, head != "E", True), name="ResNet")


def _upstream_se(inputs, name):
    """Keras_insightface's MobileFaceNet squeeze-and-excitation (``se_1_conv``, ``se_prelu``, ``se_2_conv``)."""
    channels = inputs.shape[-1]
    nn = keras.layers.GlobalAveragePooling2D(keepdims=True)(inputs)
    nn = keras.layers.Conv2D(max(1, channels // 16), 1, name=name + "1_conv")(nn)
    nn = keras.layers.PReLU(shared_axes=[1, 2], name=name + "prelu")(nn)
    nn = keras.layers.Activation("sigmoid")(keras.layers.Conv2D(channels, 1, name=name + "2_conv")(nn))
    return keras.layers.Multiply(name=name + "out")([inputs, nn])


def keras_insightface_mobilefacenet(
    stages=((16, 8, 2, 2), (32, 16, 1, 2), (32, 16, 2, 1), (32, 16, 1, 2)), emb=8, size=32, use_se=False, head="GDC"
):
    """Keras_insightface's MobileFaceNet (``stem_1_conv``, ``stem_2_separable``, stacks without residual on their
    first block, TensorFlow "same" padding) + its head: ``pw_conv`` / ``pw_bn`` / ``pw_relu`` and GDC with bias,
    ``pre_embedding`` without gamma."""

    def conv_bn_prelu(x, name, filters, kernel=1, strides=1, depthwise=False, activation=True):
        if depthwise:
            x = keras.layers.DepthwiseConv2D(kernel, strides, padding="same", use_bias=False, name=name + "depthwise")(
                x
            )
        else:
            x = keras.layers.Conv2D(filters, kernel, strides, padding="same", use_bias=False, name=name + "conv")(x)
        x = keras.layers.BatchNormalization(name=name + "bn")(x)
        return keras.layers.PReLU(shared_axes=[1, 2], name=name + "prelu")(x) if activation else x

    inputs = keras.Input((size, size, 3))
    nn = conv_bn_prelu(inputs, "stem_1_", 8, 3, 2)
    nn = keras.layers.SeparableConv2D(8, 3, padding="same", use_bias=False, name="stem_2_separable")(nn)
    nn = keras.layers.PReLU(shared_axes=[1, 2], name="stem_2_prelu")(
        keras.layers.BatchNormalization(name="stem_2_bn")(nn)
    )
    for stage, (hidden, width, repeats, strides) in enumerate(stages, 1):
        for block in range(1, repeats + 1):
            name = f"stack{stage}_block{block}_"
            x = conv_bn_prelu(nn, name + "1_", hidden)
            x = conv_bn_prelu(x, name + "2_", 0, 3, strides if block == 1 else 1, depthwise=True)
            x = conv_bn_prelu(x, name + "3_", width, activation=False)
            x = _upstream_se(x, name + "se_") if use_se else x
            nn = keras.layers.Add()([nn, x]) if block > 1 else x
    nn = keras.layers.BatchNormalization(name="pw_bn")(keras.layers.Conv2D(512, 1, use_bias=False, name="pw_conv")(nn))
    nn = keras.layers.Activation("relu", name="pw_relu")(nn)
    return keras.Model(inputs, _upstream_head(nn, head, emb, True, False), name="mobile_facenet")


def randomize_weights(model, rng):
    """Random weights of sensible scales: kernels He-normal, batch norms near identity, PReLU slopes 0.1-0.4."""
    for layer in model.layers:
        values = []
        for weight in layer.weights:
            shape, name = tuple(weight.shape), weight.name
            if name in ("gamma", "moving_variance"):
                values.append(rng.uniform(0.5, 1.5, shape))
            elif name in ("beta", "moving_mean", "bias"):
                values.append(rng.uniform(-0.2, 0.2, shape))
            elif name == "alpha":
                values.append(rng.uniform(0.1, 0.4, shape))
            else:
                fan_in = (
                    int(np.prod(shape[:-1]))
                    if "depthwise" not in name and not isinstance(layer, keras.layers.DepthwiseConv2D)
                    else int(np.prod(shape[:2]))
                )
                values.append(rng.normal(0, math.sqrt(2 / fan_in), shape))
        layer.set_weights([value.astype(np.float32) for value in values])
    return model


TF_KERAS_WEIGHT_NAMES = {"DepthwiseConv2D": {"kernel": "depthwise_kernel"}}


def _keras2_layer_config(layer):
    """A layer as tf-keras' ``model_config`` lists it (the fields Keras_insightface's files hold)."""
    config = {key: value for key, value in layer.get_config().items() if not isinstance(value, dict)}
    config.pop("dtype", None)
    if isinstance(layer, keras.layers.InputLayer):
        config = {"batch_input_shape": [None, *layer.output.shape[1:]], "dtype": "float32", "name": layer.name}
    inbound = [
        [[tensor._keras_history[0].name, 0, 0, {}] for tensor in keras.tree.flatten(node.input_tensors)]
        for node in layer._inbound_nodes
        if node.input_tensors
    ]
    return {"class_name": type(layer).__name__, "config": config, "name": layer.name, "inbound_nodes": inbound}


def write_keras2_h5(path, model, keras_version="2.9.0"):
    """``model`` saved as tf-keras 2 saves a whole model to ``.h5``: root attributes ``keras_version``, ``backend``,
    ``model_config``; ``model_weights/<layer>`` groups with ``weight_names`` and datasets ``<layer>/<weight>:0``."""
    config = {
        "class_name": "Functional",
        "config": {"name": model.name, "layers": [_keras2_layer_config(ll) for ll in model.layers]},
    }
    with h5py.File(path, "w") as h5_file:
        h5_file.attrs["keras_version"], h5_file.attrs["backend"] = keras_version, "tensorflow"
        h5_file.attrs["model_config"] = json.dumps(config)
        group = h5_file.create_group("model_weights")
        group.attrs["layer_names"] = [layer.name.encode() for layer in model.layers]
        group.attrs["backend"], group.attrs["keras_version"] = b"tensorflow", keras_version.encode()
        for layer in model.layers:
            layer_group = group.create_group(layer.name)
            renames = TF_KERAS_WEIGHT_NAMES.get(type(layer).__name__, {})
            names = [f"{layer.name}/{renames.get(weight.name, weight.name)}:0" for weight in layer.weights]
            layer_group.attrs["weight_names"] = [name.encode() for name in names]
            for name, weight in zip(names, layer.weights):
                layer_group.create_dataset(name, data=keras.ops.convert_to_numpy(weight))
    return path

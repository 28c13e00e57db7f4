"""insightface model-zoo ONNX graphs read back into arcface_torch state dicts (``{name: array}``, PyTorch layouts).

Both exporters of the zoo's recognition models are understood: ``torch.onnx.export`` of arcface_torch networks in
eval mode (a batch norm that follows a convolution is folded into the convolution's weights and bias; one that
precedes a convolution stays a ``BatchNormalization`` node; PReLU slopes shaped (C, 1, 1); ``Flatten`` + ``Gemm``)
and MXNet's converter (``arcface_r100_v1``: every batch norm a node, and the input normalization baked in as
``Sub`` / ``Mul`` nodes at the input). The graph is walked from its input into a nested list of units (a conv with
its batch norm and PReLU, a residual block, the head), which an architecture reader names as arcface_torch would:
``IResNet`` (``conv1``, ``layer{s}.{k}.bn1`` ...) or ``MobileFaceNet`` (``layers.{i}.layers...``). Anything else
stops with one line naming the node and its op. Needs the ``onnx`` package.
"""

import collections
import dataclasses
import os

import numpy as np

# nodes that pass their first input through unchanged at inference
PASS_THROUGH_OPS = ("Identity", "Dropout")
TORCH_BN_EPSILON = 1e-5
TORCH_BN_MOMENTUM = 0.9  # PyTorch's momentum 0.1 weighs the new batch, Keras' 0.9 the running value


class UnsupportedGraphError(ValueError):
    """The graph holds an op or a layout this reader does not map to a known architecture."""


@dataclasses.dataclass
class ConvUnit:
    """A convolution with the batch norm after it (folded or not) and an optional PReLU, in PyTorch layouts."""

    node: str
    kernel: np.ndarray  # (out, in / group, kh, kw): its shape tells a depthwise conv
    strides: tuple
    pads: tuple
    batch_norm: dict  # weight, bias, running_mean, running_var, eps
    prelu: np.ndarray | None = None


@dataclasses.dataclass
class Block:
    """A residual block: ``main`` and ``shortcut`` (None: identity) unit lists, added together."""

    node: str
    main: list
    shortcut: list | None


@dataclasses.dataclass
class Unit:
    """Any other unit: ``kind`` is ``batch_norm``, ``prelu``, ``flatten`` or ``dense`` (weight (out, in), bias)."""

    node: str
    kind: str
    values: dict


def _onnx(path):
    try:
        import onnx
    except ImportError as err:
        raise ImportError(f"{path}: reading ONNX models needs the onnx package: pip install onnx") from err
    return onnx


def load_onnx(path):
    """The ``onnx.ModelProto`` of ``path``; a file that is not one is a one-line ValueError."""
    onnx = _onnx(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX model not found: {path}")
    try:
        return onnx.load(path)
    except Exception as err:  # protobuf raises its own DecodeError types
        raise ValueError(f"{path}: not an ONNX model ({type(err).__name__}: {err})") from err


def input_is_channels_first(model):
    """True when the graph's image input is NCHW with 3 channels, the layout of insightface's recognition models."""
    inputs = value_inputs(model.graph)
    dims = inputs[0].type.tensor_type.shape.dim if inputs else []
    return len(dims) == 4 and dims[1].dim_value == 3


def is_insightface_graph(path):
    """True when ``path`` parses as ONNX and takes NCHW 3-channel images (insightface's recognition models, which
    this module imports); False without the ``onnx`` package or for other graphs (e.g. NHWC exports of this
    library), which run as they are in onnxruntime."""
    try:
        return input_is_channels_first(load_onnx(path))
    except (ImportError, ValueError, OSError):
        return False


def normalizes_input(path):
    """True when the graph normalizes its input itself (``Sub`` / ``Mul`` nodes at the input, MXNet exports): it is
    fed 0..255 pixels; PyTorch exports are fed ``(x - 127.5) / 127.5``."""
    graph = Graph(load_onnx(path), path)
    return input_affine(graph)[2] != graph.input


def value_inputs(graph):
    initializers = {init.name for init in graph.initializer}
    return [value for value in graph.input if value.name not in initializers]


class Graph:
    """Constants and consumers of an ONNX graph's tensors, with pass-through nodes and shape computations skipped."""

    def __init__(self, model, path):
        onnx = _onnx(path)
        self.path, graph = path, model.graph
        self.constants = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
        self.alias, self.users, self.producer = {}, collections.defaultdict(list), {}
        for node in graph.node:
            inputs = [self.resolve(name) for name in node.input]
            self.producer.update((name, node) for name in node.output)
            if node.op_type == "Constant":
                value = next(iter(node_attributes(node).values()), None)  # value, value_float, value_ints ...
                is_tensor = isinstance(value, onnx.TensorProto)
                self.constants[node.output[0]] = onnx.numpy_helper.to_array(value) if is_tensor else np.asarray(value)
            elif node.op_type in PASS_THROUGH_OPS or (node.op_type == "Cast" and inputs[0] in self.constants):
                self.alias[node.output[0]] = inputs[0]
            elif node.op_type != "Shape":  # a shape computation reads no values
                for name in inputs:
                    if name and name not in self.constants:
                        self.users[name].append(node)
        self.input = value_inputs(graph)[0].name
        self.output = self.resolve(graph.output[0].name)

    def resolve(self, name):
        while name in self.alias:
            name = self.alias[name]
        return name

    def constant(self, node, index):
        """Input ``index`` of ``node`` as a float32 array; it must be a constant."""
        name = self.resolve(node.input[index]) if index < len(node.input) else ""
        if name not in self.constants:
            raise UnsupportedGraphError(
                f"{self.path}: node '{node.name}' ({node.op_type}): input {index} is not a constant"
            )
        return np.asarray(self.constants[name], dtype=np.float32)

    def single_user(self, tensor, op_type):
        """The node reading ``tensor`` when it is the only one and of ``op_type``, else None."""
        users = self.users[tensor]
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None

    def unsupported(self, node, where):
        return UnsupportedGraphError(f"{self.path}: unsupported op {node.op_type} at node '{node.name}' ({where})")


def node_attributes(node):
    import onnx

    return {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}


def _is_join(graph, node):
    """An ``Add`` of two computed tensors: the end of a residual block."""
    return node.op_type == "Add" and all(graph.resolve(name) not in graph.constants for name in node.input)


# ---------------------------------------------------------------------------------------------------------
# Reading the units of the graph
# ---------------------------------------------------------------------------------------------------------
def batch_norm_values(graph, node):
    attributes = node_attributes(node)
    if attributes.get("training_mode", 0):
        raise UnsupportedGraphError(f"{graph.path}: node '{node.name}' is a batch norm in training mode")
    names = ("weight", "bias", "running_mean", "running_var")
    values = {name: graph.constant(node, index) for index, name in enumerate(names, 1)}
    values["eps"] = float(attributes.get("epsilon", TORCH_BN_EPSILON))
    values["momentum"] = float(attributes.get("momentum", TORCH_BN_MOMENTUM))
    return values


def _identity_batch_norm(channels, bias=None):
    """Batch-norm values that compute ``x + bias``: what a convolution with a folded batch norm becomes."""
    eps = TORCH_BN_EPSILON
    bias = np.zeros(channels, np.float32) if bias is None else bias
    ones = np.ones(channels, np.float32)
    values = {"weight": ones, "bias": bias, "running_mean": 0 * ones, "running_var": ones - eps}
    return {**values, "eps": eps, "momentum": TORCH_BN_MOMENTUM}


def _read_conv(graph, node):
    """A ``Conv`` node with the batch norm and the PReLU that follow it alone: ``(ConvUnit, output tensor)``."""
    attributes = node_attributes(node)
    dilated = any(dilation != 1 for dilation in attributes.get("dilations", [1]))
    if attributes.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or dilated:
        raise UnsupportedGraphError(
            f"{graph.path}: node '{node.name}': auto_pad / dilated convolutions are not supported"
        )
    kernel = graph.constant(node, 1)
    bias = graph.constant(node, 2) if len(node.input) > 2 and node.input[2] else None
    tensor = node.output[0]
    batch_norm_node = graph.single_user(tensor, "BatchNormalization")
    if batch_norm_node is None:
        batch_norm = _identity_batch_norm(kernel.shape[0], bias)
    else:
        batch_norm, tensor = batch_norm_values(graph, batch_norm_node), batch_norm_node.output[0]
        if bias is not None:  # BN(conv + b) == BN with its mean moved by b
            batch_norm["running_mean"] = batch_norm["running_mean"] - bias
    unit = ConvUnit(
        node.name,
        kernel,
        tuple(attributes.get("strides", (1, 1))),
        tuple(attributes.get("pads", (0, 0, 0, 0))),
        batch_norm,
    )
    prelu_node = graph.single_user(tensor, "PRelu")
    if prelu_node is not None:
        unit.prelu, tensor = _prelu_slope(graph, prelu_node, kernel.shape[0]), prelu_node.output[0]
    return unit, tensor


def _prelu_slope(graph, node, channels):
    """The per-channel slope of a ``PRelu`` node: shaped (C, 1, 1), (1, C, 1, 1) or a single shared value."""
    slope = graph.constant(node, 1)
    per_channel = slope.ndim >= 3 and slope.shape[-3] == channels and slope.size == channels
    if not (per_channel or slope.size == 1):
        raise UnsupportedGraphError(
            f"{graph.path}: node '{node.name}': PReLU slope of shape {slope.shape} for {channels} channels"
        )
    return np.broadcast_to(slope.reshape(-1), (channels,)).astype(np.float32)


def _read_dense(graph, node):
    """A ``Gemm`` (``transB``, ``alpha``, ``beta``) or a ``MatMul`` [+ constant ``Add``]: weight (out, in), bias."""
    if node.op_type == "Gemm":
        attributes = node_attributes(node)
        if attributes.get("transA", 0):
            raise UnsupportedGraphError(f"{graph.path}: node '{node.name}': Gemm with transA is not supported")
        weight = graph.constant(node, 1)
        weight = (weight if attributes.get("transB", 0) else weight.T) * attributes.get("alpha", 1.0)
        bias = graph.constant(node, 2) * attributes.get("beta", 1.0) if len(node.input) > 2 and node.input[2] else None
        return Unit(node.name, "dense", {"weight": weight, "bias": bias}), node.output[0]
    weight, tensor, bias = graph.constant(node, 1).T, node.output[0], None
    add_node = graph.single_user(tensor, "Add")
    if add_node is not None and not _is_join(graph, add_node):
        bias, tensor = graph.constant(add_node, 1), add_node.output[0]
    return Unit(node.name, "dense", {"weight": weight, "bias": bias}), tensor


def _read_unit(graph, node):
    """One unit starting at ``node``: ``(unit, output tensor)``."""
    if node.op_type == "Conv":
        return _read_conv(graph, node)
    if node.op_type == "BatchNormalization":
        return Unit(node.name, "batch_norm", batch_norm_values(graph, node)), node.output[0]
    if node.op_type == "PRelu":
        return Unit(node.name, "prelu", {"slope": graph.constant(node, 1)}), node.output[0]
    if node.op_type in ("Flatten", "Reshape"):
        if node.op_type == "Flatten" and node_attributes(node).get("axis", 1) != 1:
            raise graph.unsupported(node, "a Flatten that keeps more than the batch axis")
        return Unit(node.name, "flatten", {}), node.output[0]
    if node.op_type in ("Gemm", "MatMul"):
        return _read_dense(graph, node)
    raise graph.unsupported(node, "not part of an IResNet or a MobileFaceNet")


def _walk(graph, tensor, start=None):
    """Units from ``tensor`` (or from the node ``start`` reading it) until the graph output or a residual ``Add``;
    returns ``(units, last tensor)``."""
    units = []
    if start is not None:
        unit, tensor = _read_unit(graph, start)
        units.append(unit)
    while tensor != graph.output:
        users = graph.users[tensor]
        if not users:
            raise UnsupportedGraphError(f"{graph.path}: tensor '{tensor}' leads nowhere (after '{units[-1].node}')")
        if len(users) == 1 and _is_join(graph, users[0]):
            break
        if len(users) == 1:
            unit, tensor = _read_unit(graph, users[0])
        else:
            unit, tensor = _read_block(graph, tensor, users)
        units.append(unit)
    return units, tensor


def _read_block(graph, tensor, users):
    """The residual block forking at ``tensor``: the longer branch is the main one, the other (or ``tensor`` itself)
    the shortcut; both must meet in one ``Add``."""
    joins = [node for node in users if _is_join(graph, node)]
    branches = [_walk(graph, tensor, node) for node in users if not _is_join(graph, node)]
    ends = {end for _, end in branches} | ({tensor} if joins else set())
    adds = {id(node): node for _, end in branches for node in graph.users[end]} | {id(node): node for node in joins}
    if len(branches) + len(joins) != 2 or len(ends) != 2 or len(adds) != 1:
        raise UnsupportedGraphError(
            f"{graph.path}: the branches from '{tensor}' do not form a residual block (one branch or a"
            " conv shortcut, added once)"
        )
    branches.sort(key=lambda branch: -len(branch[0]))
    add = next(iter(adds.values()))
    shortcut = branches[1][0] if len(branches) == 2 else None
    return Block(add.name, branches[0][0], shortcut), add.output[0]


def input_affine(graph):
    """``(scale, offset, first tensor)``: the per-channel ``x * scale + offset`` that ``Sub`` / ``Mul`` / ``Div`` /
    ``Add`` nodes with constants apply at the input (MXNet exports), ``(1, 0)`` when there are none."""
    scale, offset, tensor = np.ones(3), np.zeros(3), graph.input
    while len(graph.users[tensor]) == 1 and graph.users[tensor][0].op_type in ("Sub", "Mul", "Div", "Add"):
        node = graph.users[tensor][0]
        if graph.resolve(node.input[0]) != tensor or graph.resolve(node.input[1]) not in graph.constants:
            break
        value = graph.constant(node, 1)
        if not (value.size == 1 or (value.ndim >= 3 and value.shape[-3] == 3 and value.size == 3)):
            raise UnsupportedGraphError(f"{graph.path}: node '{node.name}': an input constant of shape {value.shape}")
        value = np.broadcast_to(value.reshape(-1), (3,)).astype(np.float64)
        if node.op_type == "Sub":
            offset = offset - value
        elif node.op_type == "Add":
            offset = offset + value
        else:
            factor = value if node.op_type == "Mul" else 1 / value
            scale, offset = scale * factor, offset * factor
        tensor = node.output[0]
    return scale, offset, tensor


# ---------------------------------------------------------------------------------------------------------
# Naming the units as arcface_torch does
# ---------------------------------------------------------------------------------------------------------
class _Namer:
    """Consumes units in order, checks each is what the architecture has there, and records arcface_torch names
    (``state_dict``, ``batch_norms``), shared with the namers of nested blocks (``inner``)."""

    def __init__(self, path, units, architecture, state_dict=None, batch_norms=None):
        self.path, self.units, self.position, self.architecture = path, units, 0, architecture
        self.state_dict = {} if state_dict is None else state_dict
        self.batch_norms = {} if batch_norms is None else batch_norms

    def inner(self, units, architecture):
        return _Namer(self.path, units, architecture, self.state_dict, self.batch_norms)

    def fail(self, expected):
        unit = self.units[self.position] if self.position < len(self.units) else None
        found = f"node '{unit.node}' ({getattr(unit, 'kind', type(unit).__name__)})" if unit else "the end"
        return UnsupportedGraphError(f"{self.path}: expected {expected} of an {self.architecture}, found {found}")

    def peek(self, kind):
        unit = self.units[self.position] if self.position < len(self.units) else None
        matches = isinstance(unit, Unit) and unit.kind == kind if isinstance(kind, str) else isinstance(unit, kind)
        return unit if matches else None

    def take(self, kind, expected):
        unit = self.peek(kind)
        if unit is None:
            raise self.fail(expected)
        self.position += 1
        return unit

    def conv(self, expected, names, strides=1, padding="same"):
        """Take a ConvUnit and record it as ``names`` = (conv, batch norm[, PReLU]); checks its strides,
        its padding (symmetric ``kernel // 2``, or none for ``"valid"``) and that it has a PReLU exactly when named
        one."""
        unit = self.take(ConvUnit, expected)
        pad = unit.kernel.shape[-1] // 2 if padding == "same" else 0
        if unit.strides != (strides, strides) or set(unit.pads) != {pad}:
            raise UnsupportedGraphError(
                f"{self.path}: node '{unit.node}': strides {unit.strides}, pads {unit.pads} where an"
                f" {self.architecture} has strides {strides} and padding {pad} on every side"
            )
        if (unit.prelu is None) != (len(names) == 2):
            raise UnsupportedGraphError(
                f"{self.path}: node '{unit.node}': a PReLU is {'extra' if len(names) == 2 else 'missing'}"
            )
        self.state_dict[names[0] + ".weight"] = unit.kernel
        self.batch_norm(unit.batch_norm, names[1])
        if len(names) == 3:
            self.state_dict[names[2] + ".weight"] = unit.prelu

    def batch_norm(self, values, name):
        for key in ("weight", "bias", "running_mean", "running_var"):
            self.state_dict[f"{name}.{key}"] = values[key]
        self.batch_norms[name] = (values["eps"], values["momentum"])

    def done(self):
        if self.position != len(self.units):
            raise self.fail("the end")


def _sequence(prefix, count):
    """arcface_torch names of a ``Sequential`` of ``count`` modules: ``prefix.layers.0`` ..."""
    return tuple(f"{prefix}layers.{index}" for index in range(count))


def _name_iresnet_block(namer, block, prefix, first_of_stage):
    """``bn1``, ``conv1``/``bn2``/``prelu``, ``conv2``/``bn3`` and, starting a stage, ``downsample``."""
    main = namer.inner(block.main, "IResNet block")
    main.batch_norm(main.take("batch_norm", "a batch norm").values, prefix + "bn1")
    main.conv("a conv", (prefix + "conv1", prefix + "bn2", prefix + "prelu"))
    main.conv("a conv", (prefix + "conv2", prefix + "bn3"), strides=2 if first_of_stage else 1)
    main.done()
    if first_of_stage:
        shortcut = namer.inner(block.shortcut, "IResNet shortcut")
        shortcut.conv("a conv", (prefix + "downsample.0", prefix + "downsample.1"), strides=2)
        shortcut.done()


def _iresnet_state_dict(path, units):
    """``conv1``/``bn1``/``prelu``, ``layer{s}.{k}`` blocks (a conv shortcut starts a stage), ``bn2``, ``fc``,
    ``features``."""
    namer = _Namer(path, units, "IResNet")
    namer.conv("the stem convolution", ("conv1", "bn1", "prelu"))
    stage, block = 0, 0
    while namer.peek(Block):
        unit = namer.take(Block, "a residual block")
        stage, block = (stage + 1, 0) if unit.shortcut else (stage, block + 1)
        if stage == 0:
            raise UnsupportedGraphError(f"{path}: node '{unit.node}': the first block has no conv shortcut")
        _name_iresnet_block(namer, unit, f"layer{stage}.{block}.", unit.shortcut is not None)
    namer.batch_norm(namer.take("batch_norm", "the batch norm after the last stage").values, "bn2")
    _name_embedding_head(namer, "fc", "features")
    namer.done()
    return namer.state_dict, namer.batch_norms


def _name_embedding_head(namer, dense_name, batch_norm_name):
    namer.take("flatten", "a Flatten / Reshape")
    dense = namer.take("dense", "the embedding's fully connected layer").values
    namer.state_dict[dense_name + ".weight"] = dense["weight"]
    if dense["bias"] is not None:
        namer.state_dict[dense_name + ".bias"] = dense["bias"]
    namer.batch_norm(namer.take("batch_norm", "the embedding's batch norm").values, batch_norm_name)


def _name_depthwise_block(namer, prefix, strides):
    """arcface_torch ``DepthWise``: 1x1 conv + PReLU, depthwise 3x3 + PReLU, linear 1x1 conv."""
    expand, depthwise, project = _sequence(prefix, 3)
    namer.conv("a 1x1 conv", _sequence(expand + ".", 3))
    namer.conv("a depthwise conv", _sequence(depthwise + ".", 3), strides=strides)
    namer.conv("a linear 1x1 conv", _sequence(project + ".", 2))


def _name_residual_stack(namer, prefix):
    """arcface_torch ``Residual``: consecutive ``DepthWise`` blocks added to their input; returns how many."""
    count = 0
    while namer.peek(Block) and namer.peek(Block).shortcut is None:
        block = namer.inner(namer.take(Block, "a residual block").main, "MobileFaceNet block")
        _name_depthwise_block(block, f"{prefix}layers.{count}.", strides=1)
        block.done()
        count += 1
    return count


def _mbf_state_dict(path, units):
    """``layers.0`` stem, ``layers.1`` grouped conv or residual stack, three (``DepthWise``, ``Residual``) pairs,
    ``conv_sep``, ``features`` (GDC)."""
    namer = _Namer(path, units, "MobileFaceNet")
    namer.conv("the stem convolution", _sequence("layers.0.", 3), strides=2)
    if namer.peek(ConvUnit):
        namer.conv("the stem's grouped conv", _sequence("layers.1.", 3))
    elif _name_residual_stack(namer, "layers.1.") == 0:
        raise namer.fail("the stem's grouped conv or residual blocks")
    for position in (2, 4, 6):
        _name_depthwise_block(namer, f"layers.{position}.", strides=2)
        _name_residual_stack(namer, f"layers.{position + 1}.")
    namer.conv("the 1x1 conv after the last stage", _sequence("conv_sep.", 3))
    namer.conv("the global depthwise conv", _sequence("features.layers.0.", 2), padding="valid")
    _name_embedding_head(namer, "features.layers.2", "features.layers.3")
    namer.done()
    return namer.state_dict, namer.batch_norms


def read_onnx_state_dict(path, model=None):
    """``(state_dict, batch_norms, input_affine, architecture)`` of an insightface recognition ONNX graph (``model``:
    the file already loaded).

    ``state_dict`` uses arcface_torch's names and PyTorch layouts (folded batch norms become convolutions plus an
    identity batch norm carrying the bias), ``batch_norms`` maps each batch norm to its ``(epsilon, momentum)``,
    ``input_affine`` is ``(scale, offset)`` per input channel of the normalization that ``Sub`` / ``Mul`` nodes at
    the input apply to 0..255 pixels (MXNet exports), or None when there are none and the caller normalizes
    (PyTorch exports), and ``architecture`` is ``"iresnet"`` or ``"mbf"``.
    """
    model = load_onnx(path) if model is None else model
    if not input_is_channels_first(model):
        raise UnsupportedGraphError(f"{path}: the input is not an NCHW 3-channel image, as insightface models take")
    graph = Graph(model, path)
    scale, offset, first = input_affine(graph)
    units, _ = _walk(graph, first)
    stem = units[0] if units and isinstance(units[0], ConvUnit) else None
    if stem is None:
        raise UnsupportedGraphError(f"{path}: the graph does not start with a convolution")
    architecture = "iresnet" if stem.strides == (1, 1) else "mbf"
    reader = _iresnet_state_dict if architecture == "iresnet" else _mbf_state_dict
    state_dict, batch_norms = reader(path, units)
    return state_dict, batch_norms, None if first == graph.input else (scale, offset), architecture

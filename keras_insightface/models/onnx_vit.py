"""arcface_torch vision-transformer ONNX graphs (``torch2onnx.py`` exports of ``vit_t`` ... ``vit_l``) read back
into arcface_torch state dicts (``{name: array}``, PyTorch layouts).

``torch.onnx.export`` writes the network op by op, and the graph is followed from its input along those ops: the
patch ``Conv`` (kernel = stride, no padding), ``Reshape`` / ``Flatten`` + ``Transpose`` to tokens, an ``Add`` of the
position embedding; per block a LayerNorm (one ``LayerNormalization`` node from opset 17; ``ReduceMean`` / ``Sub`` /
``Pow`` / ``ReduceMean`` / ``Add`` / ``Sqrt`` / ``Div`` / ``Mul`` / ``Add`` before), the qkv ``MatMul`` (its weight
stored transposed), the attention as ``Reshape`` / ``Transpose`` / ``Gather`` / ``MatMul`` / ``Mul`` / ``Softmax`` /
``MatMul`` / ``Transpose`` / ``Reshape``, the projection ``MatMul`` + ``Add`` (the bias may come first), the residual
``Add``, a LayerNorm, ``MatMul`` + ``Add``, ReLU6 as ``Clip(0, 6)``, ``MatMul`` + ``Add`` and the residual ``Add``;
then the final LayerNorm, a ``Reshape`` of all tokens, and the feature head (``MatMul``, ``BatchNormalization``,
``MatMul``, ``BatchNormalization``). Reshape targets may be constants (the export's batch of 1 folded in) or computed
from ``Shape`` nodes. The number of heads is read from the qkv reshape, and the attention's scale must be
``(width / heads) ** -0.5``. Anything else stops with one line naming the node. The mask token, used only while
training, is not in an export.
"""

import numpy as np

from keras_insightface.models.onnx_graph import (
    Graph,
    UnsupportedGraphError,
    batch_norm_values,
    input_affine,
    input_is_channels_first,
    load_onnx,
    node_attributes,
    value_inputs,
)

# the nodes of an attention between the qkv and the projection MatMuls (shape plumbing, products, the softmax)
ATTENTION_OPS = ("Reshape", "Transpose", "Gather", "Split", "Squeeze", "Unsqueeze", "Slice", "MatMul", "Mul", "Div")
ATTENTION_OPS += ("Softmax", "Cast")
LAYER_NORM_EPSILON = 1e-5
ONNX_FLOAT = 1  # TensorProto.FLOAT


def is_transformer(model):
    """True for a graph with a ``Softmax``: an attention network, which this module reads (the CNN reader does not)."""
    return any(node.op_type == "Softmax" for node in model.graph.node)


def _constant_operand(graph, node):
    """``(constant as float32, the other input)`` of a two-input node with exactly one constant input, else None."""
    names = [graph.resolve(name) for name in node.input]
    constant = [name in graph.constants for name in names]
    if len(names) != 2 or sum(constant) != 1:
        return None
    index = constant.index(True)
    return np.asarray(graph.constants[names[index]], np.float32), names[1 - index]


class _Reader:
    """Follows the graph from tensor to tensor, recording arcface_torch names in ``state_dict`` and the network's
    settings (heads, LayerNorm epsilons, input size) in ``settings``."""

    def __init__(self, graph):
        self.graph, self.path = graph, graph.path
        self.state_dict, self.batch_norms = {}, {}
        self.settings = {"layer_norm_epsilon": {}}

    def fail(self, tensor, expected):
        found = ", ".join(f"'{node.name}' ({node.op_type})" for node in self.graph.users[tensor]) or "nothing"
        return UnsupportedGraphError(f"{self.path}: expected {expected} after '{tensor}', found {found}")

    def user(self, tensor, op_types, expected):
        """The one node of ``op_types`` reading ``tensor``."""
        matches = [node for node in self.graph.users[tensor] if node.op_type in op_types]
        if len(matches) != 1:
            raise self.fail(tensor, expected)
        return matches[0]

    # ------------------------------------------------------------------------------------------ layers
    def linear(self, tensor, name):
        """A PyTorch Linear: ``MatMul`` with the transposed weight [+ an ``Add`` of a constant bias]."""
        return self.linear_at(self.user(tensor, ("MatMul",), f"the MatMul of {name}"), name)

    def linear_at(self, node, name):
        weight = self.graph.constant(node, 1)
        if weight.ndim != 2:
            raise UnsupportedGraphError(f"{self.path}: node '{node.name}': a {weight.ndim}-D MatMul weight for {name}")
        self.state_dict[name + ".weight"] = weight.T
        output, users = node.output[0], self.graph.users[node.output[0]]
        bias = _constant_operand(self.graph, users[0]) if len(users) == 1 and users[0].op_type == "Add" else None
        if bias is not None:
            self.state_dict[name + ".bias"] = bias[0].reshape(-1)
            output = users[0].output[0]
        return output

    def layer_norm(self, tensor, name):
        """A LayerNorm over the last axis: one ``LayerNormalization`` node or PyTorch's decomposition of it."""
        fused = [node for node in self.graph.users[tensor] if node.op_type == "LayerNormalization"]
        if fused:
            node = fused[0]
            if node_attributes(node).get("axis", -1) not in (-1, 2):
                raise UnsupportedGraphError(f"{self.path}: node '{node.name}': a LayerNorm not over the last axis")
            weight, bias = self.graph.constant(node, 1), self.graph.constant(node, 2)
            epsilon, output = node_attributes(node).get("epsilon", LAYER_NORM_EPSILON), node.output[0]
        else:
            weight, bias, epsilon, output = self._decomposed_layer_norm(tensor, name)
        self.state_dict[name + ".weight"], self.state_dict[name + ".bias"] = weight.reshape(-1), bias.reshape(-1)
        self.settings["layer_norm_epsilon"][name] = float(epsilon)
        return output

    def _decomposed_layer_norm(self, tensor, name):
        """``(x - mean) / sqrt(mean((x - mean) ** 2) + eps) * weight + bias``, as PyTorch exports it before opset 17."""
        expected = f"the LayerNorm {name} (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add)"
        mean = self.user(tensor, ("ReduceMean",), expected)
        centered = [
            node
            for node in self.graph.users[tensor]
            if node.op_type == "Sub" and [self.graph.resolve(x) for x in node.input] == [tensor, mean.output[0]]
        ]
        if len(centered) != 1:
            raise self.fail(tensor, expected)
        centered = centered[0].output[0]
        power = self.user(centered, ("Pow",), expected)
        variance = self.user(power.output[0], ("ReduceMean",), expected)
        shifted = self.user(variance.output[0], ("Add",), expected)
        divide = self.user(self.user(shifted.output[0], ("Sqrt",), expected).output[0], ("Div",), expected)
        scale = self.user(divide.output[0], ("Mul",), expected)
        shift = self.user(scale.output[0], ("Add",), expected)
        parts = [_constant_operand(self.graph, node) for node in (power, shifted, scale, shift)]
        if None in parts or float(parts[0][0]) != 2 or self.graph.resolve(divide.input[0]) != centered:
            raise self.fail(tensor, expected)
        return parts[2][0], parts[3][0], float(parts[1][0]), shift.output[0]

    def relu6(self, tensor):
        """ReLU6 as ``Clip``: bounds from its inputs (opset 11 on) or its attributes (before)."""
        node = self.user(tensor, ("Clip",), "ReLU6 (a Clip)")
        attributes = node_attributes(node)
        low = self.graph.constant(node, 1) if len(node.input) > 1 and node.input[1] else attributes.get("min")
        high = self.graph.constant(node, 2) if len(node.input) > 2 and node.input[2] else attributes.get("max")
        if low is None or high is None or (float(low), float(high)) != (0.0, 6.0):
            raise UnsupportedGraphError(f"{self.path}: node '{node.name}': a Clip to [{low}, {high}], not ReLU6")
        return node.output[0]

    def residual(self, shortcut, branch):
        node = self.user(branch, ("Add",), "the residual Add")
        if {self.graph.resolve(name) for name in node.input} != {shortcut, branch}:
            raise self.fail(branch, f"the residual Add of '{shortcut}'")
        return node.output[0]

    # ------------------------------------------------------------------------------------------ attention
    def attention(self, tensor, name):
        """qkv ``MatMul``, the attention core up to the projection ``MatMul`` (heads and scale checked), projection."""
        qkv = self.linear(tensor, name + ".qkv")
        width = self.state_dict[name + ".qkv.weight"].shape[1]
        nodes, projection = self._attention_nodes(qkv)
        heads = self._heads(nodes, width, name)
        self._check_attention(nodes, width // heads, name)
        return self.linear_at(projection, name + ".proj")

    def _attention_nodes(self, qkv):
        """Every node between the qkv output and the projection (the one ``MatMul`` with a constant weight)."""
        nodes, ends, frontier = {}, {}, [qkv]
        while frontier:
            for node in self.graph.users[frontier.pop()]:
                if id(node) in nodes or id(node) in ends:
                    continue
                if node.op_type == "MatMul" and self.graph.resolve(node.input[1]) in self.graph.constants:
                    ends[id(node)] = node
                elif node.op_type in ATTENTION_OPS:
                    nodes[id(node)] = node
                    frontier.extend(node.output)
                else:
                    raise self.graph.unsupported(node, "inside an attention")
        if len(ends) != 1:
            raise self.fail(qkv, "an attention ending in one projection MatMul")
        return list(nodes.values()), next(iter(ends.values()))

    def _reshape_target(self, node):
        """The target shape of a ``Reshape``: a constant, or a ``Concat`` of constants and computed sizes (None)."""
        name = self.graph.resolve(node.input[1])
        if name in self.graph.constants:
            return [int(value) for value in np.ravel(self.graph.constants[name])]
        producer = self.graph.producer.get(name)
        if producer is None or producer.op_type != "Concat":
            return []
        target = []
        for part in map(self.graph.resolve, producer.input):
            target += [int(v) for v in np.ravel(self.graph.constants[part])] if part in self.graph.constants else [None]
        return target

    def _heads(self, nodes, width, name):
        """Heads from the reshape of qkv to ``(batch, tokens, 3, heads, width / heads)``; the same in every block."""
        targets = [self._reshape_target(node) for node in nodes if node.op_type == "Reshape"]
        split = [target for target in targets if len(target) == 5 and target[2] == 3 and target[3]]
        if not split or split[0][3] * (split[0][4] or width // split[0][3]) != width:
            raise UnsupportedGraphError(f"{self.path}: {name}: no reshape of qkv to (batch, tokens, 3, heads, dim)")
        heads = self.settings.setdefault("num_heads", split[0][3])
        if split[0][3] != heads:
            raise UnsupportedGraphError(f"{self.path}: {name} has {split[0][3]} heads, an earlier block {heads}")
        return heads

    def _check_attention(self, nodes, head_dim, name):
        """One softmax over the last axis, two products of computed tensors, float casts, and scalar factors whose
        product is the scale ``head_dim ** -0.5``."""
        kinds = [node.op_type for node in nodes]
        computed = [node for node in nodes if node.op_type == "MatMul"]
        if kinds.count("Softmax") != 1 or len(computed) != 2:
            raise UnsupportedGraphError(f"{self.path}: {name}: not one softmax between two products")
        softmax = next(node for node in nodes if node.op_type == "Softmax")
        casts = [node_attributes(node).get("to") for node in nodes if node.op_type == "Cast"]
        if node_attributes(softmax).get("axis", -1) not in (-1, 3) or any(to != ONNX_FLOAT for to in casts):
            raise UnsupportedGraphError(f"{self.path}: node '{softmax.name}': not a float softmax over the keys")
        scale = 1.0
        for node in (node for node in nodes if node.op_type in ("Mul", "Div")):
            operand = _constant_operand(self.graph, node)
            divisor = node.op_type == "Div" and self.graph.resolve(node.input[1]) in self.graph.constants
            if operand is None or operand[0].size != 1 or (node.op_type == "Div" and not divisor):
                raise UnsupportedGraphError(f"{self.path}: node '{node.name}': not a product with a scalar")
            scale *= float(operand[0]) if node.op_type == "Mul" else 1 / float(operand[0])
        if not np.isclose(scale, head_dim**-0.5, rtol=1e-4):
            raise UnsupportedGraphError(f"{self.path}: {name}: attention scale {scale:g}, not {head_dim**-0.5:g}")

    # ------------------------------------------------------------------------------------------ the network
    def patch_embed(self, tensor):
        """The patch ``Conv`` (kernel = stride, no padding), tokens, and the position embedding's ``Add``."""
        conv = self.user(tensor, ("Conv",), "the patch convolution")
        kernel, attributes = self.graph.constant(conv, 1), node_attributes(conv)
        size = kernel.shape[-1]
        if list(attributes.get("strides", [1, 1])) != [size] * 2 or any(attributes.get("pads", [0])):
            raise UnsupportedGraphError(f"{self.path}: node '{conv.name}': not a patch convolution (stride = kernel)")
        bias = self.graph.constant(conv, 2) if len(conv.input) > 2 and conv.input[2] else np.zeros(len(kernel))
        tokens = self.user(conv.output[0], ("Reshape", "Flatten"), "the patches flattened").output[0]
        transpose = self.user(tokens, ("Transpose",), "the patches transposed to tokens")
        add = self.user(transpose.output[0], ("Add",), "the position embedding's Add")
        position = _constant_operand(self.graph, add)
        if list(node_attributes(transpose).get("perm", [])) != [0, 2, 1] or position is None:
            raise self.fail(tokens, "tokens (Transpose 0, 2, 1) plus a position embedding")
        self.state_dict.update({"patch_embed.proj.weight": kernel, "patch_embed.proj.bias": bias})
        self.state_dict["pos_embed"] = position[0].reshape(1, -1, len(kernel))
        return add.output[0]

    def block(self, tensor, prefix):
        attended = self.attention(self.layer_norm(tensor, prefix + "norm1"), prefix + "attn")
        tensor = self.residual(tensor, attended)
        hidden = self.relu6(self.linear(self.layer_norm(tensor, prefix + "norm2"), prefix + "mlp.fc1"))
        return self.residual(tensor, self.linear(hidden, prefix + "mlp.fc2"))

    def starts_block(self, tensor):
        """Tokens read by a residual ``Add`` (a block follows), not only by the final LayerNorm."""
        return any(
            node.op_type == "Add" and all(self.graph.resolve(name) not in self.graph.constants for name in node.input)
            for node in self.graph.users[tensor]
        )

    def feature_head(self, tensor):
        """Every token flattened, then Linear, BatchNorm, Linear, BatchNorm (``feature.0`` ... ``feature.3``)."""
        tensor = self.user(tensor, ("Reshape", "Flatten"), "the tokens flattened").output[0]
        for index in (0, 2):
            tensor = self.linear(tensor, f"feature.{index}")
            node = self.user(tensor, ("BatchNormalization",), f"the batch norm feature.{index + 1}")
            values, name = batch_norm_values(self.graph, node), f"feature.{index + 1}"
            for key in ("weight", "bias", "running_mean", "running_var"):
                self.state_dict[f"{name}.{key}"] = values[key]
            self.batch_norms[name], tensor = (values["eps"], values["momentum"]), node.output[0]
        if tensor != self.graph.output:
            raise self.fail(tensor, "the graph's output")


def read_vit_state_dict(path, model=None):
    """``(state_dict, batch_norms, input_affine, settings)`` of an arcface_torch ViT graph (``model``: the file already
    loaded). ``settings`` has ``num_heads``, ``input_size`` (height, width; None where the graph leaves it open) and
    each LayerNorm's ``layer_norm_epsilon``; the rest is as ``onnx_graph.read_onnx_state_dict`` returns it."""
    model = load_onnx(path) if model is None else model
    if not input_is_channels_first(model):
        raise UnsupportedGraphError(f"{path}: the input is not an NCHW 3-channel image, as arcface_torch models take")
    graph = Graph(model, path)
    scale, offset, first = input_affine(graph)
    reader = _Reader(graph)
    tensor, index = reader.patch_embed(first), 0
    while reader.starts_block(tensor):
        tensor, index = reader.block(tensor, f"blocks.{index}."), index + 1
    reader.feature_head(reader.layer_norm(tensor, "norm"))
    dims = value_inputs(model.graph)[0].type.tensor_type.shape.dim
    reader.settings["input_size"] = tuple(dim.dim_value or None for dim in dims[2:4])
    affine = None if first == graph.input else (scale, offset)
    return reader.state_dict, reader.batch_norms, affine, reader.settings

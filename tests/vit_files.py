"""arcface_torch vision transformers written here the way PyTorch writes them, and references that never use the
importer:

- state dicts with ``VisionTransformer``'s names and shapes (``patch_embed.proj``, ``pos_embed``, ``mask_token``,
  ``blocks.{i}.norm1`` / ``attn.qkv`` / ``attn.proj`` / ``norm2`` / ``mlp.fc1`` / ``mlp.fc2``, ``norm``, ``feature.0-3``),
  random weights, the feature head's batch norms calibrated on images;
- a numpy forward pass of that network in eval mode (NCHW input, PyTorch semantics);
- the graph ``torch.onnx.export`` writes of it (``torch2onnx.py``): at opset 11 with LayerNorm decomposed into
  ReduceMean / Sub / Pow / ReduceMean / Add / Sqrt / Div / Mul / Add and the reshape targets computed from ``Shape``
  (a dynamic batch); at opset 17 with ``LayerNormalization`` nodes and the targets folded into constants with the
  export's batch of 1 (so such a graph runs one image at a time). Linear layers on tokens are a ``MatMul`` with the
  transposed weight and an ``Add`` whose first input is the bias, ReLU6 a ``Clip`` with bound inputs, the attention
  Reshape / Transpose / Gather / MatMul / Mul / Softmax / MatMul / Transpose / Reshape.
"""

import dataclasses
import math

import numpy as np
from pretrained_files import _add_batch_norm, _float32, _OnnxWriter, batch_norm, conv2d


@dataclasses.dataclass(frozen=True)
class VitSpec:
    """A small arcface_torch ViT: ``input`` pixels a side, ``patch`` pixels a patch (``input // patch`` patches a side,
    the rest of the image unused), token ``width``, ``depth`` blocks, ``heads``, MLP ``hidden`` width, ``emb``."""

    input: int = 32
    patch: int = 6
    width: int = 16
    depth: int = 2
    heads: int = 2
    hidden: int = 64
    emb: int = 8

    @property
    def tokens(self):
        return (self.input // self.patch) ** 2


TINY_VIT = VitSpec()


def vit_state_dict(rng, spec=TINY_VIT):
    """``VisionTransformer``'s state dict for ``spec`` (random weights; batch norms still at their initial values)."""
    width, tokens = spec.width, spec.tokens

    def linear(name, outputs, inputs, bias=True):
        sd[name + ".weight"] = rng.normal(0, 1 / math.sqrt(inputs), (outputs, inputs))
        if bias:
            sd[name + ".bias"] = rng.normal(0, 0.1, outputs)

    def layer_norm(name):
        sd[name + ".weight"], sd[name + ".bias"] = rng.uniform(0.5, 1.5, width), rng.uniform(-0.3, 0.3, width)

    sd = {"pos_embed": rng.normal(0, 0.3, (1, tokens, width)), "mask_token": rng.normal(0, 0.02, (1, 1, width))}
    sd["patch_embed.proj.weight"] = rng.normal(0, 1 / math.sqrt(3 * spec.patch**2), (width, 3, spec.patch, spec.patch))
    sd["patch_embed.proj.bias"] = rng.normal(0, 0.1, width)
    for index in range(spec.depth):
        prefix = f"blocks.{index}."
        layer_norm(prefix + "norm1")
        linear(prefix + "attn.qkv", 3 * width, width, bias=False)
        linear(prefix + "attn.proj", width, width)
        layer_norm(prefix + "norm2")
        linear(prefix + "mlp.fc1", spec.hidden, width)
        linear(prefix + "mlp.fc2", width, spec.hidden)
    layer_norm("norm")
    linear("feature.0", width, tokens * width, bias=False)
    _add_batch_norm(sd, rng, "feature.1", width)
    linear("feature.2", spec.emb, width, bias=False)
    _add_batch_norm(sd, rng, "feature.3", spec.emb)
    return _float32(sd)


# ---------------------------------------------------------------------------------------------------------
# numpy forward pass (eval mode)
# ---------------------------------------------------------------------------------------------------------
def layer_norm(x, sd, name, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(x.var(-1, keepdims=True) + eps) * sd[name + ".weight"] + sd[name + ".bias"]


def attention(x, sd, name, heads):
    """``Attention.forward``: qkv reshaped to (batch, tokens, 3, heads, dim), softmax(q k^T * dim ** -0.5) v."""
    batch, tokens, width = x.shape
    qkv = (x @ sd[name + ".qkv.weight"].T).reshape(batch, tokens, 3, heads, width // heads).transpose(2, 0, 3, 1, 4)
    logits = qkv[0] @ qkv[1].transpose(0, 1, 3, 2) * (width // heads) ** -0.5
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = (weights @ qkv[2]).transpose(0, 2, 1, 3).reshape(batch, tokens, width)
    return out @ sd[name + ".proj.weight"].T + sd[name + ".proj.bias"]


def block(x, sd, prefix, heads):
    """``Block.forward`` in eval mode (drop path is the identity)."""
    x = x + attention(layer_norm(x, sd, prefix + "norm1"), sd, prefix + "attn", heads)
    hidden = np.clip(
        layer_norm(x, sd, prefix + "norm2") @ sd[prefix + "mlp.fc1.weight"].T + sd[prefix + "mlp.fc1.bias"], 0, 6
    )
    return x + hidden @ sd[prefix + "mlp.fc2.weight"].T + sd[prefix + "mlp.fc2.bias"]


def patch_tokens(sd, x):
    """``PatchEmbed``: the strided convolution, ``flatten(2).transpose(1, 2)``, plus the position embedding."""
    weight = sd["patch_embed.proj.weight"]
    patches = conv2d(x, weight, stride=weight.shape[-1], pads=(0, 0, 0, 0))
    patches = patches + sd["patch_embed.proj.bias"].reshape(1, -1, 1, 1)
    return patches.reshape(len(x), weight.shape[0], -1).transpose(0, 2, 1) + sd["pos_embed"]


def vit_forward(sd, x, spec=TINY_VIT, calibrate=False):
    """``VisionTransformer.forward`` (eval mode) on NCHW ``x`` (only the patches' pixels are read)."""
    x = patch_tokens(sd, x[:, :, : spec.input // spec.patch * spec.patch, : spec.input // spec.patch * spec.patch])
    for index in range(spec.depth):
        x = block(x, sd, f"blocks.{index}.", spec.heads)
    x = layer_norm(x, sd, "norm").reshape(len(x), -1)
    x = batch_norm(x @ sd["feature.0.weight"].T, sd, "feature.1", eps=2e-5, calibrate=calibrate)
    return batch_norm(x @ sd["feature.2.weight"].T, sd, "feature.3", eps=2e-5, calibrate=calibrate)


def calibrated_vit(rng, spec=TINY_VIT, images=None):
    """A state dict whose feature-head batch norms have the statistics of ``images`` (NCHW), as a trained one's."""
    sd = vit_state_dict(rng, spec)
    vit_forward(sd, images, spec, calibrate=True)
    return sd


# ---------------------------------------------------------------------------------------------------------
# torch.onnx.export graphs
# ---------------------------------------------------------------------------------------------------------
class _VitOnnxWriter(_OnnxWriter):
    """The ops PyTorch writes for a ViT at ``opset``; ``folded``: reshape targets are constants with a batch of 1."""

    def __init__(self, sd, spec, opset, folded):
        super().__init__()
        self.sd, self.spec, self.opset, self.folded, self.count = sd, spec, opset, folded, 0

    def name(self, kind):
        self.count += 1
        return f"/{kind}_{self.count}"

    def constant_node(self, value, dtype=np.float32):
        """A ``Constant`` node, as the exporter writes scalars such as 2.0, eps and the attention scale."""
        output = self.name("Constant") + "_output_0"
        tensor = self.onnx.numpy_helper.from_array(np.asarray(value, dtype))
        self.nodes.append(self.onnx.helper.make_node("Constant", [], [output], value=tensor))
        return output

    def target(self, tensor, dims, parts):
        """A reshape target: ``parts`` are ints, ``("dim", i)`` (size i of ``tensor``, whose sizes at a batch of 1 are
        ``dims``) or ``("div", i, n)`` (size i over n); folded into one constant, or computed with Shape / Gather /
        Div / Unsqueeze / Concat."""
        if self.folded:
            values = [p if isinstance(p, int) else dims[p[1]] // (p[2] if p[0] == "div" else 1) for p in parts]
            return self.constant(values, kind="Reshape", dtype=np.int64)
        shape, pieces = self.node("Shape", [tensor], self.name("Shape")), []
        for part in parts:
            if isinstance(part, int):
                pieces.append(self.constant([part], kind="Concat", dtype=np.int64))
                continue
            index = self.constant(part[1], kind="Gather", dtype=np.int64)
            size = self.node("Gather", [shape, index], self.name("Gather"), axis=0)
            if part[0] == "div":
                size = self.node("Div", [size, self.constant(part[2], kind="Div", dtype=np.int64)], self.name("Div"))
            pieces.append(self.node("Unsqueeze", [size], self.name("Unsqueeze"), axes=[0]))
        return self.node("Concat", pieces, self.name("Concat"), axis=0)

    def linear(self, x, name, bias=True):
        out = self.node("MatMul", [x, self.constant(self.sd[name + ".weight"].T, kind="MatMul")], self.name("MatMul"))
        if bias:
            out = self.node("Add", [self.constant(self.sd[name + ".bias"], name + ".bias"), out], self.name("Add"))
        return out

    def layer_norm(self, x, name):
        weight, bias = (self.constant(self.sd[f"{name}.{key}"], f"{name}.{key}") for key in ("weight", "bias"))
        if self.opset >= 17:
            return self.node(
                "LayerNormalization", [x, weight, bias], self.name("LayerNormalization"), axis=-1, epsilon=1e-5
            )
        mean = self.node("ReduceMean", [x], self.name("ReduceMean"), axes=[-1], keepdims=1)
        centered = self.node("Sub", [x, mean], self.name("Sub"))
        power = self.node("Pow", [centered, self.constant_node(2.0)], self.name("Pow"))
        variance = self.node("ReduceMean", [power], self.name("ReduceMean"), axes=[-1], keepdims=1)
        root = self.node(
            "Sqrt", [self.node("Add", [variance, self.constant_node(1e-5)], self.name("Add"))], self.name("Sqrt")
        )
        normed = self.node("Div", [centered, root], self.name("Div"))
        return self.node("Add", [self.node("Mul", [normed, weight], self.name("Mul")), bias], self.name("Add"))

    def attention(self, x, name, cast):
        heads, width = self.spec.heads, self.spec.width
        qkv = self.linear(x, name + ".qkv", bias=False)
        tokens = (1, self.spec.tokens, width)
        target = self.target(x, tokens, [("dim", 0), ("dim", 1), 3, heads, ("div", 2, heads)])
        qkv = self.node(
            "Transpose",
            [self.node("Reshape", [qkv, target], self.name("Reshape"))],
            self.name("Transpose"),
            perm=[2, 0, 3, 1, 4],
        )
        q, k, v = (
            self.node("Gather", [qkv, self.constant(i, kind="Gather", dtype=np.int64)], self.name("Gather"), axis=0)
            for i in range(3)
        )
        if cast:  # ``.float()`` written as a Cast to float
            q, k, v = (self.node("Cast", [t], self.name("Cast"), to=1) for t in (q, k, v))
        logits = self.node(
            "MatMul", [q, self.node("Transpose", [k], self.name("Transpose"), perm=[0, 1, 3, 2])], self.name("MatMul")
        )
        logits = self.node("Mul", [logits, self.constant_node((width // heads) ** -0.5)], self.name("Mul"))
        weights = self.node("Softmax", [logits], self.name("Softmax"), axis=3 if self.opset < 13 else -1)
        out = self.node(
            "Transpose",
            [self.node("MatMul", [weights, v], self.name("MatMul"))],
            self.name("Transpose"),
            perm=[0, 2, 1, 3],
        )
        out = self.node(
            "Reshape", [out, self.target(x, tokens, [("dim", 0), ("dim", 1), ("dim", 2)])], self.name("Reshape")
        )
        return self.linear(out, name + ".proj")

    def block(self, x, prefix, cast):
        x = self.node(
            "Add", [x, self.attention(self.layer_norm(x, prefix + "norm1"), prefix + "attn", cast)], self.name("Add")
        )
        hidden = self.linear(self.layer_norm(x, prefix + "norm2"), prefix + "mlp.fc1")
        hidden = self.node("Clip", [hidden, self.constant_node(0.0), self.constant_node(6.0)], self.name("Clip"))
        return self.node("Add", [x, self.linear(hidden, prefix + "mlp.fc2")], self.name("Add"))

    def network(self, cast=False):
        sd, spec = self.sd, self.spec
        patch = spec.patch
        inputs = [
            self.constant(sd["patch_embed.proj.weight"], "patch_embed.proj.weight"),
            self.constant(sd["patch_embed.proj.bias"], "patch_embed.proj.bias"),
        ]
        x = self.node(
            "Conv",
            ["data", *inputs],
            "/patch_embed/proj/Conv",
            dilations=[1, 1],
            group=1,
            kernel_shape=[patch] * 2,
            pads=[0] * 4,
            strides=[patch] * 2,
        )
        x = self.node(
            "Reshape", [x, self.target(x, (1, spec.width), [("dim", 0), ("dim", 1), -1])], self.name("Reshape")
        )
        x = self.node("Transpose", [x], self.name("Transpose"), perm=[0, 2, 1])
        x = self.node("Add", [x, self.constant(sd["pos_embed"], "pos_embed")], self.name("Add"))
        for index in range(spec.depth):
            x = self.block(x, f"blocks.{index}.", cast)
        x = self.layer_norm(x, "norm")
        x = self.node(
            "Reshape", [x, self.target(x, (1,), [("dim", 0), spec.tokens * spec.width])], self.name("Reshape")
        )
        for index in (0, 2):
            x = self.batch_norm(
                self.linear(x, f"feature.{index}", bias=False),
                sd,
                f"feature.{index + 1}",
                f"/feature/{index + 1}",
                eps=2e-5,
            )
        return self.model(x, spec.input, opset=self.opset)


def torch_vit_onnx(sd, spec=TINY_VIT, opset=11, cast=False):
    """``torch.onnx.export`` of an eval-mode arcface_torch ViT: opset 11 with computed reshape targets (any batch),
    opset 17 with constant ones (one image at a time); ``cast`` adds the ``Cast`` nodes of ``.float()``."""
    return _VitOnnxWriter(sd, spec, opset, folded=opset >= 17).network(cast)

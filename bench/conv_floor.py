#!/usr/bin/env python3
"""The convolution floor of a network's training step on this machine, printed as one JSON line.

A training step runs every convolution three times: forward, and backward once for the input gradient and once
for the kernel gradient (the first convolution, on the images, needs no input gradient). This script times those
kernels alone, for each distinct convolution of the network (shape, kernel, strides, groups) at the given batch,
and adds them up: ``floor_s_per_step``. No library running the same network in the same precision on the same
kernels can step faster, so ``--reference_images_per_s R`` also prints the best ratio over a library measured at R
images/s. TensorFlow's oneDNN kernels are what both Keras 3 and tf-keras call on a CPU.

Training batch norms over images also run TensorFlow's fused batch-norm kernel in both libraries (forward with the
batch moments, and its backward): ``batch_norm_s_per_step`` times those alone the same way, and
``conv_bn_floor_images_per_s`` is the rate of a step that ran nothing but the two.

Usage::

    OMP_NUM_THREADS=2 python bench/conv_floor.py --network r50 --output_layer E --reference_images_per_s 7.5
"""

import argparse
import collections
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_insightface.models import zoo as models  # noqa: E402

ConvSpec = collections.namedtuple("ConvSpec", "depthwise input_shape kernel_shape strides padding dilation input_grad")


def conv_specs(model):
    """``Counter`` of the ``ConvSpec`` of every Conv2D / DepthwiseConv2D / SeparableConv2D kernel in ``model``
    (shapes without the batch), and the names of other convolution layers, which are not counted."""
    specs, skipped = collections.Counter(), []
    model_inputs = {id(tensor) for tensor in model.inputs}
    for layer in model.layers:
        if not isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)):
            skipped += [layer.name] if "Conv" in type(layer).__name__ else []
            continue
        input_grad = id(layer.input) not in model_inputs
        in_shape = tuple(layer.input.shape[1:])
        common = dict(strides=tuple(layer.strides), padding=layer.padding, dilation=tuple(layer.dilation_rate))
        if isinstance(layer, keras.layers.SeparableConv2D):
            depthwise = ConvSpec(True, in_shape, tuple(layer.depthwise_kernel.shape), input_grad=input_grad, **common)
            mid_shape = (*_output_size(depthwise), depthwise.kernel_shape[2] * depthwise.kernel_shape[3])
            pointwise = ConvSpec(False, mid_shape, tuple(layer.pointwise_kernel.shape), (1, 1), "valid", (1, 1), True)
            specs.update([depthwise, pointwise])
        else:
            depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
            specs[ConvSpec(depthwise, in_shape, tuple(layer.kernel.shape), input_grad=input_grad, **common)] += 1
    return specs, skipped


def batch_norm_shapes(model):
    """``Counter`` of the input shapes (without the batch) of ``model``'s batch norms over 4-D channels-last data,
    which train on TensorFlow's fused kernel in both libraries, and the names of the others, which are not counted."""
    shapes, skipped = collections.Counter(), []
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            if len(layer.input.shape) == 4 and layer.axis in (-1, 3):
                shapes[tuple(layer.input.shape[1:])] += 1
            else:
                skipped.append(layer.name)
    return shapes, skipped


def forward_macs(spec):
    """Multiply-adds of one image through the convolution (the backward kernels do the same number each)."""
    out_h, out_w = _output_size(spec)
    kernel_h, kernel_w, in_channels, out_channels = spec.kernel_shape
    return out_h * out_w * kernel_h * kernel_w * in_channels * out_channels


def _output_size(spec):
    sizes = []
    for size, kernel, stride, dilation in zip(spec.input_shape[:2], spec.kernel_shape[:2], spec.strides, spec.dilation):
        span = (kernel - 1) * dilation + 1
        sizes.append(-(-size // stride) if spec.padding == "same" else (size - span) // stride + 1)
    return sizes


def _output_channels(spec):
    """A depthwise kernel's last axis is the channel multiplier."""
    return spec.kernel_shape[2] * spec.kernel_shape[3] if spec.depthwise else spec.kernel_shape[3]


def _convolve(spec):
    if spec.depthwise:
        return lambda x, w: keras.ops.depthwise_conv(x, w, spec.strides, spec.padding, dilation_rate=spec.dilation)
    return lambda x, w: keras.ops.conv(x, w, spec.strides, spec.padding, dilation_rate=spec.dilation)


def kernel_seconds(spec, batch, repeats=5):
    """Median seconds of the forward kernel and of the backward kernels (input gradient only where needed) at
    ``batch``. The backward does not rerun the forward: a convolution's gradients need only its inputs."""
    convolve = _convolve(spec)
    x = tf.random.normal((batch,) + spec.input_shape)
    w = tf.random.normal(spec.kernel_shape) * 0.05
    dy = tf.random.normal((batch, *_output_size(spec), _output_channels(spec)))

    @tf.function
    def forward(x, w):
        return _first_element(convolve(x, w))

    @tf.function
    def backward(x, w, dy):
        sources = [x, w] if spec.input_grad else [w]
        with tf.GradientTape() as tape:
            tape.watch(sources)
            y = convolve(x, w)
        return _first_element(*tape.gradient(y, sources, output_gradients=dy))

    return _median_seconds(forward, (x, w), repeats), _median_seconds(backward, (x, w, dy), repeats)


def batch_norm_seconds(shape, batch, repeats=5):
    """Median seconds of TensorFlow's fused batch-norm kernel in training (with the batch moments) and of its
    gradient kernel (input, scale and offset gradients, from the moments the forward saved) on ``(batch, *shape)``."""
    x, dy = tf.random.normal((batch,) + shape), tf.random.normal((batch,) + shape)
    scale, offset, empty = tf.ones(shape[-1:]), tf.zeros(shape[-1:]), tf.zeros([0])
    common = dict(epsilon=2e-5, data_format="NHWC", is_training=True)

    def normalize(x, scale, offset):  # outputs, batch moments, and the saved moments for the gradient
        return tf.raw_ops.FusedBatchNormV3(x=x, scale=scale, offset=offset, mean=empty, variance=empty, **common)

    @tf.function
    def forward(x, scale, offset):
        return _first_element(normalize(x, scale, offset)[0])

    @tf.function
    def backward(dy, x, scale, saved):
        grads = tf.raw_ops.FusedBatchNormGradV3(
            y_backprop=dy, x=x, scale=scale, reserve_space_1=saved[0], reserve_space_2=saved[1],
            reserve_space_3=saved[2], **common,
        )  # fmt: skip
        return _first_element(*grads[:3])

    saved = normalize(x, scale, offset)[3:]
    return _median_seconds(forward, (x, scale, offset), repeats), _median_seconds(
        backward, (dy, x, scale, saved), repeats
    )


def _first_element(*tensors):
    """One number that depends on each tensor: timing waits for the kernels, not for copies of their results."""
    return tf.add_n([tf.reshape(tensor, [-1])[0] for tensor in tensors])


def _median_seconds(function, args, repeats):
    function(*args).numpy()  # trace and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(*args).numpy()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def convolution_floor(model, batch, repeats=5):
    """Per-step seconds of ``model``'s convolution kernels at ``batch`` and the per-spec details."""
    specs, skipped = conv_specs(model)

    def describe(spec, forward):
        return {"spec": _describe(spec), "forward_gmac_per_s": round(batch * forward_macs(spec) / forward / 1e9, 1)}

    return (*_seconds_per_step(specs, kernel_seconds, describe, batch, repeats), skipped)


def batch_norm_floor(model, batch, repeats=5):
    """Per-step seconds of ``model``'s fused batch-norm kernels at ``batch`` and the per-shape details."""
    shapes, skipped = batch_norm_shapes(model)

    def describe(shape, forward):
        return {"shape": shape}

    return (*_seconds_per_step(shapes, batch_norm_seconds, describe, batch, repeats), skipped)


def _seconds_per_step(counts, seconds, describe, batch, repeats):
    """Sum over the distinct kernels in ``counts`` of count x (forward + backward) seconds, and a row for each."""
    rows, total = [], 0.0
    for kernel, count in counts.items():
        forward, backward = seconds(kernel, batch, repeats)
        total += count * (forward + backward)
        rows.append({**describe(kernel, forward), "count": count, "forward_ms": round(forward * 1e3, 2),
                     "backward_ms": round(backward * 1e3, 2)})  # fmt: skip
    return total, rows


def _describe(spec):
    kind = "depthwise" if spec.depthwise else "conv"
    size = "x".join(str(size) for size in spec.kernel_shape[:2])
    return f"{kind} {size} /{spec.strides[0]} {spec.input_shape} -> {_output_channels(spec)}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--network", default="r50", help="a models.buildin_models name")
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument("--output_layer", default="GDC", help="embedding head (GDC has a depthwise convolution)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per kernel (median)")
    parser.add_argument("--reference_images_per_s", type=float, help="a library's measured rate on this network")
    parser.add_argument("--details", action="store_true", help="also print every distinct kernel's times")
    args = parser.parse_args(argv)
    shape = (args.image_size, args.image_size, 3)
    model = models.buildin_models(args.network, input_shape=shape, output_layer=args.output_layer)
    floor, rows, skipped = convolution_floor(model, args.batch, args.repeats)
    batch_norm, bn_rows, bn_skipped = batch_norm_floor(model, args.batch, args.repeats)
    macs = sum(forward_macs(spec) * count for spec, count in conv_specs(model)[0].items())
    result = {"network": args.network, "batch": args.batch, "forward_gmac_per_image": round(macs / 1e9, 3),
              "floor_s_per_step": round(floor, 3), "floor_images_per_s": round(args.batch / floor, 2),
              "batch_norm_s_per_step": round(batch_norm, 3),
              "conv_bn_floor_images_per_s": round(args.batch / (floor + batch_norm), 2),
              "not_counted": skipped + bn_skipped, "load_avg_1min": round(os.getloadavg()[0], 2)}  # fmt: skip
    if args.reference_images_per_s:
        result["best_ratio_over_reference"] = round(args.batch / floor / args.reference_images_per_s, 3)
        best = args.batch / (floor + batch_norm) / args.reference_images_per_s
        result["best_ratio_with_batch_norm"] = round(best, 3)
    if args.details:
        result["convolutions"], result["batch_norms"] = rows, bn_rows
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""``bench/conv_floor.py``: which convolution and batch-norm kernels a training step runs, and how many multiply-adds
the convolutions do."""

import collections
import os
import sys

import keras
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import conv_floor  # noqa: E402


def small_model():
    inputs = keras.Input((16, 16, 3))
    nn = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)  # on the images: no input gradient
    nn = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2)(nn)  # 16 channels at 8x8
    nn = keras.layers.Conv2D(8, 3, padding="valid", groups=4)(nn)  # 6x6
    nn = keras.layers.SeparableConv2D(4, 3, padding="same")(nn)  # depthwise 3x3 over 8, then 1x1 8 -> 4
    nn = keras.layers.Conv1D(4, 1)(keras.layers.Reshape((36, 4))(nn))
    return keras.Model(inputs, nn)


def test_every_convolution_kernel_of_a_step_is_listed_with_its_input_gradient():
    specs, skipped = conv_floor.conv_specs(small_model())
    listed = sorted((spec.depthwise, spec.input_shape, spec.kernel_shape, spec.input_grad) for spec in specs)
    assert listed == sorted(
        [
            (False, (16, 16, 3), (3, 3, 3, 8), False),
            (True, (16, 16, 8), (3, 3, 8, 2), True),
            (False, (8, 8, 16), (3, 3, 4, 8), True),
            (True, (6, 6, 8), (3, 3, 8, 1), True),
            (False, (6, 6, 8), (1, 1, 8, 4), True),
        ]
    )
    assert all(count == 1 for count in specs.values())
    assert len(skipped) == 1 and "conv1d" in skipped[0]


def test_multiply_adds_per_image_match_hand_counts():
    specs, _ = conv_floor.conv_specs(small_model())
    macs = {spec.kernel_shape: conv_floor.forward_macs(spec) for spec in specs}
    assert macs == {
        (3, 3, 3, 8): 16 * 16 * 9 * 3 * 8,
        (3, 3, 8, 2): 8 * 8 * 9 * 16,  # each of the 16 outputs reads one input channel
        (3, 3, 4, 8): 6 * 6 * 9 * 4 * 8,  # 4 groups: each output reads 4 of the 16 channels
        (3, 3, 8, 1): 6 * 6 * 9 * 8,
        (1, 1, 8, 4): 6 * 6 * 8 * 4,
    }


def test_iresnet50_does_6_3_gigamacs_per_112px_image():
    """IResNet-50's convolutions counted from its layout: a 3x3 stem, per stage a strided first block with a 1x1
    shortcut, then stride-1 blocks of two 3x3 convolutions."""
    from keras_insightface.models import zoo as models

    expected, size, channels = 112 * 112 * 9 * 3 * 64, 112, 64
    for repeats, filters in zip((3, 4, 14, 3), (64, 128, 256, 512)):
        out = size // 2
        expected += size * size * 9 * channels * filters + out * out * (9 * filters + channels) * filters
        expected += (repeats - 1) * 2 * out * out * 9 * filters * filters
        size, channels = out, filters
    specs, _ = conv_floor.conv_specs(models.buildin_models("r50", output_layer="E", input_shape=(112, 112, 3)))
    total = sum(conv_floor.forward_macs(spec) * count for spec, count in specs.items())
    assert total == expected
    np.testing.assert_allclose(total / 1e9, 6.2965, atol=1e-4)


def test_batch_norms_over_channels_last_images_are_listed_by_shape():
    inputs = keras.Input((16, 16, 3))
    nn = keras.layers.BatchNormalization()(keras.layers.Conv2D(8, 3, padding="same")(inputs))
    nn = keras.layers.BatchNormalization()(keras.layers.Conv2D(8, 3, padding="same")(nn))
    nn = keras.layers.BatchNormalization(axis=1, name="channels_first")(nn)  # not the fused kernel's layout
    nn = keras.layers.BatchNormalization(name="flat")(keras.layers.Flatten()(nn))
    shapes, skipped = conv_floor.batch_norm_shapes(keras.Model(inputs, nn))
    assert dict(shapes) == {(16, 16, 8): 2}
    assert sorted(skipped) == ["channels_first", "flat"]


def test_iresnet50_batch_norms_follow_its_layout():
    """A stem batch norm; per stage a first block with three (before its first convolution, between the two, after
    the strided one) and one on the 1x1 shortcut, then three per stride-1 block; the E head's on the last maps."""
    from keras_insightface.models import zoo as models

    expected, size, channels = collections.Counter({(112, 112, 64): 1}), 112, 64
    for repeats, filters in zip((3, 4, 14, 3), (64, 128, 256, 512)):
        out = size // 2
        expected.update(
            [(size, size, channels), (size, size, filters)] + [(out, out, filters)] * (2 + 3 * (repeats - 1))
        )
        size, channels = out, filters
    expected[(7, 7, 512)] += 1
    model = models.buildin_models("r50", output_layer="E", input_shape=(112, 112, 3))
    shapes, skipped = conv_floor.batch_norm_shapes(model)
    assert shapes == expected
    assert sum(expected.values()) == 78 and skipped == ["pre_embedding"]  # the embedding's batch norm is 1-D


def test_a_step_counts_each_distinct_kernel_as_often_as_the_network_runs_it():
    times = {"a": (1.0, 2.0), "b": (0.5, 0.25)}  # forward, backward seconds

    def describe(kernel, forward):
        return {"kernel": kernel}

    total, rows = conv_floor._seconds_per_step(
        collections.Counter({"a": 2, "b": 3}), lambda kernel, batch, repeats: times[kernel], describe, 64, 1
    )
    assert total == 2 * 3.0 + 3 * 0.75
    assert rows == [
        {"kernel": "a", "count": 2, "forward_ms": 1000.0, "backward_ms": 2000.0},
        {"kernel": "b", "count": 3, "forward_ms": 500.0, "backward_ms": 250.0},
    ]

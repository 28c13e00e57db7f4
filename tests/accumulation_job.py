"""Subprocess for test_runner: gradient accumulation and clipping against one large batch, on one device and under
MirroredStrategy over 2 logical CPUs. Prints one JSON line per case with the max weight difference to its reference.

The model has no batch statistics (conv, dense, cosine head), so k batches of B must give the update of one batch of
k * B. Every run sees the same 16 images in the same order.
"""

import json
import sys

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_insightface.data import pipeline as data  # noqa: E402
from keras_insightface.nn import losses  # noqa: E402
from keras_insightface.training import train  # noqa: E402

IMAGES, CLASSES = 16, 4


def basic_model():
    inputs = keras.Input((8, 8, 3))
    nn = keras.layers.Conv2D(4, 3, kernel_initializer=keras.initializers.GlorotUniform(seed=1))(inputs)
    nn = keras.layers.GlobalAveragePooling2D()(nn)
    nn = keras.layers.Dense(6, kernel_initializer=keras.initializers.GlorotUniform(seed=2), name="embedding")(nn)
    return keras.Model(inputs, nn)


def dataset(global_batch):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(IMAGES, 8, 8, 3)).astype("float32")
    labels = (np.arange(IMAGES) % CLASSES).astype("int32")
    ds = tf.data.Dataset.from_tensor_slices((images, {"label": labels})).batch(global_batch).repeat()
    return data.TrainDataset(ds, IMAGES // global_batch, CLASSES, IMAGES)


class InitialWeights(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.weights = [ww.copy() for ww in self.model.get_weights()]


def run(tmp, global_batch, strategy=None, precision=None, **options):
    """``(initial weights, weights after one epoch of 16 images: 2 SGD updates, optimizer steps)``."""
    keras.utils.set_random_seed(0)
    initial = InitialWeights()
    strategy = strategy or tf.distribute.get_strategy()
    try:
        with strategy.scope():
            tt = train.Train(
                dataset(global_batch),
                f"{tmp}/run.keras",
                basic_model=basic_model(),
                batch_size=global_batch // strategy.num_replicas_in_sync,
                lr_base=0.1,
                lr_decay=0,
                verbose=0,
                resume=False,
                plot_history=False,
                mixed_precision=precision,
                callbacks=[initial],
                **options,
            )
            optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
            if precision == "mixed_float16":  # a loss scale that does not overflow at once, so updates happen
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=64.0)
            tt.train([{"loss": losses.ArcfaceLoss(scale=16), "optimizer": optimizer, "epoch": 1}], 0)
        return initial.weights, [ww.copy() for ww in tt.model.get_weights()], int(tt.optimizer.iterations.numpy())
    finally:
        keras.mixed_precision.set_global_policy("float32")


def max_difference(first, second):
    return max(float(np.abs(aa - bb).max()) for aa, bb in zip(first, second))


def report(name, got, reference, float32_reference=None):
    """One JSON line; with ``float32_reference`` (the same run in float32) also ``rounding``: how far the reduced
    precision alone moves the reference's weights, the scale its own differences are judged on."""
    (start, weights, steps), (ref_start, ref_weights, ref_steps) = got, reference
    result = {
        "name": name,
        "diff": max_difference(weights, ref_weights),
        "start_diff": max_difference(start, ref_start),
        "moved": max_difference(ref_weights, ref_start),
        "steps": steps,
        "ref_steps": ref_steps,
    }
    if float32_reference is not None:
        result["rounding"] = max_difference(ref_weights, float32_reference[1])
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    tmp = sys.argv[1]
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    big = run(tmp, 8)
    report("accumulate_one_device", run(tmp, 4, gradient_accumulation_steps=2), big)
    report("accumulate_mirrored", run(tmp, 4, mirrored, gradient_accumulation_steps=2), big)
    clipped = run(tmp, 8, gradient_clip_norm=0.05)
    report("clip_mirrored", run(tmp, 8, mirrored, gradient_clip_norm=0.05), clipped)
    both = run(tmp, 4, mirrored, gradient_clip_norm=0.05, gradient_accumulation_steps=2)
    report("clip_and_accumulate_mirrored", both, clipped)
    for precision in ("mixed_float16", "mixed_bfloat16"):
        accumulated = run(tmp, 4, precision=precision, gradient_accumulation_steps=2)
        report(f"accumulate_{precision}", accumulated, run(tmp, 8, precision=precision), big)

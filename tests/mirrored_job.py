"""Subprocess for test_distributed: one device vs MirroredStrategy over 2 logical CPUs, same global batch.

Prints one JSON line per loss type with the max differences of per-step losses and final weights.
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

GLOBAL_BATCH, CLASSES, STEPS = 8, 4, 3


def basic_model():
    inputs = keras.Input((8, 8, 3))
    nn = keras.layers.Conv2D(4, 3, use_bias=False, kernel_initializer=keras.initializers.GlorotUniform(seed=1))(inputs)
    nn = keras.layers.GlobalAveragePooling2D()(nn)
    nn = keras.layers.Dense(6, kernel_initializer=keras.initializers.GlorotUniform(seed=2), name="embedding")(nn)
    return keras.Model(inputs, nn)


def dataset():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(GLOBAL_BATCH * STEPS, 8, 8, 3)).astype("float32")
    labels = np.tile(np.repeat(np.arange(CLASSES), 2), STEPS).astype("int32")  # P x K layout, K = 2
    ds = tf.data.Dataset.from_tensor_slices((images, {"label": labels})).batch(GLOBAL_BATCH).repeat()
    return data.TrainDataset(ds, STEPS, CLASSES, GLOBAL_BATCH * STEPS)


def run(stage, strategy, tmp):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        tt = train.Train(
            dataset(),
            f"{tmp}/{strategy.__class__.__name__}.keras",
            basic_model=basic_model(),
            batch_size=GLOBAL_BATCH // strategy.num_replicas_in_sync,
            lr_base=0.1,
            lr_decay=0,
            verbose=0,
            resume=False,
        )
        history = tt.train([dict(stage, optimizer=keras.optimizers.SGD(0.1, momentum=0.9), epoch=2)], 0)
    return np.array(history["loss"]), [ww.copy() for ww in tt.model.get_weights()]


def main(tmp):
    stages = {
        "softmax": {"loss": keras.losses.CategoricalCrossentropy(label_smoothing=0.1)},
        "arcface": {"loss": losses.ArcfaceLoss(scale=16)},
        "center": {"loss": losses.ArcfaceLoss(scale=16), "centerloss": 0.5},
        "triplet": {"loss": losses.BatchHardTripletLoss(0.3)},
        "arcface_triplet": {"loss": losses.ArcfaceLoss(scale=16), "triplet": 1, "alpha": 0.3},
    }
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    for name, stage in stages.items():
        single_loss, single_weights = run(stage, tf.distribute.get_strategy(), tmp)
        multi_loss, multi_weights = run(stage, mirrored, tmp)
        result = {
            "name": name,
            "loss_single": single_loss.tolist(),
            "loss_diff": float(np.abs(single_loss - multi_loss).max()),
            "weight_diff": max(float(np.abs(aa - bb).max()) for aa, bb in zip(single_weights, multi_weights)),
        }
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])

"""Subprocess for test_jax: training on JAX with 2 (host) devices and ``keras.distribution.DataParallel`` against one
device, same data and seeds; then the JAX-trained model saved to ``.keras``. Prints one JSON line.

Run with ``KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=2``.
"""

import json
import sys

import jax
import keras
import numpy as np

from keras_insightface.data import pipeline as data
from keras_insightface.models import zoo as models
from keras_insightface.nn import losses
from keras_insightface.training import runner_jax, stages, train

IMAGES, CLASSES, GLOBAL_BATCH = 16, 4, 8


def basic_model():
    inputs = keras.Input((8, 8, 3))
    nn = keras.layers.Conv2D(4, 3, kernel_initializer=keras.initializers.GlorotUniform(seed=1))(inputs)
    nn = keras.layers.BatchNormalization(momentum=0.5)(nn)
    nn = keras.layers.GlobalAveragePooling2D()(nn)
    nn = keras.layers.Dense(6, kernel_initializer=keras.initializers.GlorotUniform(seed=2), name="embedding")(nn)
    return keras.Model(inputs, nn)


def dataset():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    images = rng.normal(size=(IMAGES, 8, 8, 3)).astype("float32")
    labels = (np.arange(IMAGES) % CLASSES).astype("int32")
    ds = tf.data.Dataset.from_tensor_slices((images, {"label": labels})).batch(GLOBAL_BATCH).repeat()
    return data.TrainDataset(ds, IMAGES // GLOBAL_BATCH, CLASSES, IMAGES)


def run(tmp, name, stage):
    keras.utils.set_random_seed(0)
    with keras.distribution.distribution().scope() if keras.distribution.distribution() else _nothing():
        model = basic_model()
    tt = train.Train(
        dataset(), f"{tmp}/{name}.keras", basic_model=model, batch_size=GLOBAL_BATCH, lr_base=0.1, lr_decay=0,
        verbose=0, resume=False, plot_history=False,
    )  # fmt: skip
    history = tt.train([dict(stage, optimizer=keras.optimizers.SGD(0.1, momentum=0.9), epoch=2)], 0)
    return history["loss"], [np.asarray(weight) for weight in tt.model.get_weights()], tt


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def interrupted_weights_diff():
    """An interrupt between two steps of one ``run_steps`` call: the variables hold the first step's values (the step
    consumed their buffers). Returns the largest difference to a run of exactly one step from the same start."""
    batch = next(dataset().dataset.as_numpy_iterator())

    def batches(interrupt):
        yield batch
        if interrupt:
            raise KeyboardInterrupt
        yield batch

    weights = []
    for interrupt, num_steps in ((False, 1), (True, 2)):
        keras.utils.set_random_seed(0)
        stage = stages.StageBuilder(basic_model(), classes=CLASSES).build(
            losses.ArcfaceLoss(scale=16), optimizer=keras.optimizers.SGD(0.1)
        )
        start = [np.asarray(weight) for weight in stage.model.get_weights()]
        try:
            runner_jax.JaxStepRunner().train_function(stage, CLASSES)(batches(interrupt), num_steps)
        except KeyboardInterrupt:
            pass
        weights.append([np.asarray(weight) for weight in stage.model.get_weights()])
    moved = max(float(np.abs(aa - bb).max()) for aa, bb in zip(weights[0], start))
    return moved, max(float(np.abs(aa - bb).max()) for aa, bb in zip(weights[0], weights[1]))


def main(tmp):
    stages = {
        "arcface_center": {"loss": losses.ArcfaceLoss(scale=16), "centerloss": 0.5},
        "triplet": {"loss": losses.BatchHardTripletLoss(0.3)},
    }
    results = {"devices": jax.device_count()}
    for name, stage in stages.items():
        single_loss, single_weights, _ = run(tmp, f"{name}_one", stage)
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
        try:
            multi_loss, multi_weights, trainer = run(tmp, f"{name}_two", stage)
        finally:
            keras.distribution.set_distribution(None)
        results[name] = {
            "loss_single": [float(x) for x in single_loss],
            "loss_diff": float(np.max(np.abs(np.subtract(single_loss, multi_loss)))),
            "weight_diff": max(float(np.abs(aa - bb).max()) for aa, bb in zip(single_weights, multi_weights)),
        }
    results["interrupted_moved"], results["interrupted_diff"] = interrupted_weights_diff()
    images = np.random.default_rng(5).normal(size=(3, 8, 8, 3)).astype("float32")
    results["saved"] = f"{tmp}/arcface_center_one.keras"
    basic = models.extract_basic_model(keras.models.load_model(results["saved"]))
    np.save(f"{tmp}/probe_images.npy", images)
    np.save(f"{tmp}/jax_embeddings.npy", np.asarray(basic(images)))
    print("RESULT" + json.dumps(results), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])

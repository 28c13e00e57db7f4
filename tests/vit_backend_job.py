"""Training steps of a tiny ViT on this process's Keras backend (``KERAS_BACKEND``), for test_vit.py: the same
batches and, after the first run has saved them, the same weights on every backend. Run as a script it prints
``RESULT`` and a JSON line: the losses of three deterministic steps (masking and drop path off) and of three with
both on."""

import json
import os
import sys

import keras
import numpy as np

from keras_insightface.models import zoo as models

CLASSES, BATCH = 6, 8


def tiny_vit(mask_ratio=0.0, drop_path_rate=0.0):
    """``vit_t``'s network at 32x32 with 4x4 patches of 8 pixels, width 32, 2 blocks of 4 heads, 16-d embedding."""
    return models.buildin_models(
        "vit_t",
        input_shape=(32, 32, 3),
        emb_shape=16,
        width=32,
        depth=2,
        num_heads=4,
        patch_size=8,
        mask_ratio=mask_ratio,
        drop_path_rate=drop_path_rate,
    )


def _batches(workdir):
    """The one batch every step trains on (written by the first run)."""
    path = os.path.join(workdir, "batches.npz")
    if not os.path.exists(path):
        rng = np.random.default_rng(0)
        images = rng.uniform(-1, 1, (BATCH, 32, 32, 3)).astype("float32")
        np.savez(path, images=images, labels=rng.integers(0, CLASSES, BATCH).astype("int32"))
    loaded = np.load(path)
    return loaded["images"], loaded["labels"]


def train_steps(workdir, masking=False):
    """Losses of three AdamW updates on one batch (CosFace head, clipping at 5) with ``Train``'s step runner of this
    backend; the
    stage's initial weights are saved by the first deterministic run and loaded by the others."""
    import tensorflow as tf

    from keras_insightface.nn import losses
    from keras_insightface.training import stages, train
    from keras_insightface.training.config import TrainConfig

    keras.utils.set_random_seed(0)
    basic_model = tiny_vit(0.25, 0.2) if masking else tiny_vit()
    optimizer = keras.optimizers.AdamW(1e-3, weight_decay=0.1, epsilon=1e-8)
    stage = stages.StageBuilder(basic_model, classes=CLASSES).build(losses.CosFaceLoss(scale=16), optimizer=optimizer)
    weights = os.path.join(workdir, "stage.weights.h5")
    if not masking:
        stage.model.load_weights(weights) if os.path.exists(weights) else stage.model.save_weights(weights)
    images, labels = _batches(workdir)
    runner = train.make_runner(TrainConfig(verbose=0, gradient_clip_norm=5.0))
    dataset = tf.data.Dataset.from_tensors((images, {"label": labels})).repeat()
    iterator = iter(runner.distribute(dataset, BATCH))
    run_steps = runner.train_function(stage, CLASSES)
    return [float(run_steps(iterator, 1)["loss"]) for _ in range(3)]


if __name__ == "__main__":
    workdir = sys.argv[1]
    result = {"backend": keras.backend.backend(), "losses": train_steps(workdir)}
    result["masked_losses"] = train_steps(workdir, masking=True)
    print("RESULT" + json.dumps(result), flush=True)

"""Helper for test_preemption: a 2-epoch run of a tiny model (batch 8) on a class folder, recording the labels of
every batch its input makes. ``--sigterm_at N`` sends the process SIGTERM during update N, as a cluster does before it
kills a job. Each run appends its labels (and the optimizer's step count) to ``<save_path>.labels.json``.

Usage: preempt_job.py DATA_DIR SAVE_PATH [--sigterm_at N]
"""

import argparse
import json
import os
import signal

import keras
import numpy as np
import tensorflow as tf
from helpers import tiny_basic_model

from keras_insightface.nn import losses
from keras_insightface.training import train


class AtUpdate(keras.callbacks.Callback):
    """Calls ``action()`` at the end of the ``update``-th update of the run (counted across epochs)."""

    def __init__(self, update, action):
        super().__init__()
        self.update, self.action, self.seen = update, action, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.update:
            self.action()


def sigterm():
    os.kill(os.getpid(), signal.SIGTERM)


def record_labels(trainer, seen):
    """Record the labels of every batch the trainer's input makes, in the order the steps take them."""
    original = trainer.train_ds.at

    def at(epoch, step=0):
        def record(images, targets):
            append = lambda labels: (seen.append(labels.tolist()), np.int64(0))[1]  # noqa: E731
            with tf.control_dependencies([tf.numpy_function(append, [targets["label"]], tf.int64)]):
                return tf.identity(images), targets

        return original(epoch, step).map(record)

    trainer.train_ds.at = at


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir")
    parser.add_argument("save_path")
    parser.add_argument("--sigterm_at", type=int, default=0)
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    callbacks = [AtUpdate(args.sigterm_at, sigterm)] if args.sigterm_at else []
    trainer = train.Train(
        args.data_dir, args.save_path, basic_model=tiny_basic_model(), batch_size=8, seed=5, verbose=0,
        plot_history=False, callbacks=callbacks,
    )  # fmt: skip
    seen, log_path = [], args.save_path + ".labels.json"
    record_labels(trainer, seen)
    try:
        trainer.train([{"loss": losses.ArcfaceLoss(scale=16), "optimizer": "sgd", "epoch": 2}], 0)
    finally:  # also when the run ends with SystemExit(143)
        log = json.load(open(log_path)) if os.path.exists(log_path) else {"runs": []}
        log["runs"].append(seen)
        log["iterations"] = int(trainer.optimizer.iterations.numpy())
        json.dump(log, open(log_path, "w"))


if __name__ == "__main__":
    main()

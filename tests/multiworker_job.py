"""Subprocess for test_distributed: one worker of a 2-worker MultiWorkerMirroredStrategy run on loopback.

Usage: multiworker_job.py PORT0 PORT1 INDEX DATA_DIR SAVE_DIR [TAGGED_DATA ...]. Prints the final loss and a weight
checksum, and for each TAGGED_DATA (a .rec folder or shard folder of tagged images) the tags of the images this worker
received in each of two epochs through the trainer's own per-worker input.
"""

import json
import os
import sys

port0, port1, index, data_dir, save_dir = sys.argv[1:6]
os.environ["TF_CONFIG"] = json.dumps(
    {
        "cluster": {"worker": [f"127.0.0.1:{port0}", f"127.0.0.1:{port1}"]},
        "task": {"type": "worker", "index": int(index)},
    }
)
import tensorflow as tf  # noqa: E402

strategy = tf.distribute.MultiWorkerMirroredStrategy()

import keras  # noqa: E402
import numpy as np  # noqa: E402
from helpers import epoch_tags, tiny_basic_model  # noqa: E402

from keras_insightface.nn import losses  # noqa: E402
from keras_insightface.training import runner, train  # noqa: E402


def worker_epoch_tags(tt, path):
    """Tags of the images this worker's replica receives in each of two epochs of ``path``."""
    tt.reset_dataset(path)
    return epoch_tags(tt, lambda images: [local.numpy() for local in strategy.experimental_local_results(images)])


keras.utils.set_random_seed(0)
with strategy.scope():
    tt = train.Train(
        data_dir,
        os.path.join(save_dir, "mw.keras"),
        basic_model=tiny_basic_model(),
        batch_size=8,
        lr_base=0.01,
        verbose=0,
        seed=0,
    )
    history = tt.train([{"loss": losses.ArcfaceLoss(scale=16), "optimizer": "sgd", "epoch": 1}], 0)
tags = {path: worker_epoch_tags(tt, path) for path in sys.argv[6:]}
trainable = float(sum(np.abs(ww.numpy()).sum() for ww in tt.model.trainable_weights))
moving = float(sum(np.abs(ww.numpy()).sum() for ww in tt.model.non_trainable_weights))
print(
    json.dumps(
        {
            "index": int(index),
            "loss": history["loss"],
            "trainable": trainable,
            "moving": moving,
            "chief": tt.is_chief,
            "workers": runner.num_workers(strategy),  # 2: each worker reads its own shard of the files
            "tags": tags,
        }
    )
)

"""Subprocess for test_distributed: one worker of a 2-worker MultiWorkerMirroredStrategy run on loopback.

Usage: multiworker_job.py PORT0 PORT1 INDEX DATA_DIR SAVE_DIR [TAGGED_DATA ...] [--sigterm_at N]. Trains one epoch
(resuming a run stopped earlier) and prints the final loss, a weight checksum, the updates this process trained and
the optimizer's step count, and for each TAGGED_DATA (a .rec folder or shard folder of tagged images) the tags of the
images this worker received in each of two epochs through the trainer's own per-worker input. ``--sigterm_at N``:
this worker sends itself SIGTERM during update N.
"""

import argparse
import json
import os

parser = argparse.ArgumentParser()
parser.add_argument("ports", nargs=2)
parser.add_argument("index", type=int)
parser.add_argument("data_dir")
parser.add_argument("save_dir")
parser.add_argument("tagged", nargs="*")
parser.add_argument("--sigterm_at", type=int, default=0)
args = parser.parse_args()
os.environ["TF_CONFIG"] = json.dumps(
    {
        "cluster": {"worker": [f"127.0.0.1:{port}" for port in args.ports]},
        "task": {"type": "worker", "index": args.index},
    }
)
import tensorflow as tf  # noqa: E402

strategy = tf.distribute.MultiWorkerMirroredStrategy()

import keras  # noqa: E402
import numpy as np  # noqa: E402
from helpers import epoch_tags, tiny_basic_model  # noqa: E402
from preempt_job import AtUpdate, sigterm  # noqa: E402

from keras_insightface.nn import losses  # noqa: E402
from keras_insightface.training import runner, train  # noqa: E402


def worker_epoch_tags(tt, path):
    """Tags of the images this worker's replica receives in each of two epochs of ``path``."""
    tt.reset_dataset(path)
    return epoch_tags(tt, lambda images: [local.numpy() for local in strategy.experimental_local_results(images)])


keras.utils.set_random_seed(0)
updates = AtUpdate(args.sigterm_at, sigterm)  # counts the updates this process trains
with strategy.scope():
    tt = train.Train(
        args.data_dir,
        os.path.join(args.save_dir, "mw.keras"),
        basic_model=tiny_basic_model(),
        batch_size=8,
        lr_base=0.01,
        verbose=0,
        seed=0,
        callbacks=[updates],
    )
    history = tt.train([{"loss": losses.ArcfaceLoss(scale=16), "optimizer": "sgd", "epoch": 1}], 0)
tags = {path: worker_epoch_tags(tt, path) for path in args.tagged}
trainable = float(sum(np.abs(ww.numpy()).sum() for ww in tt.model.trainable_weights))
moving = float(sum(np.abs(ww.numpy()).sum() for ww in tt.model.non_trainable_weights))
print(
    json.dumps(
        {
            "index": args.index,
            "loss": history["loss"],
            "trainable": trainable,
            "moving": moving,
            "chief": tt.is_chief,
            "workers": runner.num_workers(strategy),  # 2: each worker reads its own shard of the files
            "updates": updates.seen,
            "iterations": int(tt.optimizer.iterations.numpy()),
            "tags": tags,
        }
    )
)

"""Subprocess for test_jax: one of 2 JAX processes (``jax.distributed`` on loopback, CPU collectives over gloo) that
train on a .rec of tagged images with ``keras.distribution.DataParallel`` over the devices of both processes.

Usage: ``KERAS_BACKEND=jax jax_multiprocess_job.py PORT INDEX REC_DIR SAVE_DIR [SIGTERM_AT]``. Prints one JSON line:
the tags of the images this process fed in each of 2 epochs through the trainer's own input, the losses of one
trained epoch, the updates this process trained, the optimizer's step count and a weight checksum (those three also
when a signal stopped the run). ``SIGTERM_AT`` N: this process sends itself SIGTERM during update N.
"""

import json
import os
import sys

import jax

port, index, rec_dir, save_dir = sys.argv[1:5]
sigterm_at = int(sys.argv[5]) if len(sys.argv) > 5 else 0
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(index))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from helpers import epoch_tags, tiny_basic_model  # noqa: E402
from preempt_job import AtUpdate, sigterm  # noqa: E402

from keras_insightface.nn import losses  # noqa: E402
from keras_insightface.training import train  # noqa: E402

GLOBAL_BATCH = 8


def rows_read_here(images):
    """The rows of a global batch that this process holds."""
    assert images.shape[0] == GLOBAL_BATCH  # one global array over both processes
    return [np.asarray(shard.data) for shard in images.addressable_shards]


def main():
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
    keras.utils.set_random_seed(0)
    with keras.distribution.distribution().scope():
        model = tiny_basic_model((8, 8, 3), emb=8)
    updates = AtUpdate(sigterm_at, sigterm)  # counts the updates this process trains
    tt = train.Train(
        rec_dir, os.path.join(save_dir, "mp.keras"), basic_model=model, batch_size=GLOBAL_BATCH, lr_base=0.01,
        verbose=0, seed=0, plot_history=False, cache_dir=os.path.join(save_dir, f"cache_{index}"), callbacks=[updates],
    )  # fmt: skip
    result = {"index": int(index), "processes": jax.process_count(), "devices": jax.device_count()}
    result.update(tags=epoch_tags(tt, rows_read_here), chief=tt.is_chief)
    try:
        history = tt.train([{"loss": losses.ArcfaceLoss(scale=16), "optimizer": "sgd", "epoch": 1}], 0)
        result.update(loss=history["loss"])
    finally:  # also when a signal stopped the run (SystemExit(143))
        checksum = float(sum(np.abs(np.asarray(weight)).sum() for weight in tt.model.trainable_weights))
        result.update(trainable=checksum, updates=updates.seen, iterations=int(tt.optimizer.iterations.numpy()))
        print("RESULT" + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

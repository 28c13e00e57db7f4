"""Subprocess for test_jax: one of 2 JAX processes (``jax.distributed`` on loopback, CPU collectives over gloo) that
train on a .rec of tagged images with ``keras.distribution.DataParallel`` over the devices of both processes.

Usage: ``KERAS_BACKEND=jax jax_multiprocess_job.py PORT INDEX REC_DIR SAVE_DIR``. Prints one JSON line: the tags of
the images this process fed in each of 2 epochs through the trainer's own input, the losses of one trained epoch
and a weight checksum.
"""

import json
import os
import sys

import jax

port, index, rec_dir, save_dir = sys.argv[1:5]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(index))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from helpers import tags_of, tiny_basic_model  # noqa: E402

import losses  # noqa: E402
import train  # noqa: E402

GLOBAL_BATCH = 8


def epoch_tags(tt, epochs=2):
    """Tags of the rows of the global batches that this process read, in each of ``epochs`` epochs."""
    make_worker_dataset = lambda batch_size, shard: tt._dataset(0, batch_size, shard).dataset  # noqa: E731
    iterator = tt.runner.distribute(tt.train_ds.dataset, tt.global_batch_size, make_worker_dataset)
    seen = []
    for _ in range(epochs):
        seen.append([])
        for _ in range(tt.steps_per_epoch):
            images, _ = next(iterator)
            assert images.shape[0] == GLOBAL_BATCH  # one global array over both processes
            seen[-1] += tags_of(np.concatenate([np.asarray(shard.data) for shard in images.addressable_shards]))
    return seen


def main():
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
    keras.utils.set_random_seed(0)
    with keras.distribution.distribution().scope():
        model = tiny_basic_model((8, 8, 3), emb=8)
    tt = train.Train(
        rec_dir, os.path.join(save_dir, "mp.keras"), basic_model=model, batch_size=GLOBAL_BATCH, lr_base=0.01,
        verbose=0, seed=0, plot_history=False, cache_dir=os.path.join(save_dir, f"cache_{index}"),
    )  # fmt: skip
    tags = epoch_tags(tt)
    history = tt.train([{"loss": losses.ArcfaceLoss(scale=16), "optimizer": "sgd", "epoch": 1}], 0)
    checksum = float(sum(np.abs(np.asarray(weight)).sum() for weight in tt.model.trainable_weights))
    result = {"index": int(index), "processes": jax.process_count(), "devices": jax.device_count()}
    result.update(tags=tags, loss=history["loss"], trainable=checksum, chief=tt.is_chief)
    print("RESULT" + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

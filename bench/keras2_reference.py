#!/usr/bin/env python3
"""The reference for ``train_throughput.py --vs-keras2``: the same network trained the way Keras_insightface users
train today, on TensorFlow with legacy Keras 2 (``tf-keras``), with ``model.fit``. Prints one JSON line.

The backbone and embedding head are this repository's own code (``models.buildin_models``) built with ``tf_keras``
standing in for ``keras``, so the graph is identical layer for layer; the ArcFace head and loss are written here in
tf-keras, as Keras_insightface's ``NormDense`` and ``ArcfaceLoss`` are. The input is the same ``tf.data`` decoding of
the same JPEG folder (random flip, ``(x - 127.5) / 128``). Timing: the median of the batch-to-batch times after the
first ``--warmup`` batches; the first step (trace and compile) is reported separately.

Needs ``pip install -e ".[bench]"`` (``tf-keras``, matching TensorFlow's version). Run by ``train_throughput.py``.
"""

import argparse
import json
import math
import os
import sys
import time

os.environ["TF_USE_LEGACY_KERAS"] = "1"  # this process measures legacy Keras 2 on purpose: it is the reference
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

sys.modules["keras"] = tf_keras  # the repository's backbones are built with Keras 2 layers in this process
from keras_insightface.models import zoo as models  # noqa: E402


class NormDense(tf_keras.layers.Layer):
    """Cosine head: L2-normalized embeddings times the L2-normalized kernel (emb, classes)."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.kernel = self.add_weight("kernel", (input_shape[-1], self.units), initializer="glorot_normal")

    def call(self, inputs):
        return tf.matmul(tf.nn.l2_normalize(inputs, axis=1), tf.nn.l2_normalize(self.kernel, axis=0))


def arcface_loss(scale=64.0, margin=0.5):
    """ArcFace on cosine logits with sparse labels, the Keras_insightface way (target mirrored below the bound)."""
    threshold, low = math.cos(math.pi - margin), math.sin(math.pi - margin) * margin

    def loss(labels, cosines):
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        target = tf.gather(cosines, labels, axis=1, batch_dims=1)
        theta = tf.acos(tf.clip_by_value(target, -1.0 + 1e-6, 1.0 - 1e-6))
        with_margin = tf.where(target > threshold, tf.cos(theta + margin), target - low)
        logits = cosines + tf.one_hot(labels, tf.shape(cosines)[-1]) * (with_margin - target)[:, None]
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits * scale)

    return loss


def folder_dataset(data_dir, batch, image_size):
    """Decode + random flip + normalize the JPEGs of ``data_dir/<class>/`` in parallel, shuffled, repeated."""
    classes = sorted(os.listdir(data_dir), key=int)
    names = [os.path.join(data_dir, cc, ff) for cc in classes for ff in sorted(os.listdir(os.path.join(data_dir, cc)))]
    labels = [index for index, cc in enumerate(classes) for _ in os.listdir(os.path.join(data_dir, cc))]

    def load(name, label):
        image = tf.io.decode_jpeg(tf.io.read_file(name), channels=3)  # the folder holds image_size JPEGs
        image = tf.image.random_flip_left_right(tf.cast(image, tf.float32))
        return (image - 127.5) * 0.0078125, label

    ds = tf.data.Dataset.from_tensor_slices((names, labels)).shuffle(len(names)).repeat()
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE), len(classes)


class BatchTimes(tf_keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        self.times = getattr(self, "times", []) + [time.perf_counter()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--network", default="mobilefacenet")
    parser.add_argument("--data", required=True, help="class folder of JPEGs")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument("--emb_shape", type=int, default=512)
    parser.add_argument("--output_layer", default="GDC")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", default="float32", help="a mixed precision policy, e.g. mixed_bfloat16")
    args = parser.parse_args(argv)
    tf_keras.utils.set_random_seed(0)
    tf_keras.mixed_precision.set_global_policy(args.precision)
    dataset, classes = folder_dataset(args.data, args.batch, args.image_size)
    basic = models.buildin_models(
        args.network,
        emb_shape=args.emb_shape,
        output_layer=args.output_layer,
        input_shape=(args.image_size,) * 2 + (3,),
    )
    model = tf_keras.Model(basic.inputs, NormDense(classes, dtype="float32", name="arcface")(basic.output))
    model.compile(optimizer=tf_keras.optimizers.SGD(0.01, momentum=0.9), loss=arcface_loss())
    timer, start = BatchTimes(), time.perf_counter()
    model.fit(dataset, steps_per_epoch=args.steps + args.warmup, epochs=1, verbose=0, callbacks=[timer])
    gaps = np.diff(timer.times[args.warmup - 1 :])
    result = {
        "library": f"tf-keras {tf_keras.__version__}",
        "network": args.network,
        "precision": args.precision,
        "params": int(model.count_params()),
        "images_per_s": round(args.batch / float(np.median(gaps)), 2),
        "first_step_s": round(timer.times[0] - start, 2),
    }
    print("RESULT" + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Training speed of arcface_torch's ViTs on this machine, one JSON line per Keras backend.

``Train``'s loop against plain Keras 3 training (``train_on_batch``: the train step ``model.fit`` runs) of the same
network (``vit_t`` at 112x112 by default; two copies, one per side) with the same softmax head over ``--classes``
classes, the same optimizer (AdamW, weight decay 0.1) and the same in-memory batch of ``--batch`` images (the input
pipeline is not measured). The two alternate batch by batch, A B A B ..., so that a change of the machine's load
touches both alike: a callback in ``Train``'s loop times each of its batches (from the batch's start to its logs) and
then runs and times one Keras step. Each round is a fresh ``Train`` run of ``--warmup`` + ``--steps`` batches (the
first ones trace and compile), ``--repeats`` rounds; each side's figure is the median of its timed batches over all
rounds. The load average is recorded before and after. ``--both``: TensorFlow, then JAX, each in its own process (the
backend is chosen once per process).

    OMP_NUM_THREADS=2 python bench/vit_throughput.py --both
    python bench/vit_throughput.py --backend jax --network vit_s --batch 128
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if "--backend" in sys.argv:  # before Keras is imported: the backend is chosen once per process
    os.environ["KERAS_BACKEND"] = sys.argv[sys.argv.index("--backend") + 1]
sys.path.insert(0, HERE)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from train_throughput import synthetic_batches  # noqa: E402

from keras_insightface.models import zoo as models  # noqa: E402


def _optimizer():
    return keras.optimizers.AdamW(1e-3, weight_decay=0.1, epsilon=1e-8)


class AlternatingKerasSteps(keras.callbacks.Callback):
    """In ``Train``'s loop: the seconds of each of its batches, and after each one a plain Keras step of
    ``keras_model`` on the same batch, timed too (``train_on_batch`` returns its logs as numbers: the step is done)."""

    def __init__(self, keras_model, images, labels):
        super().__init__()
        self.keras_model, self.images, self.labels = keras_model, images, labels
        self.train_seconds, self.keras_seconds = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.train_seconds.append(time.perf_counter() - self.start)
        start = time.perf_counter()
        self.keras_model.train_on_batch(self.images, self.labels)
        self.keras_seconds.append(time.perf_counter() - start)


def keras_model(args):
    """The plain Keras side: the network with a ``Dense`` softmax head, compiled as ``model.fit`` would run it."""
    basic_model = models.buildin_models(args.network, input_shape=(args.image_size,) * 2 + (3,), emb_shape=512)
    logits = keras.layers.Dense(args.classes, dtype="float32", name="softmax")(basic_model.output)
    model = keras.Model(basic_model.inputs, logits)
    model.compile(optimizer=_optimizer(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def alternating_round(args, basic_model, plain, images, labels, workdir):
    """One ``Train`` run (its softmax head, its step runner of this backend) with a Keras step after each batch;
    ``(Train's seconds, Keras' seconds)`` of the batches after the warmup."""
    import tensorflow as tf

    from keras_insightface.data import pipeline as data
    from keras_insightface.training import train

    steps = args.warmup + args.steps
    batches = tf.data.Dataset.from_tensors((images, {"label": labels})).repeat(steps)
    dataset = data.TrainDataset(batches, steps_per_epoch=steps, classes=args.classes, num_images=args.batch)
    timer = AlternatingKerasSteps(plain, images, labels)
    tt = train.Train(
        dataset,
        os.path.join(workdir, "bench.keras"),
        basic_model=basic_model,
        batch_size=args.batch,
        resume=False,
        verbose=0,
        plot_history=False,
        callbacks=[timer],
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    tt.train([{"loss": loss, "optimizer": _optimizer(), "epoch": 1}], 0)
    return timer.train_seconds[args.warmup :], timer.keras_seconds[args.warmup :]


def measure(args):
    """``--repeats`` alternating rounds on this process's backend; the summary as a dict."""
    start, load_before = time.time(), os.getloadavg()
    basic_model = models.buildin_models(args.network, input_shape=(args.image_size,) * 2 + (3,), emb_shape=512)
    plain = keras_model(args)
    images, labels = synthetic_batches(args.batch, args.image_size, args.classes)
    seconds = {"train": [], "keras": []}
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(args.repeats):
            train_seconds, keras_seconds = alternating_round(args, basic_model, plain, images, labels, workdir)
            seconds["train"] += train_seconds
            seconds["keras"] += keras_seconds
            print(keras.backend.backend(), {k: [round(v, 2) for v in s] for k, s in seconds.items()}, file=sys.stderr)
    rates = {name: args.batch / float(np.median(values)) for name, values in seconds.items()}
    return {
        "backend": keras.backend.backend(),
        "network": args.network,
        "image_size": args.image_size,
        "batch": args.batch,
        "params": basic_model.count_params(),
        "train_images_per_s": round(rates["train"], 2),
        "keras_images_per_s": round(rates["keras"], 2),
        "train_vs_keras": round(rates["train"] / rates["keras"], 3),
        "train_batch_seconds": [round(value, 3) for value in seconds["train"]],
        "keras_batch_seconds": [round(value, 3) for value in seconds["keras"]],
        "load_average_before": [round(value, 2) for value in load_before],
        "load_average_after": [round(value, 2) for value in os.getloadavg()],
        "seconds": round(time.time() - start, 1),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("tensorflow", "jax"), help="the Keras backend of this run")
    parser.add_argument("--both", action="store_true", help="TensorFlow, then JAX, each in its own process")
    parser.add_argument("--network", default="vit_t", help="a ViT name of models.BUILDIN_MODELS")
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=5, help="timed batches per round")
    parser.add_argument("--warmup", type=int, default=2, help="batches per round left out of the timing")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds, each a fresh Train run")
    args, rest = parser.parse_known_args(argv)
    if args.both:
        forwarded = [arg for arg in sys.argv[1:] if arg != "--both"]
        for backend in ("tensorflow", "jax"):
            subprocess.run([sys.executable, __file__, "--backend", backend, *forwarded], check=True)
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    print(json.dumps(measure(args)), flush=True)


if __name__ == "__main__":
    main()

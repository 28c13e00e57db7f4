#!/usr/bin/env python3
"""Training speed of arcface_torch's ViTs on this machine, one JSON line per Keras backend.

``Train``'s loop against plain Keras 3 ``model.fit`` of the same basic model (``vit_t`` at 112x112 by default) with
the same softmax head over ``--classes`` classes, the same optimizer (AdamW, weight decay 0.1) and the same in-memory
batch of ``--batch`` images (the input pipeline is not measured). The two alternate in one process, ``--repeats``
rounds of A then B; a round's images/s is its median batch-to-batch time after ``--warmup`` batches (tracing,
compilation), and each side's figure is the median of its rounds. The load average is recorded before and after.
With ``--both``, TensorFlow then JAX, each in its own process (the backend is chosen once per process).

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
from train_throughput import BatchTimes, steady_rate, synthetic_batches  # noqa: E402

from keras_insightface.models import zoo as models  # noqa: E402


def _optimizer():
    return keras.optimizers.AdamW(1e-3, weight_decay=0.1, epsilon=1e-8)


def _dataset(images, labels, steps, targets_as_dict):
    import tensorflow as tf

    targets = {"label": labels} if targets_as_dict else labels
    return tf.data.Dataset.from_tensors((images, targets)).repeat(steps)


def train_round(args, basic_model, images, labels, workdir):
    """Images/s of ``Train``'s loop (its softmax head, its step runner of this backend) on one in-memory batch."""
    from keras_insightface.data import pipeline as data
    from keras_insightface.training import train

    steps = args.warmup + args.steps
    dataset = data.TrainDataset(
        _dataset(images, labels, steps, True), steps_per_epoch=steps, classes=args.classes, num_images=args.batch
    )
    timer = BatchTimes()
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
    return steady_rate(timer.times, args.batch, args.warmup)


def fit_round(args, basic_model, images, labels):
    """Images/s of plain ``keras.Model.fit`` with a ``Dense`` softmax head on the same batch."""
    logits = keras.layers.Dense(args.classes, dtype="float32", name="softmax")(basic_model.output)
    model = keras.Model(basic_model.inputs, logits)
    model.compile(optimizer=_optimizer(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    timer = BatchTimes()
    steps = args.warmup + args.steps
    model.fit(_dataset(images, labels, steps, False), epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[timer])
    return steady_rate(timer.times, args.batch, args.warmup)


def measure(args):
    """Alternate ``Train`` and ``fit`` rounds on this process's backend; the summary as a dict."""
    start, load_before = time.time(), os.getloadavg()
    shape = (args.image_size, args.image_size, 3)
    basic_model = models.buildin_models(args.network, input_shape=shape, emb_shape=512)
    images, labels = synthetic_batches(args.batch, args.image_size, args.classes)
    rounds = {"train": [], "fit": []}
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(args.repeats):
            rounds["train"].append(round(train_round(args, basic_model, images, labels, workdir), 2))
            rounds["fit"].append(round(fit_round(args, basic_model, images, labels), 2))
            print(keras.backend.backend(), rounds, file=sys.stderr, flush=True)
    median = {name: float(np.median(rates)) for name, rates in rounds.items()}
    return {
        "backend": keras.backend.backend(),
        "network": args.network,
        "image_size": args.image_size,
        "batch": args.batch,
        "params": basic_model.count_params(),
        "train_images_per_s": rounds["train"],
        "fit_images_per_s": rounds["fit"],
        "train_vs_fit": round(median["train"] / median["fit"], 3),
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
    parser.add_argument("--repeats", type=int, default=3, help="rounds of Train then fit")
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

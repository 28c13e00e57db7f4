#!/usr/bin/env python3
"""Training-step speed (issue 9), printed as one JSON line.

Default mode: images/s of ``train.Train``'s step (``Train._make_step_fn``, the loop ``Train.train`` runs) with a
softmax head and with an ArcFace head, and of a plain ``keras.Model.fit`` with a ``Dense`` softmax head on the same
backbone as the baseline, all in this run on synthetic in-memory batches (the input pipeline is not measured).
Each figure is the best of ``--repeats`` timed chunks of ``--steps`` steps after a warm-up, which damps the noise
of a shared CPU.

``--partial_fc RATE``: one training step (backbone + NormDense head + ArcFace loss + ``losses.LazySGD`` with momentum) with the full head
over ``--classes`` classes against ``losses.PartialFCNormDense`` at the given sample rate; each variant runs in its
own subprocess so that its peak RSS is its own.

Usage::

    OMP_NUM_THREADS=2 python bench/train_throughput.py --backbone mobilefacenet --batch 64 --classes 10000
    python bench/train_throughput.py --partial_fc 0.1 --classes 1000000 --backbone tiny --batch 64
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import data  # noqa: E402
import losses  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402


def build_backbone(name, image_size, emb_shape):
    """A ``models.buildin_models`` backbone, or ``"tiny"``: two strided convolutions + a Dense embedding (a cheap
    backbone that leaves the classification head as the cost under study)."""
    shape = (image_size, image_size, 3)
    if name != "tiny":
        return models.buildin_models(name, emb_shape=emb_shape, input_shape=shape, output_layer="GDC")
    inputs = keras.Input(shape)
    nn = keras.layers.Conv2D(16, 3, strides=4, activation="relu")(inputs)
    nn = keras.layers.Conv2D(32, 3, strides=4, activation="relu")(nn)
    nn = keras.layers.GlobalAveragePooling2D()(nn)
    return keras.Model(inputs, keras.layers.Dense(emb_shape, name="embedding")(nn), name="tiny")


def synthetic_batches(batch, image_size, classes, seed=0):
    """One fixed batch of normalized random images and labels, repeated forever (no input cost)."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, size=(batch, image_size, image_size, 3)).astype("float32")
    labels = rng.integers(0, classes, size=batch).astype("int32")
    return images, labels


def best_rate(run_chunk, steps, repeats, batch):
    """Images/s of the fastest of ``repeats`` calls of ``run_chunk()`` (each runs ``steps`` steps)."""
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run_chunk()
        best = min(best, time.perf_counter() - start)
    return steps * batch / best


# ---------------------------------------------------------------------------------------------- Train vs fit
def train_step_rate(args, loss, images, labels, workdir):
    """Images/s of ``Train``'s own step function for ``loss`` (its head is built by ``Train``)."""
    ds = tf.data.Dataset.from_tensors((images, {"label": labels})).repeat()
    dataset = data.TrainDataset(ds, steps_per_epoch=1, classes=args.classes, num_images=args.batch)
    tt = train.Train(
        dataset,
        os.path.join(workdir, "bench.keras"),
        basic_model=build_backbone(args.backbone, args.image_size, args.emb_shape),
        batch_size=args.batch,
        steps_per_execution=args.steps,
        jit_compile=args.xla,
        resume=False,
        verbose=0,
    )
    tt.train([{"loss": loss, "optimizer": keras.optimizers.SGD(0.01, momentum=0.9), "epoch": 1}], 0)  # builds, traces
    head_type = losses.get_head_type(loss)
    specs = tt._loss_specs(head_type, loss, 1, 0, 0, 0.35, 0)
    run_steps = tt._make_step_fn(tt.model, specs, tt.optimizer)
    iterator = iter(tt.strategy.experimental_distribute_dataset(ds))
    num = tf.constant(args.steps)
    float(run_steps(iterator, num)["loss"])  # warm-up: trace this step function
    return best_rate(lambda: float(run_steps(iterator, num)["loss"]), args.steps, args.repeats, args.batch)


class _EpochTimer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times = getattr(self, "times", []) + [time.perf_counter() - self.start]


def fit_rate(args, images, labels):
    """Images/s of plain ``keras.Model.fit`` with a ``Dense`` softmax head (best epoch after the first)."""
    backbone = build_backbone(args.backbone, args.image_size, args.emb_shape)
    logits = keras.layers.Dense(args.classes, dtype="float32", name="softmax")(backbone.output)
    model = keras.Model(backbone.inputs, logits)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=args.xla,
        steps_per_execution=args.steps,
    )
    ds = tf.data.Dataset.from_tensors((images, labels)).repeat()
    timer = _EpochTimer()
    model.fit(ds, epochs=1 + args.repeats, steps_per_epoch=args.steps, verbose=0, callbacks=[timer])
    return args.steps * args.batch / min(timer.times[1:])


def compare_train_and_fit(args):
    images, labels = synthetic_batches(args.batch, args.image_size, args.classes)
    with tempfile.TemporaryDirectory() as workdir:
        # fit between the two Train runs, so that a drift of the machine's load does not favour one side
        softmax = train_step_rate(
            args, keras.losses.SparseCategoricalCrossentropy(from_logits=True), images, labels, workdir
        )
        fit = fit_rate(args, images, labels)
        arcface = train_step_rate(args, losses.ArcfaceLoss(), images, labels, workdir)
    return {
        "fit_softmax_images_per_s": round(fit, 2),
        "train_softmax_images_per_s": round(softmax, 2),
        "train_arcface_images_per_s": round(arcface, 2),
        "train_softmax_vs_fit": round(softmax / fit, 3),
        "arcface_slowdown_vs_softmax": round(1 - arcface / softmax, 3),
    }


# ---------------------------------------------------------------------------------------------- partial FC
def head_step_seconds(args, rate):
    """Best seconds of one training step with the full ``NormDense`` head (``rate`` None) or Partial FC."""
    images, labels = synthetic_batches(args.batch, args.image_size, args.classes)
    backbone = build_backbone(args.backbone, args.image_size, args.emb_shape)
    head = losses.NormDense(args.classes) if rate is None else losses.PartialFCNormDense(args.classes, sample_rate=rate)
    head.build((None, args.emb_shape))
    loss_fn = losses.ArcfaceLoss()
    variables = backbone.trainable_variables + [head.kernel]
    optimizer = (
        losses.LazySGD(0.1, momentum=0.9) if args.optimizer == "momentum" else keras.optimizers.get(args.optimizer)
    )
    optimizer.build(variables)

    @tf.function(jit_compile=args.xla)
    def step(images, labels):
        with tf.GradientTape() as tape:
            embeddings = backbone(images, training=True)
            if rate is None:
                cosines, targets = head(embeddings), labels
            else:
                cosines, targets = head.partial_call(embeddings, labels, optimizer.iterations)
            loss = loss_fn(targets, cosines)
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    float(step(images, labels))  # trace + first step
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = step(images, labels)
        float(loss)
        times.append((time.perf_counter() - start) / args.steps)
    return min(times)


def partial_fc_child(args):
    """Run one variant (``--child full|partial``) and print its step time and peak RSS.

    The address space is capped at ``--memory_limit_gib`` so that a head too big for the machine fails here with
    an allocation error instead of pushing other processes into the out-of-memory killer.
    """
    limit = int(args.memory_limit_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    rate = None if args.child == "full" else args.partial_fc
    seconds = head_step_seconds(args, rate)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT" + json.dumps({"step_s": seconds, "peak_rss_mib": peak_mib}))


def compare_partial_fc(args, argv):
    result = {
        "sample_rate": args.partial_fc,
        "sampled_classes": losses.partial_fc_num_sampled(args.classes, args.partial_fc, args.batch),
        "memory_limit_gib": args.memory_limit_gib,
    }
    for variant in ("partial", "full"):
        proc = subprocess.run([sys.executable, __file__, *argv, "--child", variant], capture_output=True, text=True)
        if proc.returncode != 0:
            result[f"{variant}_error"] = (proc.stderr.strip().splitlines() or ["killed"])[-1][:300]
            continue
        child = json.loads(proc.stdout.split("RESULT")[-1])
        result[f"{variant}_step_s"] = round(child["step_s"], 4)
        result[f"{variant}_peak_rss_mib"] = round(child["peak_rss_mib"])
        print(variant, child, file=sys.stderr, flush=True)
    if "full_step_s" in result and "partial_step_s" in result:
        result["speedup"] = round(result["full_step_s"] / result["partial_step_s"], 2)
    return result


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="mobilefacenet", help="models.buildin_models name, or 'tiny'")
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument("--emb_shape", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10000)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed chunk")
    parser.add_argument("--repeats", type=int, default=3, help="timed chunks; the best one is reported")
    parser.add_argument("--precision", default="float32", help="keras mixed precision policy, e.g. mixed_bfloat16")
    parser.add_argument("--xla", action="store_true", help="jit_compile the steps")
    parser.add_argument(
        "--partial_fc", type=float, default=0, help="compare Partial FC at this rate with the full head"
    )
    parser.add_argument(
        "--optimizer",
        default="momentum",
        help="Partial FC mode: 'momentum' (losses.LazySGD, momentum 0.9) or a Keras name",
    )
    parser.add_argument("--memory_limit_gib", type=float, default=14, help="address-space cap of each Partial FC child")
    parser.add_argument("--child", choices=("full", "partial"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    keras.mixed_precision.set_global_policy(args.precision)
    keras.utils.set_random_seed(0)
    if args.child:
        return partial_fc_child(args)
    result = compare_partial_fc(args, argv) if args.partial_fc else compare_train_and_fit(args)
    setting = {
        key: getattr(args, key)
        for key in ("backbone", "image_size", "emb_shape", "batch", "classes", "precision", "xla")
    }
    load = os.getloadavg()[0]
    print(
        json.dumps({**setting, **result, "steps": args.steps, "repeats": args.repeats, "load_avg_1min": round(load, 2)})
    )


if __name__ == "__main__":
    main()

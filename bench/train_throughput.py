#!/usr/bin/env python3
"""Training speed, printed as one JSON line.

``--vs-keras2 --data DIR``: ``train.Train`` against the library users run today (Keras_insightface: TensorFlow with
legacy Keras 2, ``model.fit``; ``bench/keras2_reference.py``) on the same network, the same JPEG folder and the same
settings (batch 64, SGD momentum 0.9, ArcFace s=64, random flip, ``--precision``: float32 unless given). Each side
runs in its own process, alternated ``--repeats`` times; images/s is the median of the steady-state batch-to-batch
times of a run, and the ratio compares the medians over the runs. In float32 each repeat also times the network's
convolution kernels alone (``bench/conv_floor.py``): the rate no library could beat with them; and the same with the
fused batch-norm kernels added (``conv_bn_floor``). ``--data`` defaults to 2,000 generated 112x112 demo faces (100
classes).

``--backend jax``: images/s of the JAX step runner (ArcFace head, SGD momentum) on one synthetic in-memory batch;
needs only JAX, Keras and this repository, not TensorFlow (a GPU machine without TensorFlow runs it).
``--vs-backends``: TensorFlow (``Train``) and JAX alternated on the same synthetic batches, each run a fresh process.

Default mode: ``Train``'s loop with a softmax and with an ArcFace head against a plain Keras 3 ``model.fit`` on
synthetic in-memory batches (the input pipeline is not measured).

``--partial_fc RATE``: one training step (backbone + NormDense head + ArcFace loss + ``losses.LazySGD`` with momentum)
with the full head over ``--classes`` classes against ``losses.PartialFCNormDense`` at the given sample rate; each
variant runs in its own subprocess so that its peak RSS is its own.

Usage::

    OMP_NUM_THREADS=2 python bench/train_throughput.py --vs-keras2 --network mobilefacenet --repeats 3
    OMP_NUM_THREADS=2 python bench/train_throughput.py --vs-backends --network mobilefacenet --classes 100
    python bench/train_throughput.py --backend jax --network r50 --batch 256 --precision mixed_bfloat16
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
if "--backend" in sys.argv:  # before Keras is imported: the backend is chosen once per process
    os.environ["KERAS_BACKEND"] = sys.argv[sys.argv.index("--backend") + 1]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_insightface.models import zoo as models  # noqa: E402
from keras_insightface.nn import losses  # noqa: E402


def build_backbone(name, image_size, emb_shape, output_layer="GDC"):
    """A ``models.buildin_models`` backbone, or ``"tiny"``: two strided convolutions + a Dense embedding (a cheap
    backbone that leaves the classification head as the cost under study)."""
    shape = (image_size, image_size, 3)
    if name != "tiny":
        return models.buildin_models(name, emb_shape=emb_shape, input_shape=shape, output_layer=output_layer)
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


# ---------------------------------------------------------------------------------------------- Train vs fit
class BatchTimes(keras.callbacks.Callback):
    """Wall-clock time at the end of every batch."""

    def on_train_batch_end(self, batch, logs=None):
        self.times = getattr(self, "times", []) + [time.perf_counter()]


def steady_rate(times, batch, warmup):
    """Images/s of the median batch-to-batch time after ``warmup`` batches (trace, first steps) are dropped."""
    return batch / float(np.median(np.diff(times[warmup - 1 :])))


def train_rate(args, loss, dataset, workdir, warmup=3):
    """``(images/s, first-step seconds)`` of ``Train``'s loop with ``loss`` (its head is built by ``Train``)."""
    from keras_insightface.training import train

    timer = BatchTimes()
    tt = train.Train(
        dataset,
        os.path.join(workdir, "bench.keras"),
        basic_model=build_backbone(args.backbone, args.image_size, args.emb_shape, args.output_layer),
        batch_size=args.batch,
        steps_per_execution=args.steps_per_execution,
        jit_compile=args.xla,
        resume=False,
        verbose=0,
        plot_history=False,
        random_status=0,
        callbacks=[timer],
        mixed_precision=None if args.precision == "float32" else args.precision,
    )
    start = time.perf_counter()
    tt.train([{"loss": loss, "optimizer": keras.optimizers.SGD(0.01, momentum=0.9), "epoch": 1}], 0)
    return steady_rate(timer.times, args.batch * args.steps_per_execution, warmup), timer.times[0] - start


def fit_rate(args, images, labels, warmup=3):
    """Images/s of plain ``keras.Model.fit`` with a ``Dense`` softmax head."""
    import tensorflow as tf

    backbone = build_backbone(args.backbone, args.image_size, args.emb_shape, args.output_layer)
    logits = keras.layers.Dense(args.classes, dtype="float32", name="softmax")(backbone.output)
    model = keras.Model(backbone.inputs, logits)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=args.xla,
    )
    timer = BatchTimes()
    ds = tf.data.Dataset.from_tensors((images, labels)).repeat()
    model.fit(ds, epochs=1, steps_per_epoch=args.steps + warmup, verbose=0, callbacks=[timer])
    return steady_rate(timer.times, args.batch, warmup)


def compare_train_and_fit(args):
    import tensorflow as tf

    from keras_insightface.data import pipeline as data

    images, labels = synthetic_batches(args.batch, args.image_size, args.classes)
    ds = tf.data.Dataset.from_tensors((images, {"label": labels})).repeat()
    dataset = data.TrainDataset(ds, steps_per_epoch=args.steps + 3, classes=args.classes, num_images=args.batch)
    with tempfile.TemporaryDirectory() as workdir:
        # fit between the two Train runs, so that a drift of the machine's load does not favour one side
        softmax, _ = train_rate(args, keras.losses.SparseCategoricalCrossentropy(from_logits=True), dataset, workdir)
        fit = fit_rate(args, images, labels)
        arcface, _ = train_rate(args, losses.ArcfaceLoss(), dataset, workdir)
    return {
        "fit_softmax_images_per_s": round(fit, 2),
        "train_softmax_images_per_s": round(softmax, 2),
        "train_arcface_images_per_s": round(arcface, 2),
        "train_softmax_vs_fit": round(softmax / fit, 3),
        "arcface_slowdown_vs_softmax": round(1 - arcface / softmax, 3),
    }


# ---------------------------------------------------------------------------------------------- vs tf-keras
NETWORK_HEADS = {"mobilefacenet": ("GDC", 256), "r50": ("E", 512)}  # the networks: output layer, emb size


def ours_child(args):
    """``Train`` on the JPEG folder: ArcFace s=64, SGD momentum 0.9, random flip (one process per run)."""
    from keras_insightface.data import pipeline as data

    with tempfile.TemporaryDirectory() as workdir:
        dataset = data.prepare_dataset(
            args.data, batch_size=args.batch, img_shape=(args.image_size,) * 2, random_status=0, cache_dir=workdir
        )
        dataset.steps_per_epoch = args.steps + 5
        rate, first = train_rate(args, losses.ArcfaceLoss(scale=64), dataset, workdir, warmup=5)
    print("RESULT" + json.dumps({"images_per_s": round(rate, 2), "first_step_s": round(first, 2)}), flush=True)


def _run_child(command):
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "child failed")
    return json.loads(proc.stdout.split("RESULT")[-1])


def compare_with_keras2(args, argv):
    """Alternate ours / tf-keras runs (and in float32 the convolution floor), each in a fresh process; medians and
    their ratios."""
    if not args.data:
        from keras_insightface.data import demo as demo_data

        args.data = demo_data.make_demo_dataset(
            os.path.join(tempfile.gettempdir(), "keras2_bench_faces"), num_classes=100, images_per_class=20,
            num_eval_classes=2, eval_images_per_class=2, num_pairs=2, image_size=args.image_size,
        )["train_dir"]  # fmt: skip
    common = ["--data", args.data, "--batch", str(args.batch), "--image_size", str(args.image_size)]
    common += ["--emb_shape", str(args.emb_shape), "--output_layer", args.output_layer, "--steps", str(args.steps)]
    common += ["--precision", args.precision]
    ours_cmd = [sys.executable, __file__, "--child", "ours", "--backbone", args.backbone, *common]
    ours_cmd += ["--steps_per_execution", str(args.steps_per_execution)] + (["--xla"] if args.xla else [])
    reference_cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "keras2_reference.py")]
    reference_cmd += ["--network", args.backbone, *common]
    floor_cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "conv_floor.py"), "--network", args.backbone]
    floor_cmd += ["--batch", str(args.batch), "--image_size", str(args.image_size), "--output_layer", args.output_layer]
    runs = {"ours": [], "keras2": [], "floor": [], "conv_bn_floor": []}
    for _ in range(args.repeats):
        for name, command in (("ours", ours_cmd), ("keras2", reference_cmd)):
            runs[name].append(_run_child(command))
            print(name, runs[name][-1], file=sys.stderr, flush=True)
        if args.precision == "float32":  # the floor times float32 kernels
            floor = _run_child(floor_cmd)
            runs["floor"].append({"images_per_s": floor["floor_images_per_s"]})
            runs["conv_bn_floor"].append({"images_per_s": floor["conv_bn_floor_images_per_s"]})
    return _keras2_summary(runs)


def _keras2_summary(runs):
    """Each side's rates and first steps, the ratio of the medians and, in float32, the convolution floor: the
    fastest any library could train the network with these convolution kernels (``bench/conv_floor.py``), alone
    and with the fused batch-norm kernels added."""
    median = {
        name: float(np.median([run["images_per_s"] for run in results])) for name, results in runs.items() if results
    }
    first = {name: float(np.median([run["first_step_s"] for run in runs[name]])) for name in ("ours", "keras2")}
    summary = {
        "ours_images_per_s": [run["images_per_s"] for run in runs["ours"]],
        "keras2_images_per_s": [run["images_per_s"] for run in runs["keras2"]],
        "ours_vs_keras2": round(median["ours"] / median["keras2"], 3),
        "ours_first_step_s": [run["first_step_s"] for run in runs["ours"]],
        "keras2_first_step_s": [run["first_step_s"] for run in runs["keras2"]],
        "first_step_ratio": round(first["ours"] / first["keras2"], 3),
    }
    if runs["floor"]:
        summary["conv_floor_images_per_s"] = [run["images_per_s"] for run in runs["floor"]]
        summary["floor_vs_keras2"] = round(median["floor"] / median["keras2"], 3)
        summary["conv_bn_floor_images_per_s"] = [run["images_per_s"] for run in runs["conv_bn_floor"]]
        summary["conv_bn_floor_vs_keras2"] = round(median["conv_bn_floor"] / median["keras2"], 3)
    return summary


# ---------------------------------------------------------------------------------------------- backends
def jax_rate(args, images, labels, warmup=3):
    """``(images/s, first-step seconds)`` of ``runner_jax.JaxStepRunner`` on one in-memory batch, ArcFace head
    (needs only JAX and Keras: no TensorFlow, no ``tf.data``)."""
    from keras_insightface.training import runner_jax, stages

    basic_model = build_backbone(args.backbone, args.image_size, args.emb_shape, args.output_layer)
    stage = stages.StageBuilder(basic_model, classes=args.classes).build(
        losses.ArcfaceLoss(), optimizer=keras.optimizers.SGD(0.01, momentum=0.9)
    )
    run_steps = runner_jax.JaxStepRunner().train_function(stage, args.classes)
    batches = iter(lambda: (images, {"label": labels}), None)  # the same batch forever
    start = time.perf_counter()
    times = []
    for _ in range(warmup + args.steps):
        run_steps(batches, 1)
        times.append(time.perf_counter())
    return steady_rate(times, args.batch, warmup), times[0] - start


def backend_child(args):
    """One run on the Keras backend of this process, synthetic in-memory batches: TensorFlow through ``Train``,
    JAX through the JAX step runner."""
    images, labels = synthetic_batches(args.batch, args.image_size, args.classes)
    if keras.backend.backend() == "jax":
        rate, first = jax_rate(args, images, labels)
    else:
        import tensorflow as tf

        from keras_insightface.data import pipeline as data

        ds = tf.data.Dataset.from_tensors((images, {"label": labels})).repeat()
        dataset = data.TrainDataset(ds, steps_per_epoch=args.steps + 3, classes=args.classes, num_images=args.batch)
        with tempfile.TemporaryDirectory() as workdir:
            rate, first = train_rate(args, losses.ArcfaceLoss(), dataset, workdir)
    result = {"backend": keras.backend.backend(), "images_per_s": round(rate, 2), "first_step_s": round(first, 2)}
    print("RESULT" + json.dumps(result), flush=True)


def compare_backends(args):
    """Alternate TensorFlow / JAX runs (fresh processes) on the same synthetic batches; medians and their ratio."""
    command = [sys.executable, __file__, "--child", "backend", "--backbone", args.backbone, "--batch", str(args.batch)]
    command += ["--image_size", str(args.image_size), "--emb_shape", str(args.emb_shape), "--steps", str(args.steps)]
    command += ["--output_layer", args.output_layer, "--classes", str(args.classes), "--precision", args.precision]
    runs = {"tensorflow": [], "jax": []}
    for _ in range(args.repeats):
        for backend in runs:
            runs[backend].append(_run_child([*command, "--backend", backend]))
            print(backend, runs[backend][-1], file=sys.stderr, flush=True)
    median = {name: float(np.median([run["images_per_s"] for run in results])) for name, results in runs.items()}
    summary = {f"{name}_images_per_s": [run["images_per_s"] for run in results] for name, results in runs.items()}
    summary.update({f"{name}_first_step_s": [run["first_step_s"] for run in results] for name, results in runs.items()})
    return dict(summary, jax_vs_tensorflow=round(median["jax"] / median["tensorflow"], 3))


# ---------------------------------------------------------------------------------------------- partial FC
def head_step_seconds(args, rate):
    """Best seconds of one training step with the full ``NormDense`` head (``rate`` None) or Partial FC."""
    import tensorflow as tf

    images, labels = synthetic_batches(args.batch, args.image_size, args.classes)
    backbone = build_backbone(args.backbone, args.image_size, args.emb_shape, args.output_layer)
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
    parser.add_argument("--backbone", "--network", default="mobilefacenet", help="buildin_models name, or 'tiny'")
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument("--emb_shape", type=int, default=None, help="default: 256 for mobilefacenet, else 512")
    parser.add_argument("--output_layer", default=None, help="default: E for r50, else GDC")
    parser.add_argument("--vs-keras2", dest="vs_keras2", action="store_true", help="compare with tf-keras fit")
    parser.add_argument("--data", help="--vs-keras2: class folder of JPEGs (default: generated demo faces)")
    parser.add_argument("--steps_per_execution", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10000)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (after the warm-up steps)")
    parser.add_argument("--repeats", type=int, default=3, help="runs (--vs-keras2) or timed chunks (--partial_fc)")
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
    parser.add_argument("--backend", choices=("tensorflow", "jax"), help="run on this Keras backend (synthetic data)")
    parser.add_argument("--vs-backends", dest="vs_backends", action="store_true", help="TensorFlow vs JAX, alternated")
    parser.add_argument("--child", choices=("full", "partial", "ours", "backend"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    output_layer, emb_shape = NETWORK_HEADS.get(args.backbone, ("GDC", 512))
    args.output_layer, args.emb_shape = args.output_layer or output_layer, args.emb_shape or emb_shape
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    keras.mixed_precision.set_global_policy(args.precision)
    keras.utils.set_random_seed(0)
    if args.child or args.backend:
        children = {"ours": ours_child, "backend": backend_child, None: backend_child}
        return children.get(args.child, partial_fc_child)(args)
    if args.vs_keras2 or args.vs_backends:
        result = compare_with_keras2(args, argv) if args.vs_keras2 else compare_backends(args)
    else:
        result = compare_partial_fc(args, argv) if args.partial_fc else compare_train_and_fit(args)
    keys = ("backbone", "image_size", "emb_shape", "output_layer", "batch", "precision", "xla")
    setting = {key: getattr(args, key) for key in keys + (() if args.vs_keras2 else ("classes",))}
    load = os.getloadavg()[0]
    print(
        json.dumps({**setting, **result, "steps": args.steps, "repeats": args.repeats, "load_avg_1min": round(load, 2)})
    )  # fmt: skip


if __name__ == "__main__":
    main()

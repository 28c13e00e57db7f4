"""The sharded head against the replicated one on 8 JAX host devices: step time and memory per device at 100 k and
1 M classes (embedding 512, a small backbone, ArcFace, SGD with momentum), and the largest class count each fits in
this machine's memory. Prints one JSON line.

    python bench/sharded_head.py                      # the figures of the README (a few minutes on 2 cores)
    python bench/sharded_head.py --classes 100000 --repeats 3

Variants: ``replicated`` (``keras.distribution.DataParallel``: every device holds the whole head and its momentum,
as without the option), ``replicated_pfc`` (the same with Partial FC 0.1, sampled over the whole head),
``sharded`` (``sharded_head=True``) and ``sharded_pfc`` (with Partial FC 0.1 on each shard). Steps of the variants
alternate; medians. Memory per device: the head and its momentum from the arrays' addressable shards, and the step's
peak from the compiled program (arguments + outputs - donated + scratch). The variants run in pairs (replicated and
sharded, with and without Partial FC); one whose estimated footprint (the peak per device x 8) exceeds the memory
available at that moment is not built: its figures are the estimate, marked ``fits: false``.
``largest``: per variant, the class count whose peak x 8 equals the memory available (the peak is affine in the class
count: fitted through the two measured sizes, or through a size built only to measure it); ``--confirm`` then runs
one step at 90 % of it.
"""

import argparse
import gc
import json
import os
import sys
import time

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_insightface.nn import losses  # noqa: E402
from keras_insightface.training import runner_jax, sharding, stages  # noqa: E402

EMB, SIZE, BATCH = 512, 32, 64  # global batch: 8 images per device
VARIANTS = {
    "replicated": (False, 1.0),
    "replicated_pfc": (False, 0.1),
    "sharded": (True, 1.0),
    "sharded_pfc": (True, 0.1),
}


def backbone():
    """A small conv net, 32 x 32 -> 512: the head dominates the step."""
    inputs = keras.Input((SIZE, SIZE, 3))
    nn = inputs
    for filters in (16, 32):
        nn = keras.layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False)(nn)
        nn = keras.layers.ReLU()(keras.layers.BatchNormalization()(nn))
    nn = keras.layers.Dense(EMB, use_bias=False)(keras.layers.GlobalAveragePooling2D()(nn))
    return keras.Model(inputs, keras.layers.BatchNormalization(name="embedding")(nn))


def available_bytes():
    """MemAvailable of this machine now, less 3 GB of margin (the process's own growth, other users' jobs)."""
    with open("/proc/meminfo") as ff:
        fields = dict(line.split(":") for line in ff)
    return int(fields["MemAvailable"].split()[0]) * 1024 - 3 * 2**30


class Built:
    """One variant at one class count: its compiled step, state and batch, and its memory per device."""

    def __init__(self, variant, classes):
        sharded, rate = VARIANTS[variant]
        distribution = sharding.head_distribution(True, rate) if sharded else keras.distribution.DataParallel()
        keras.distribution.set_distribution(distribution)
        keras.utils.set_random_seed(0)
        builder = stages.StageBuilder(backbone(), classes=classes, partial_fc_rate=rate)
        stage = builder.build(losses.ArcfaceLoss(), optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
        runner = runner_jax.JaxStepRunner()
        lists = runner._state_variables(stage)
        self.state = sharding.placed(tuple([variable.value for variable in variables] for variables in lists))
        rng = np.random.default_rng(0)
        batch = (
            rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype("float32"),
            {"label": rng.integers(0, classes, BATCH).astype("int32")},
        )
        self.batch = jax.device_put(batch, sharding.batch_sharding(distribution, BATCH))
        self.step = runner._step(stage, classes).lower(self.state, (self.batch,)).compile()
        memory = self.step.memory_analysis()
        self.peak = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
        self.peak += memory.temp_size_in_bytes
        kernel = stage.model.get_layer("arcface").kernel
        slot = next(var for var in stage.optimizer.variables if var.shape == kernel.shape)
        self.head = sum(variable.value.addressable_shards[0].data.nbytes for variable in (kernel, slot))
        keras.distribution.set_distribution(None)

    def run(self):
        start = time.perf_counter()
        self.state, logs = self.step(self.state, (self.batch,))
        jax.block_until_ready(logs)
        return time.perf_counter() - start


def estimate(variant, classes, measured):
    """Peak bytes per device before building: proportional to the class count from a smaller size measured, else
    the head, its momentum and four more kernel-sized temporaries, and four copies of the cosines."""
    smaller = [(size, row[variant]["peak_bytes"]) for size, row in measured.items() if row[variant].get("fits")]
    if smaller:
        size, peak = max(smaller)
        return peak * classes // size
    share = 8 if VARIANTS[variant][0] else 1
    return (6 * classes * EMB * 4 + 4 * BATCH * classes * 4) // share


PAIRS = (("replicated", "sharded"), ("replicated_pfc", "sharded_pfc"))  # alive together, steps alternating


def measure_pair(pair, classes, repeats, measured):
    """Median step seconds and memory of the variants of ``pair`` that fit in the memory available now, their steps
    alternating; estimates for the others."""
    built, rows = {}, {}
    for variant in pair:
        need = estimate(variant, classes, measured) * 8
        if need > available_bytes():
            rows[variant] = {"fits": False, "estimated_peak_mb_per_device": round(need / 8 / 2**20)}
            continue
        built[variant] = Built(variant, classes)
        built[variant].run()  # the first run allocates the outputs
    times = {variant: [] for variant in built}
    for _ in range(repeats):
        for variant, one in built.items():
            times[variant].append(one.run())
    for variant, one in built.items():
        rows[variant] = {
            "fits": True,
            "step_s": round(float(np.median(times[variant])), 3),
            "head_and_momentum_mb_per_device": round(one.head / 2**20, 1),
            "step_peak_mb_per_device": round(one.peak / 2**20, 1),
            "peak_bytes": one.peak,
        }
    return rows


def measure(classes, repeats, measured):
    """Every variant at ``classes``, pair by pair (a pair's arrays are freed before the next is built)."""
    rows = {}
    for pair in PAIRS:
        rows.update(measure_pair(pair, classes, repeats, measured))
        gc.collect()
    return rows


def largest(measured, variant, fits_in):
    """The class count at which the variant's peak x 8 equals ``fits_in``, affine through two measured sizes (a
    smaller one built only to measure it when fewer were)."""
    points = [(size, row[variant]["peak_bytes"]) for size, row in measured.items() if row[variant].get("fits")]
    while len(points) < 2:
        size = min([size for size, _ in points] + list(measured)) // 2
        points.append((size, Built(variant, size).peak))
    (c0, p0), (c1, p1) = sorted(points)[:2]
    slope = (p1 - p0) / (c1 - c0)
    return int((fits_in / 8 - (p0 - slope * c0)) / slope) // 1024 * 1024


def paper_head(identities, devices, sharded, sampled, emb=512, batch=1024):
    """GB per device of a head of float32 centers with SGD momentum, global batch ``batch``: centers + momentum, the
    kernel gradient (dense when replicated, as the replicated JAX step computes it; of the sampled rows plus their
    gathered momentum rows when sharded with Partial FC) and three copies of the cosines (logits, softmax and their
    gradient; a replicated device holds its own images' rows of all classes, a shard all images' rows of its
    classes)."""
    centers = identities * emb * 4 / (devices if sharded else 1) / 1e9
    gradient = 2 * sampled * centers if sharded and sampled < 1 else centers
    cosines = 3 * batch * identities * sampled * 4 / devices / 1e9
    return {"centers_and_momentum": 2 * centers, "gradient": gradient, "cosines": cosines}


def paper_table(device_gb=80, rate=0.1, backbone_gb=16):
    """The head per device on N x ``device_gb`` GB for 10 M and 100 M identities (``paper_head``), and whether it
    leaves ``backbone_gb`` for an r100 and its activations."""
    rows = []
    for identities, devices in ((10_000_000, 8), (100_000_000, 8), (100_000_000, 16)):
        for sharded in (False, True) if devices == 8 else (True,):
            for sampled in (1.0, rate):
                gb = paper_head(identities, devices, sharded, sampled)
                total = sum(gb.values())
                name = ("sharded" if sharded else "replicated") + ("" if sampled == 1 else f" + Partial FC {rate}")
                row = {"identities": identities, "devices": devices, "head": name}
                row.update({key + "_gb": round(value, 1) for key, value in gb.items()})
                rows.append(dict(row, total_gb=round(total, 1), fits=total <= device_gb - backbone_gb))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--confirm", action="store_true", help="run one step at 90 %% of each largest class count")
    parser.add_argument("--paper", action="store_true", help="only the table on paper for 10 M and 100 M identities")
    args = parser.parse_args(argv)
    if args.paper:
        return print(json.dumps(paper_table()))
    fits_in, load = available_bytes() + 3 * 2**30, os.getloadavg()  # what the 8 devices may use in all
    results = {}
    for classes in sorted(args.classes):
        results[classes] = measure(classes, args.repeats, results)
    biggest = {variant: largest(results, variant, fits_in) for variant in VARIANTS}
    confirmed = {}
    if args.confirm:
        for variant, classes in biggest.items():
            one = Built(variant, int(classes * 0.9) // 1024 * 1024)
            confirmed[variant] = {"classes": int(classes * 0.9) // 1024 * 1024, "step_s": round(one.run(), 2)}
            del one
    for rows in results.values():
        for row in rows.values():
            row.pop("peak_bytes", None)
    print(
        json.dumps(
            {
                "devices": jax.device_count(),
                "emb": EMB,
                "global_batch": BATCH,
                "memory_available_gb": round(fits_in / 2**30, 1),
                "load_average_before": [round(x, 2) for x in load],
                "load_average_after": [round(x, 2) for x in os.getloadavg()],
                "results": results,
                "largest_classes": biggest,
                "confirmed": confirmed,
            }
        )
    )


if __name__ == "__main__":
    main()

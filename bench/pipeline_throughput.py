#!/usr/bin/env python3
"""Input-pipeline speed: images/s of ``data.prepare_dataset`` alone (read + JPEG decode + augmentation + batch,
no model) for each ``random_status`` and each source of the same generated 112x112 JPEGs: the class folder, the
MXNet RecordIO file packed from it (``.rec``) and TFRecord shards written from that (``shards``). One JSON line.

Each timed run builds a fresh pipeline, pulls 3 warm-up batches (graph building, autotune, index and file cache),
then times ``--batches`` batches (more than one epoch by default, so epoch boundaries count). The sources are
alternated within each of ``--repeats`` rounds; the median and the best run of each are reported, and the median
CPU time per image (all threads), which other jobs on the machine disturb less than the wall time.

Usage: ``python bench/pipeline_throughput.py [--statuses 0 3] [--sources folder rec shards] [--batch 64]``.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_insightface.data import demo as demo_data  # noqa: E402
from keras_insightface.data import pipeline as data  # noqa: E402
from keras_insightface.data import shards  # noqa: E402
from keras_insightface.tools import prepare_data  # noqa: E402

SOURCES = ("folder", "rec", "shards")


def images_per_second(data_path, random_status, batch, batches, cache_dir):
    """``(images/s, CPU ms per image)`` of iterating ``batches`` batches of ``prepare_dataset(data_path,
    random_status=...)``; the CPU time (all threads of this process) is less sensitive to other jobs on the
    machine than the wall time."""
    dataset = data.prepare_dataset(
        data_path, batch_size=batch, img_shape=(112, 112), random_status=random_status, cache_dir=cache_dir, seed=0
    )
    iterator = iter(dataset.dataset)
    for _ in range(3):  # warm-up: graph building, autotune, file cache
        next(iterator)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(iterator)
    cpu = time.process_time() - cpu_start
    return batches * batch / (time.perf_counter() - start), 1000 * cpu / (batches * batch)


def make_sources(root, sources, num_shards):
    """The generated class folder and, as asked, its ``.rec`` and shards; ``{source: data_path}``."""
    paths = demo_data.make_demo_dataset(
        root,
        num_classes=100,
        images_per_class=20,
        num_eval_classes=2,
        eval_images_per_class=2,
        num_pairs=2,
        image_size=112,
    )
    found = {"folder": paths["train_dir"]}
    for folder in ("rec", "shards", "cache"):  # written again: a kept --data_dir may hold older ones
        shutil.rmtree(os.path.join(root, folder), ignore_errors=True)
    if "rec" in sources or "shards" in sources:
        found["rec"] = prepare_data.pack_folder(paths["train_dir"], os.path.join(root, "rec"))["rec"]
    if "shards" in sources:
        found["shards"] = os.path.join(root, "shards")
        shards.write_shards(found["rec"], found["shards"], num_shards, os.path.join(root, "cache"), progress=False)
    return {source: found[source] for source in sources}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--statuses", type=int, nargs="+", default=[-1, 0, 1, 2, 3, 100])
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=40, help="batches per timed run (2,000 images per epoch)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each times every source once")
    parser.add_argument("--shards", type=int, default=16, help="number of shards written")
    parser.add_argument("--data_dir", default=None, help="where the data is generated (default: a temp dir)")
    args = parser.parse_args(argv)
    runs = {source: {str(status): [] for status in args.statuses} for source in args.sources}
    cpu_ms = {source: {str(status): [] for status in args.statuses} for source in args.sources}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_dir or tmp
        paths = make_sources(root, args.sources, args.shards)
        cache_dir = os.path.join(root, "cache")
        for status in args.statuses:
            for _ in range(args.repeats):
                for source, path in paths.items():  # alternated: the machine's speed drifts between runs
                    rate, cpu = images_per_second(path, status, args.batch, args.batches, cache_dir)
                    runs[source][str(status)].append(round(rate, 1))
                    cpu_ms[source][str(status)].append(round(cpu, 3))
    result = {
        "images_per_s_median": {
            src: {st: statistics.median(rr) for st, rr in row.items()} for src, row in runs.items()
        },
        "images_per_s_best": {src: {st: max(rr) for st, rr in row.items()} for src, row in runs.items()},
        "cpu_ms_per_image_median": {
            src: {st: statistics.median(rr) for st, rr in row.items()} for src, row in cpu_ms.items()
        },
        "runs": runs,
        "image_size": 112,
        "batch": args.batch,
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps({**result, "load_avg_1min": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Input-pipeline speed: images/s of ``data.prepare_dataset`` alone (JPEG decode + augmentation + batch,
no model) for each ``random_status``, on a generated folder of 112x112 JPEGs; printed as one JSON line.

Each figure is the best of ``--repeats`` timed runs of ``--batches`` batches after a warm-up of 3 batches.

Usage: ``python bench/pipeline_throughput.py [--statuses -1 0 1 2 3 100] [--batch 64] [--data_dir DIR]``.
"""

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import demo_data  # noqa: E402


def images_per_second(train_dir, random_status, batch, batches, repeats, cache_dir):
    """Best images/s of iterating ``batches`` batches of ``prepare_dataset(train_dir, random_status=...)``."""
    dataset = data.prepare_dataset(
        train_dir, batch_size=batch, img_shape=(112, 112), random_status=random_status, cache_dir=cache_dir, seed=0
    )
    iterator = iter(dataset.dataset)
    for _ in range(3):  # warm-up: graph building, autotune, file cache
        next(iterator)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        best = min(best, time.perf_counter() - start)
    return batches * batch / best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--statuses", type=int, nargs="+", default=[-1, 0, 1, 2, 3, 100])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20, help="batches per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best one is reported")
    parser.add_argument("--data_dir", default=None, help="where the JPEG folder is generated (default: a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_dir or tmp
        paths = demo_data.make_demo_dataset(
            root,
            num_classes=100,
            images_per_class=20,
            num_eval_classes=2,
            eval_images_per_class=2,
            num_pairs=2,
            image_size=112,
        )
        rates = {
            str(status): round(
                images_per_second(
                    paths["train_dir"], status, args.batch, args.batches, args.repeats, os.path.join(tmp, "cache")
                ),
                1,
            )
            for status in args.statuses
        }
    result = {
        "images_per_s_by_random_status": rates,
        "image_size": 112,
        "batch": args.batch,
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps({**result, "load_avg_1min": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()

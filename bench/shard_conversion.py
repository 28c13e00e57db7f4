#!/usr/bin/env python3
"""Conversion speed of ``prepare_data.py --to-shards``: MB/s of ``shards.write_shards`` on a generated insightface
``train.rec`` next to a plain ``cp`` of the same file, alternated in one run, medians. One JSON line.

The ``.rec`` holds ``--mb`` megabytes of real 112x112 JPEGs (2,000 generated images, repeated, 100 identities,
with the identity header record). Each timing ends with a ``sync``: the copy is on the disk. Both copies read the
same file, so with a file smaller than the free memory both read it from the page cache. For figures that read the
disk too, use a file larger than the memory (``--mb``) or drop the page cache before each copy (root:
``sync; echo 3 > /proc/sys/vm/drop_caches``) with ``--drop_caches``.

``--workers 1 2`` times the conversion in one process and in two (each converts its own groups of 16 shards; the
start of the processes is included).

Usage: ``python bench/shard_conversion.py [--mb 1000] [--rounds 3] [--shards 64] [--workers 1 2] [--dir DIR]``.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from keras_insightface.data import demo as demo_data  # noqa: E402
from keras_insightface.data import (
    recordio,  # noqa: E402
    shards,  # noqa: E402
)
from keras_insightface.data.formats import scan_class_folder  # noqa: E402


def make_rec(root, megabytes):
    """``root/rec/train.rec`` + ``train.idx`` of about ``megabytes`` MB: the generated JPEGs repeated, class-major."""
    paths = demo_data.make_demo_dataset(os.path.join(root, "demo"), 100, 20, 2, 2, 2, image_size=112)
    names, labels, _ = scan_class_folder(paths["train_dir"])
    images = [open(name, "rb").read() for name in names]  # noqa: SIM115
    repeats = max(1, int(megabytes * 1e6 / sum(map(len, images))))
    labels = np.repeat(labels, repeats)  # each identity's images stay together, as in the published sets
    order = np.repeat(np.arange(len(images)), repeats)
    first, counts = len(order) + 1, np.bincount(labels)
    stops = np.cumsum(counts) + 1

    def records():
        yield 0, recordio.pack_record([first, first + len(counts)], b"")
        for key, (image, label) in enumerate(zip(order, labels), start=1):
            yield key, recordio.pack_record(int(label), images[image])
        for label, stop in enumerate(stops):
            yield first + label, recordio.pack_record([stop - counts[label], stop], b"")

    folder = os.path.join(root, "rec")
    recordio.write_recordio(os.path.join(folder, "train.rec"), os.path.join(folder, "train.idx"), records())
    return folder


def drop_caches():
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as ff:
        ff.write("3\n")


def timed_cp(rec_path, dest):
    start = time.perf_counter()
    subprocess.run(["cp", rec_path, dest], check=True)
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - start


def timed_shards(folder, dest, num_shards, cache_dir, workers):
    start = time.perf_counter()
    shards.PARALLEL_MIN_BYTES = 0  # measure what was asked for, whatever the size
    shards.write_shards(folder, dest, num_shards, cache_dir, progress=False, workers=workers)
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=1000, help="size of the generated train.rec")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shards", type=int, default=64, help="shards written (16 per group; a group per process)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count()], help="processes, one row each")
    parser.add_argument("--dir", default=None, help="where to generate and write (default: a temp dir)")
    parser.add_argument("--drop_caches", action="store_true", help="drop the page cache before each copy (root)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        folder = make_rec(root, args.mb)
        rec_path, cache_dir = os.path.join(folder, "train.rec"), os.path.join(root, "cache")
        recordio.load_index(folder, cache_dir, progress=False)  # the index is built once, as a first training does
        shards.write_shards(folder, os.path.join(root, "warm"), args.shards, cache_dir, progress=False)  # TF start-up
        shutil.rmtree(os.path.join(root, "warm"))
        size = os.path.getsize(rec_path)
        seconds = {"cp": [], **{f"to_shards_{workers}_processes": [] for workers in args.workers}}
        for _ in range(args.rounds):
            for name in seconds:  # alternated
                dest = os.path.join(root, "out")
                if args.drop_caches:
                    drop_caches()
                if name == "cp":
                    seconds[name].append(timed_cp(rec_path, dest))
                else:
                    workers = int(name.split("_")[2])
                    seconds[name].append(timed_shards(folder, dest, args.shards, cache_dir, workers))
                shutil.rmtree(dest) if os.path.isdir(dest) else os.remove(dest)
    mb_per_s = {name: round(size / 1e6 / statistics.median(values), 1) for name, values in seconds.items()}
    result = {"rec_mb": round(size / 1e6, 1), "mb_per_s_median": mb_per_s, "seconds": seconds}
    result["vs_cp"] = {name: round(rate / mb_per_s["cp"], 3) for name, rate in mb_per_s.items() if name != "cp"}
    result.update(shards=args.shards, drop_caches=args.drop_caches)
    print(json.dumps({**result, "cpu_count": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()

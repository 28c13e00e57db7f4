#!/usr/bin/env python3
"""Time to the first training batch from a ``.rec`` with the record count of a real training set: MS1MV3
(5,179,510 images, 93,431 identities), Glint360K (17,091,657 / 360,232) or WebFace42M (42,474,557 / 2,059,906).

The generated ``train.rec`` has the insightface layout (header record 0, identity records at the end) and the
real number of records, each image a tiny 8x8 PNG (116 bytes a record: the file is small, the index is real). Timed
in this process after TensorFlow is imported: building the index from the identity records, building it by reading
every image header (the same file without the header record), loading it from the cache, and ``prepare_dataset``
up to its first batch (index cached). One JSON line with the seconds and the peak memory.

Usage: ``python bench/rec_index_scale.py [--set ms1mv3|glint360k|webface42m] [--dir DIR]``.
"""

import argparse
import io
import json
import os
import resource
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from keras_insightface.data import pipeline as data  # noqa: E402
from keras_insightface.data import recordio  # noqa: E402

SETS = {"ms1mv3": (5_179_510, 93_431), "glint360k": (17_091_657, 360_232), "webface42m": (42_474_557, 2_059_906)}


def _tiny_png():
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(buffer, format="PNG")
    png = buffer.getvalue()
    return png + b"\0" * (-len(png) % 4)  # bytes after the IEND chunk are ignored by decoders


def write_rec(folder, num_images, num_classes, identity_header=True, chunk=1 << 20):
    """``folder/train.rec`` + ``train.idx``: frames built with numpy, ``chunk`` records at a time (fixed sizes)."""
    os.makedirs(folder, exist_ok=True)
    counts = np.bincount(np.random.default_rng(0).integers(0, num_classes, num_images), minlength=num_classes)
    labels = np.repeat(np.arange(num_classes), counts)
    png = _tiny_png()
    image_words = 2 + (24 + len(png)) // 4
    heads = np.zeros((1 + num_classes, 10), np.uint32)  # header record and identity records: 2 labels each
    heads[:, 0], heads[:, 1], heads[:, 2] = recordio.RECORDIO_MAGIC, 32, 2
    stops, first = np.cumsum(counts) + 1, num_images + 1
    heads.view(np.float32)[:, 8:] = np.concatenate(
        [[[first, first + num_classes]], np.stack([stops - counts, stops], 1)]
    )
    sizes = [[40] * identity_header, [4 * image_words] * num_images, [40] * (num_classes * identity_header)]
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(sizes).astype(np.int64))[:-1]])
    with open(os.path.join(folder, "train.rec"), "wb") as rec, open(os.path.join(folder, "train.idx"), "w") as idx:
        if identity_header:
            heads[:1].tofile(rec)
        for start in range(0, num_images, chunk):
            images = np.zeros((min(chunk, num_images - start), image_words), np.uint32)
            images[:, 0], images[:, 1] = recordio.RECORDIO_MAGIC, 4 * (image_words - 2)
            images.view(np.float32)[:, 3] = labels[start : start + len(images)]  # the scalar label
            images[:, 8:] = np.frombuffer(png, np.uint32)
            images.tofile(rec)
        if identity_header:
            heads[1:].tofile(rec)
        for start in range(0, len(offsets), chunk):
            keys = np.arange(start, min(start + chunk, len(offsets)))
            idx.write("".join(f"{key}\t{offset}\n" for key, offset in zip(keys.tolist(), offsets[keys].tolist())))
    return folder


def seconds(function):
    start = time.perf_counter()
    result = function()
    return round(time.perf_counter() - start, 2), result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", choices=SETS, default="ms1mv3")
    parser.add_argument("--dir", default=None, help="where to generate (default: a temp dir)")
    args = parser.parse_args(argv)
    num_images, num_classes = SETS[args.set]
    import tensorflow as tf  # noqa: F401  (imported before timing)

    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        cache = os.path.join(root, "cache")
        rec = write_rec(os.path.join(root, "rec"), num_images, num_classes)
        plain = write_rec(os.path.join(root, "plain"), num_images, num_classes, identity_header=False)
        result = {"set": args.set, "images": num_images, "classes": num_classes}
        result["index_from_identity_records_s"], index = seconds(lambda: recordio.load_index(rec, cache, False))
        result["index_from_every_header_s"], _ = seconds(lambda: recordio.load_index(plain, cache, False))
        result["index_from_cache_s"], _ = seconds(lambda: recordio.load_index(rec, cache, False))
        assert index.num_images == num_images and index.classes == num_classes

        def first_batch():
            dataset = data.prepare_dataset(rec, 128, (112, 112), random_status=0, cache_dir=cache)
            return next(iter(dataset.dataset))

        result["first_batch_s"], _ = seconds(first_batch)
        result["rec_mb"] = round(os.path.getsize(os.path.join(rec, "train.rec")) / 1e6)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(json.dumps({**result, "cpu_count": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()

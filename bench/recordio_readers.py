#!/usr/bin/env python3
"""How to feed RecordIO records to ``tf.data``: records/s of four readers of the same ``train.rec`` (generated
112x112 JPEGs), reading only (``--decode`` also decodes each JPEG), fresh pipelines alternated, medians.

- ``pread_batched``: what ``data.py`` does: indices shuffled per epoch, one Python call reads 64 records with
  ``os.pread`` (the GIL is taken once per 64 records); random access, so exact per-epoch shuffles and P x K batches.
- ``pread_each``: the same with one Python call per record (the GIL per image).
- ``fixed_length``: no Python at all: one ``tf.data.FixedLengthRecordDataset`` per record (its offset as header,
  the rest of the file as footer) in a parallel interleave; random access.
- ``blocks``: Python reads 64 MB sequential blocks and ``tf.strings.substr`` cuts the records out natively; file
  order only (a shuffle buffer is the only shuffle).

Usage: ``python bench/recordio_readers.py [--records 20000] [--rounds 3] [--decode]``; one JSON line.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_insightface.data import demo as demo_data  # noqa: E402
from keras_insightface.data import recordio  # noqa: E402
from keras_insightface.tools import prepare_data  # noqa: E402


def _image_slices(records, start):
    """Image bytes of whole framed records starting at ``start`` in ``records`` (one string each, or one block
    string for all): skip the frame and image headers."""
    four = tf.fill(tf.shape(start), 4)
    flags = tf.io.decode_raw(tf.strings.substr(records, start + 8, four), tf.int32)[:, 0]
    lengths = tf.io.decode_raw(tf.strings.substr(records, start + 4, four), tf.int32)[:, 0] & recordio.LENGTH_MASK
    image_start = start + 8 + recordio.IR_SIZE + 4 * flags
    return tf.strings.substr(records, image_start, lengths - recordio.IR_SIZE - 4 * flags)


def pread_batched(index, order, batch=64):
    reader = recordio.RecordFile(index)
    ds = tf.data.Dataset.from_tensor_slices(order).batch(batch)
    ds = ds.map(lambda pos: tf.numpy_function(reader.read, [pos], [tf.string, tf.int64])[0], num_parallel_calls=4)
    return ds.unbatch()


def pread_each(index, order):
    reader = recordio.RecordFile(index)

    def read_one(position):
        return reader.read(position[None])[0][0]

    ds = tf.data.Dataset.from_tensor_slices(order)
    return ds.map(lambda pos: tf.numpy_function(read_one, [pos], tf.string), num_parallel_calls=4)


def fixed_length(index, order):
    size = os.path.getsize(index.rec_path)
    offsets, spans = index.offsets[order], index.spans[order]

    def one_record(offset, span):
        return tf.data.FixedLengthRecordDataset(
            index.rec_path, record_bytes=span, header_bytes=offset, footer_bytes=size - offset - span
        )

    ds = tf.data.Dataset.from_tensor_slices((offsets, spans))
    ds = ds.interleave(one_record, cycle_length=8, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(64).map(lambda records: _image_slices(records, tf.zeros_like(records, tf.int32))).unbatch()


def blocks(index, order, block_bytes=64 << 20):
    passes = -(-len(order) // index.num_images)  # as many records as the others, in file order
    sorted_positions = np.argsort(index.offsets)

    def generate():
        with open(index.rec_path, "rb") as ff:
            spans = index.spans[sorted_positions]
            offsets = index.offsets[sorted_positions]
            for start, stop in list(recordio._read_groups(offsets, spans, block_bytes)) * passes:
                ff.seek(int(offsets[start]))
                block = ff.read(int(offsets[stop - 1] + spans[stop - 1] - offsets[start]))
                yield block, offsets[start:stop] - offsets[start]

    signature = (tf.TensorSpec([], tf.string), tf.TensorSpec([None], tf.int64))
    ds = tf.data.Dataset.from_generator(generate, output_signature=signature)

    def cut(block, starts):  # the scalar block broadcasts against the vector of record starts: no copies
        return _image_slices(block, tf.cast(starts, tf.int32))

    return ds.map(cut).unbatch()


READERS = {"pread_batched": pread_batched, "pread_each": pread_each, "fixed_length": fixed_length, "blocks": blocks}


def records_per_second(reader, index, count, decode):
    order = np.random.default_rng(0).permutation(np.resize(np.arange(index.num_images), count))
    ds = READERS[reader](index, order)
    if decode:
        ds = ds.map(lambda image: tf.shape(tf.io.decode_jpeg(image))[0], num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(tf.strings.length)
    ds = ds.batch(256).prefetch(2)
    start, seen = time.perf_counter(), 0
    for lengths in ds:
        seen += int(lengths.shape[0])
    return seen / (time.perf_counter() - start), seen


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=20000, help="records read per timed run")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each reader, alternated")
    parser.add_argument("--readers", nargs="+", default=list(READERS), choices=list(READERS))
    parser.add_argument("--decode", action="store_true", help="also decode every JPEG")
    args = parser.parse_args(argv)
    rates = {name: [] for name in args.readers}
    with tempfile.TemporaryDirectory() as tmp:
        paths = demo_data.make_demo_dataset(tmp, 100, 20, 2, 2, 2, image_size=112)
        prepare_data.pack_folder(paths["train_dir"], os.path.join(tmp, "rec"))
        index = recordio.load_index(os.path.join(tmp, "rec"), cache_dir=tmp, progress=False)
        for _ in range(args.rounds):
            for name in args.readers:
                rate, seen = records_per_second(name, index, args.records, args.decode)
                rates[name].append(round(rate))
    print(
        json.dumps(
            {
                "records_per_s_median": {name: statistics.median(values) for name, values in rates.items()},
                "runs": rates,
                "decode": args.decode,
                "records": seen,
                "cpu_count": os.cpu_count(),
                "load_avg_1min": round(os.getloadavg()[0], 2),
            }
        )
    )


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Import time of full-size pretrained models: seconds for ``models.load_model`` to turn an insightface-style ONNX
graph or an arcface_torch checkpoint (random weights, written by the test helpers) into a Keras model, each in a
fresh process after TensorFlow is imported (the timer starts at the call). Printed as one JSON line per run and a
summary with the medians; runs alternate between networks and formats.

Usage: ``python bench/pretrained_import.py [--networks r50 r100] [--formats onnx pth] [--repeats 3]``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from pretrained_files import iresnet_state_dict, torch_iresnet_onnx, write_torch_checkpoint  # noqa: E402

from keras_insightface.models.backbones.resnet import IRESNET_DEPTHS, IRESNET_FILTERS  # noqa: E402

BLOCKS = {f"r{depth}": IRESNET_DEPTHS[depth] for depth in (18, 34, 50, 100)}
TIMED_IMPORT = (
    "import os, sys, time; os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3'); sys.path.insert(0, {root!r}); "
    "import models; start = time.perf_counter(); model = models.import_foreign_model({path!r}, verbose=False); "
    "print(time.perf_counter() - start, model.count_params())"
)


def write_model(folder, network, file_format):
    """A random-weight ``network`` at 112x112, emb 512, as ``.onnx`` (torch.onnx.export layout) or ``.pth``."""
    sd = iresnet_state_dict(np.random.default_rng(0), BLOCKS[network], IRESNET_FILTERS, emb=512, side=7)
    path = os.path.join(folder, f"{network}.{file_format}")
    if file_format == "onnx":
        with open(path, "wb") as ff:
            ff.write(torch_iresnet_onnx(sd, 112).SerializeToString())
    else:
        write_torch_checkpoint(path, sd)
    return path


def timed_import(path):
    code = TIMED_IMPORT.format(root=ROOT, path=path)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, params = done.stdout.split()[-2:]
    return float(seconds), int(params)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=["r50", "r100"], choices=sorted(BLOCKS))
    parser.add_argument("--formats", nargs="+", default=["onnx", "pth"], choices=["onnx", "pth"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    times = {}
    with tempfile.TemporaryDirectory() as folder:
        paths = {(net, fmt): write_model(folder, net, fmt) for net in args.networks for fmt in args.formats}
        for repeat in range(args.repeats):
            for key, path in paths.items():
                seconds, params = timed_import(path)
                times.setdefault(key, []).append(seconds)
                record = {"network": key[0], "format": key[1], "repeat": repeat, "seconds": round(seconds, 2)}
                print(json.dumps({**record, "params": params, "load_average": round(os.getloadavg()[0], 2)}))
    summary = {f"{net}.{fmt}": round(statistics.median(values), 2) for (net, fmt), values in times.items()}
    print(json.dumps({"median_seconds": summary}))


if __name__ == "__main__":
    main()

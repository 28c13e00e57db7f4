"""Inference benchmark of exported models: size, latency and agreement with Keras (as Keras_insightface's TFLite tables).

For each model of the zoo (GDC head), exports TFLite float32 / float16 / dynamic-range / full-integer uint8 and
ONNX (when tf2onnx and onnxruntime are installed), then times single-image inference with the TFLite interpreter
(XNNPACK on and off) and ONNX Runtime at each thread count, and measures the cosine similarity of the outputs to
the Keras model on demo faces. Untrained models get their BatchNormalization statistics from demo faces first so
activations have realistic ranges. An untrained deep model is chaotic (tiny perturbations change its output
direction), so each model's row also reports ``noise_cosine``: Keras outputs with vs without one gray level of
Gaussian input noise. Quantized variants cannot agree better than that; trained models are far less sensitive.
Prints a Markdown table and one JSON line.

    python bench/inference_speed.py -m mobilefacenet MobileNet --threads 1 2
"""

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_insightface.data import demo as demo_data  # noqa: E402
from keras_insightface.data import pipeline as data  # noqa: E402
from keras_insightface.models import zoo as models  # noqa: E402
from keras_insightface.tools import export  # noqa: E402

TFLITE_VARIANTS = ("float32", "float16", "dynamic", "uint8")


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "-m", "--models", nargs="+", default=["mobilefacenet", "MobileNet"], help="zoo names or .keras files"
    )
    parser.add_argument("-e", "--emb_shape", type=int, default=256)
    parser.add_argument("-s", "--size", type=int, default=112, help="input height and width")
    parser.add_argument("-t", "--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("-v", "--variants", nargs="+", default=list(TFLITE_VARIANTS), choices=TFLITE_VARIANTS)
    parser.add_argument("-r", "--runs", type=int, default=30, help="timed runs per setting (median reported)")
    parser.add_argument("-w", "--warmup", type=int, default=5)
    parser.add_argument("-n", "--num_images", type=int, default=32, help="demo faces for the agreement check")
    return parser.parse_args(argv)


def cosine(aa, bb):
    """Row-wise cosine similarity."""
    aa, bb = np.asarray(aa, np.float64), np.asarray(bb, np.float64)
    return np.sum(aa * bb, axis=1) / np.linalg.norm(aa, axis=1) / np.linalg.norm(bb, axis=1)


def median_ms(run_once, warmup, runs):
    """Median wall time of ``run_once()`` in milliseconds after ``warmup`` untimed calls."""
    for _ in range(warmup):
        run_once()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run_once()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def tflite_latency(path, image, num_threads, use_xnnpack, warmup, runs):
    """Median latency of one ``invoke`` on ``image`` (already in the model's input type)."""
    interpreter = export.tflite_interpreter(path, num_threads=num_threads, use_xnnpack=use_xnnpack)
    interpreter.allocate_tensors()
    details = interpreter.get_input_details()[0]
    interpreter.set_tensor(details["index"], export.quantize_input(image[None], details))
    return median_ms(interpreter.invoke, warmup, runs)


def onnx_latency(path, image, num_threads, warmup, runs):
    session = export.onnx_session(path, num_threads=num_threads)
    feed = {session.get_inputs()[0].name: image[None]}
    return median_ms(lambda: session.run(None, feed), warmup, runs)


def make_model(name, emb_shape, size, calibration_images):
    """A saved basic model if ``name`` is a file (used as is), else an untrained zoo model with calibrated BN."""
    if os.path.isfile(name):
        return export.load_model(name)
    keras.utils.set_random_seed(0)  # the same untrained weights on every run
    model = models.buildin_models(name, emb_shape=emb_shape, output_layer="GDC", input_shape=(size, size, 3))
    return export.calibrate_batch_norm(model, data.normalize_image(calibration_images.astype(np.float32)))


def export_variants(model, work_dir, variants, representative_dir):
    """Export every requested variant; returns ``{label: (runtime, path)}``."""
    exported = {}
    for variant in variants:
        quant = None if variant == "float32" else variant
        rep = representative_dir if variant in export.INTEGER_QUANTIZATIONS else None
        path = os.path.join(work_dir, f"{variant}.tflite")
        exported[variant] = ("tflite", export.export_model(model, path, quant=quant, representative_data=rep))
    if importlib.util.find_spec("tf2onnx") and importlib.util.find_spec("onnxruntime"):
        exported["onnx"] = ("onnx", export.export_model(model, os.path.join(work_dir, "model.onnx"), "onnx"))
    return exported


def noise_cosine(model, inputs, reference, seed=0):
    """Mean cosine of the Keras outputs with one gray level (std 1/255 of the range) of input noise added."""
    noise = np.random.default_rng(seed).normal(0, data.SEEDS_SCALE, inputs.shape).astype(np.float32)
    return float(cosine(model.predict(inputs + noise, verbose=0), reference).mean())


def bench_model(name, args, demo, work_dir):
    """All rows (one per runtime setting) for one zoo model."""
    model = make_model(name, args.emb_shape, args.size, demo["calibration"])
    eval_inputs = data.normalize_image(demo["eval"].astype(np.float32))
    reference = model.predict(eval_inputs, verbose=0)
    sensitivity = noise_cosine(model, eval_inputs, reference)
    rows = []
    model_dir = tempfile.mkdtemp(dir=work_dir)
    for label, (runtime, path) in export_variants(model, model_dir, args.variants, demo["train_dir"]).items():
        predict = export.onnx_predict if runtime == "onnx" else export.tflite_predict
        agreement = cosine(predict(path, eval_inputs), reference)
        settings = [("onnxruntime", None)] if runtime == "onnx" else [("", False), ("xnn", True)]
        for suffix, use_xnnpack in settings:
            row = {
                "model": name,
                "variant": f"{label} {suffix}".strip(),
                "size_mib": os.path.getsize(path) / 2**20,
                "cosine_min": float(agreement.min()),
                "cosine_mean": float(agreement.mean()),
                "noise_cosine": sensitivity,
            }
            for threads in args.threads:
                if runtime == "onnx":
                    ms = onnx_latency(path, eval_inputs[0], threads, args.warmup, args.runs)
                else:
                    ms = tflite_latency(path, eval_inputs[0], threads, use_xnnpack, args.warmup, args.runs)
                row[f"threads={threads}_ms"] = ms
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    return rows


def markdown_table(rows, threads):
    header = ["model", "variant", "size (MiB)", "cosine mean"] + [f"threads={tt} (ms)" for tt in threads]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [row["model"], row["variant"], f"{row['size_mib']:.3f}", f"{row['cosine_mean']:.5f}"]
        cells += [f"{row[f'threads={tt}_ms']:.2f}" for tt in threads]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_arguments(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as work_dir:
        paths = demo_data.make_demo_dataset(
            work_dir, num_classes=20, images_per_class=5, num_eval_classes=8, eval_images_per_class=4,
            num_pairs=args.num_images // 2, image_size=args.size, seed=0,
        )  # fmt: skip
        size = (args.size, args.size)
        demo = {
            "train_dir": paths["train_dir"],
            "calibration": export.load_representative_images(paths["train_dir"], size, num=64),
            "eval": export.load_representative_images(paths["bin_path"], size, num=args.num_images),
        }
        rows = [row for name in args.models for row in bench_model(name, args, demo, work_dir)]
    print(markdown_table(rows, args.threads))
    for name in args.models:
        noise = next(row["noise_cosine"] for row in rows if row["model"] == name)
        print(f"{name}: Keras output cosine under 1 gray level of input noise: {noise:.5f}")
    summary = {
        "bench": "inference_speed",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before[0],
        "loadavg_after": os.getloadavg()[0],
        "emb_shape": args.emb_shape,
        "size": args.size,
        "runs": args.runs,
        "rows": rows,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()

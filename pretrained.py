"""Import a pretrained face-recognition model of another tool as a Keras model of this library, and save it.

    python pretrained.py w600k_r50.onnx -o w600k_r50.keras      # insightface model zoo (buffalo_l)
    python pretrained.py backbone.pth -o glint360k_r100.keras    # an arcface_torch release
    python pretrained.py r100_emore.h5 -o r100_emore.keras       # a Keras_insightface release

The source is read without its framework (``foreign_models``) and becomes the same network built from this
library's ``backbones/`` with the file's weights, taking the library's input ``(x - 127.5) * 0.0078125``. Every path
that takes a model (``Train(basic_model=...)``, ``pretrained=``, ``evals.py -m``, ``IJB_evals.py -m``,
``data_distiller.py``, ``export.py``) imports these files on the fly as well; converting once saves that time.
``--check N`` compares the imported model with onnxruntime running the ONNX source on N random images.
"""

import argparse
import os
import sys

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # no TensorFlow C++ chatter (info and warnings) on the console
import models  # noqa: E402
import onnx_graph  # noqa: E402
from formats import INSIGHTFACE_SCALE, normalize_image  # noqa: E402
from myCallbacks import save_model_atomic  # noqa: E402
from utils import run_main  # noqa: E402


def reference_inputs(onnx_path, images):
    """0..255 NHWC ``images`` as the ONNX graph's authors feed it: NCHW, ``(x - 127.5) / 127.5`` for PyTorch exports,
    raw pixels for graphs that normalize inside (MXNet exports)."""
    if not onnx_graph.normalizes_input(onnx_path):
        images = normalize_image(images, INSIGHTFACE_SCALE)
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)


def compare_with_onnxruntime(model, onnx_path, images):
    """``{"min_cosine", "max_abs_diff"}`` of the embeddings of ``model`` (fed the library's convention) and of
    onnxruntime running ``onnx_path`` (fed its own), on 0..255 NHWC ``images``. Needs onnxruntime."""
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError("--check needs onnxruntime: pip install onnxruntime") from err
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    name, inputs = session.get_inputs()[0].name, reference_inputs(onnx_path, images)
    reference = np.concatenate([session.run(None, {name: inputs[ii : ii + 1]})[0] for ii in range(len(inputs))])
    ours = model.predict(normalize_image(images.astype(np.float32)), verbose=0)
    cosine = np.sum(ours * reference, axis=1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    return {"min_cosine": float(np.min(cosine)), "max_abs_diff": float(np.max(np.abs(ours - reference)))}


def import_pretrained(source, dest=None, check=0, seed=0):
    """Import ``source`` and save it as ``dest`` (default: ``<source stem>.keras`` next to it), atomically; returns
    ``(dest, check results or None)``."""
    dest = dest or os.path.splitext(os.fspath(source))[0] + ".keras"
    if not dest.endswith(".keras"):
        raise ValueError(f"{dest}: the destination must be a .keras file")
    if check and not os.fspath(source).endswith(".onnx"):
        raise ValueError("--check compares with onnxruntime: it needs an .onnx source")
    model = models.import_foreign_model(source)
    save_model_atomic(model, dest)
    results = None
    if check:
        height, width = model.input_shape[1:3]
        images = np.random.default_rng(seed).uniform(0, 255, (check, height, width, 3)).astype(np.float32)
        results = compare_with_onnxruntime(model, os.fspath(source), images)
    return dest, results


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(
        description="Import an insightface .onnx, an arcface_torch .pth / .pt or a Keras_insightface .h5 as a Keras "
        "model of this library",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("source", help="pretrained model file of another tool")
    parser.add_argument("-o", "--output", default=None, help=".keras file to write (default: next to the source)")
    parser.add_argument("--check", type=int, default=0, metavar="N", help="compare with onnxruntime on N images")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_arguments(argv)
    dest, results = import_pretrained(args.source, args.output, args.check)
    print(">>>> Saved:", dest)
    if results:
        print(
            f">>>> vs onnxruntime: min cosine {results['min_cosine']:.7f}, max abs diff {results['max_abs_diff']:.2e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

"""Import a pretrained face-recognition model of another tool as a Keras model of this library, and save it.

    keras-insightface pretrained w600k_r50.onnx -o w600k_r50.keras      # insightface model zoo (buffalo_l)
    keras-insightface pretrained backbone.pth -o glint360k_r100.keras    # an arcface_torch release
    keras-insightface pretrained r100_emore.h5 -o r100_emore.keras       # a Keras_insightface release

The source is read without its framework (``foreign_models``) and becomes the same network built from this
library's ``backbones/`` with the file's weights, taking the library's input ``(x - 127.5) * 0.0078125``. Every path
that takes a model (``Train(basic_model=...)``, ``pretrained=``, the ``evals``, ``ijb``, ``distill`` and ``export``
commands) imports these files on the fly as well; converting once saves that time.
``--check N`` compares the imported model with onnxruntime running the ONNX source on N random images.
"""

import os

import numpy as np

from keras_insightface.data.formats import INSIGHTFACE_SCALE, normalize_image
from keras_insightface.models import onnx_graph
from keras_insightface.models import zoo as models
from keras_insightface.training.callbacks import save_model_atomic


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

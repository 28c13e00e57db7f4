"""Export a basic (embedding) model for deployment: SavedModel, TFLite (float32 / float16 / dynamic-range /
full-integer) and ONNX, optionally with the preprocessing, the L2 normalization and a resize built in.

Function API: ``export_model(...)``; CLI: ``keras-insightface export -m MODEL -f tflite --quant float16``. Every file or
folder is written under a temporary name and renamed into place, so a failed export leaves nothing behind.
``tflite_predict`` / ``onnx_predict`` run the exported files (dequantizing integer models) for checks and benchmarks.
"""

import contextlib
import importlib
import importlib.util
import io
import logging
import os
import re
import shutil
import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_insightface.data import pipeline as data
from keras_insightface.models import zoo as models
from keras_insightface.utils import atomic_write, check_writable_folder

FORMATS = ("tflite", "saved_model", "onnx")
QUANTIZATIONS = ("float16", "dynamic", "int8", "uint8")
INTEGER_QUANTIZATIONS = ("int8", "uint8")
DEST_SUFFIXES = {"tflite": ".tflite", "saved_model": "_saved_model", "onnx": ".onnx"}
INPUT_NAME = "image"


class ExportError(RuntimeError):
    """A converter refused the model; the message names the unsupported ops and the layers that use them."""


def build_deploy_model(model, include_preprocessing=False, l2_normalize=False, dynamic_input_size=False):
    """Wrap ``model`` into the graph that is exported: ``image`` input -> [normalize] -> [resize] -> model -> [L2].

    With ``include_preprocessing`` the input is uint8 RGB; with ``dynamic_input_size`` it is any HxW, resized
    (bilinear) to the model's input size; with ``l2_normalize`` the output has unit L2 norm.
    """
    height, width, channels = model.input_shape[1:]
    if dynamic_input_size and (height is None or width is None):
        raise ValueError(f"dynamic_input_size needs a model with a fixed input size, got {model.input_shape}")
    input_shape = (None, None, channels) if dynamic_input_size else (height, width, channels)
    inputs = keras.Input(input_shape, dtype="uint8" if include_preprocessing else "float32", name=INPUT_NAME)
    nn = models.NormalizeImage(name="normalize_image")(inputs) if include_preprocessing else inputs
    if dynamic_input_size:
        nn = models.ResizeImage(height, width, name="resize")(nn)
    nn = model(nn, training=False)  # recorded in the graph: inference mode even if a layer defaults to training
    if l2_normalize:
        nn = keras.layers.UnitNormalization(axis=-1, name="l2_normalize")(nn)
    return keras.Model(inputs, nn, name=f"{model.name}_deploy")


# ---------------------------------------------------------------------------------------------------------
# Representative data for full-integer quantization
# ---------------------------------------------------------------------------------------------------------
def _decode_rgb(source, image_size):
    """Decode an image file path or encoded bytes to a uint8 RGB array resized (bilinear) to ``image_size``."""
    from PIL import Image

    with Image.open(source if isinstance(source, str) else io.BytesIO(source)) as image:
        image = image.convert("RGB")
        if image.size != (image_size[1], image_size[0]):
            image = image.resize((image_size[1], image_size[0]), Image.BILINEAR)
        return np.asarray(image, dtype=np.uint8)


def _spread(items, num):
    """Up to ``num`` items spread evenly over ``items`` (so every class of a sorted folder list is sampled)."""
    if len(items) <= num:
        return list(items)
    return [items[ii] for ii in np.linspace(0, len(items) - 1, num).round().astype(int)]


def check_representative_data(path):
    """Raise a clear error if ``path`` is neither an existing folder nor an existing ``.bin`` file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"representative data not found: {path}")
    if not (os.path.isdir(path) or path.endswith(".bin")):
        raise ValueError(f"representative data must be a folder of images or a verification .bin, got {path}")
    return path


def load_representative_images(path, image_size, num=100):
    """Up to ``num`` uint8 RGB images of ``image_size`` (H, W) from a folder (searched recursively) or a ``.bin``."""
    path = check_representative_data(path)
    if os.path.isdir(path):
        files = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(path)
            for name in names
            if name.lower().endswith(data.IMAGE_EXTENSIONS)
        )
        sources = _spread(files, num)
    else:
        sources = _spread(data.load_bin(path)[0], num)
    if not sources:
        raise ValueError(f"no images ({', '.join(data.IMAGE_EXTENSIONS)}) found in representative data {path}")
    return np.stack([_decode_rgb(source, image_size) for source in sources])


# ---------------------------------------------------------------------------------------------------------
# Converters
# ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _atomic_dir(path):
    """Yield a temporary folder next to ``path``; on success it replaces ``path``, on error it is deleted."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=parent)
    try:
        yield tmp_dir
        old_dir = None
        if os.path.exists(path):
            old_dir = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", suffix=".old", dir=parent)
            os.replace(path, os.path.join(old_dir, "old"))
        os.replace(tmp_dir, path)
        if old_dir:
            shutil.rmtree(old_dir)
    finally:
        if os.path.exists(tmp_dir):
            shutil.rmtree(tmp_dir)


def _flat_layers(model):
    """Layers of ``model`` with nested models expanded."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _flat_layers(layer)
        else:
            yield layer


def _layer_classes(model):
    """``{layer name: class name}`` for the leaf layers of ``model`` (nested models expanded)."""
    return {layer.name: type(layer).__name__ for layer in _flat_layers(model)}


def _unsupported_ops_message(model, converter_name, ops, op_paths):
    """Name the unsupported ops and the Keras layers using them (graph paths look like ``model_1/layer_1/Op``)."""
    layers = _layer_classes(model)
    users = []
    for op_path in op_paths:
        for segment in op_path.split("/"):
            name = segment if segment in layers else re.sub(r"_\d+$", "", segment)
            if name in layers and name not in users:
                users.append(name)
    where = ", ".join(f"{name!r} ({layers[name]})" for name in users) or "unknown layers"
    return (
        f"{converter_name} conversion failed: op(s) {', '.join(sorted(set(ops)))} used by layer(s) {where} "
        f"are not supported by the {converter_name} converter. Replace those layers with supported ones before exporting."
    )


def _tflite_error(model, err):
    """Turn a TFLite ``ConverterError`` into an ``ExportError`` naming the unsupported ops and layers."""
    text = str(err)
    ops = re.findall(r"'tf\.(\w+)' op is neither a custom op nor a flex op", text)
    if not ops:
        return ExportError(f"TFLite conversion failed: {text.splitlines()[0] if text else type(err).__name__}")
    paths = [path for op, path in re.findall(r'fused\["(\w+):", "([^"@]+)@', text) if op in ops]
    return ExportError(_unsupported_ops_message(model, "TFLite", ops, paths))


def _representative_dataset(images, include_preprocessing):
    """A generator factory feeding calibration images one by one in the exported model's input convention."""

    def generate():
        for image in images:
            sample = image if include_preprocessing else data.normalize_image(image.astype(np.float32))
            yield [np.asarray(sample)[None]]

    return generate


def _configure_quantization(converter, quant, representative_images, include_preprocessing):
    """Set the TFLite converter options for ``quant`` (None, float16, dynamic, int8, uint8)."""
    if quant is None:
        return
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quant == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif quant in INTEGER_QUANTIZATIONS:
        converter.representative_dataset = _representative_dataset(representative_images, include_preprocessing)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = converter.inference_output_type = getattr(tf, quant)


def _write_tflite(deploy_model, dest, quant, representative_images, include_preprocessing):
    """SavedModel in a temporary folder -> ``TFLiteConverter.from_saved_model`` -> ``dest`` (atomically)."""
    with tempfile.TemporaryDirectory() as saved_model_dir:
        deploy_model.export(saved_model_dir, format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
        _configure_quantization(converter, quant, representative_images, include_preprocessing)
        try:
            payload = converter.convert()
        except Exception as err:  # ConverterError and friends: re-raised naming the unsupported ops / layers
            raise _tflite_error(deploy_model, err) from err
    with atomic_write(dest) as tmp_path, open(tmp_path, "wb") as ff:
        ff.write(payload)


class _LogCollector(logging.Handler):
    """Collects ERROR records of a logger (tf2onnx reports unsupported ops by logging, not by raising)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _write_onnx(deploy_model, dest):
    """Keras 3 ``model.export(format="onnx")`` (tf2onnx underneath) to ``dest``; unsupported ops raise."""
    collector = _LogCollector()
    tf2onnx_logger = logging.getLogger("tf2onnx")
    tf2onnx_logger.addHandler(collector)
    try:
        with atomic_write(dest) as tmp_path:
            spec = tf.TensorSpec(deploy_model.inputs[0].shape, deploy_model.inputs[0].dtype, name=INPUT_NAME)
            deploy_model.export(tmp_path, format="onnx", verbose=False, input_signature=[spec])
            pattern = r"Tensorflow op \[([^:\]]+): (\w+)\] is not supported"
            found = [pair for message in collector.messages for pair in re.findall(pattern, message)]
            if found:
                ops = [op for _, op in found]
                raise ExportError(_unsupported_ops_message(deploy_model, "ONNX", ops, [path for path, _ in found]))
    finally:
        tf2onnx_logger.removeHandler(collector)


def _check_options(format, quant, representative_data):
    """Validate the option combination before any conversion work."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not one of {FORMATS}")
    if quant is not None and quant not in QUANTIZATIONS:
        raise ValueError(f"quant={quant!r} is not one of {QUANTIZATIONS} or None")
    if quant is not None and format != "tflite":
        raise ValueError(f"quant={quant!r} is only supported for format='tflite', not {format!r}")
    if quant in INTEGER_QUANTIZATIONS and representative_data is None:
        raise ValueError(f"quant={quant!r} needs representative_data (a folder of images or a .bin)")
    if representative_data is not None:
        if quant not in INTEGER_QUANTIZATIONS:
            raise ValueError(f"representative_data is only used with quant in {INTEGER_QUANTIZATIONS}, got {quant!r}")
        check_representative_data(representative_data)
    if format == "onnx" and importlib.util.find_spec("tf2onnx") is None:
        raise ImportError("ONNX export needs tf2onnx and onnx: pip install tf2onnx onnx (or pip install .[onnx])")


def default_dest(
    model_path, format="tflite", quant=None, include_preprocessing=False, l2_normalize=False, dynamic_input_size=False
):
    """``<model stem>[_quant][_pre][_l2][_dynamic].<ext>`` next to the model file."""
    stem = os.path.splitext(os.fspath(model_path))[0]
    flags = [quant, include_preprocessing and "pre", l2_normalize and "l2", dynamic_input_size and "dynamic"]
    suffix = "".join(f"_{flag}" for flag in flags if flag)
    return stem + suffix + DEST_SUFFIXES[format]


def _check_dest_kind(dest, format):
    """A SavedModel is a folder, the other formats a file: an existing path of the other kind is refused before the
    conversion."""
    if format != "saved_model" and os.path.isdir(dest):
        name = f"model{DEST_SUFFIXES[format]}"
        raise IsADirectoryError(
            f"{dest} is a folder: the output of {format} is a file (e.g. {os.path.join(dest, name)})"
        )
    if format == "saved_model" and os.path.isfile(dest):
        raise FileExistsError(f"{dest} is a file: the output of saved_model is a folder")


def export_model(
    model_or_path,
    dest=None,
    format="tflite",
    quant=None,
    representative_data=None,
    include_preprocessing=False,
    l2_normalize=False,
    dynamic_input_size=False,
    num_calibration=100,
    safe_mode=True,
):
    """Export a basic model to ``dest`` as ``format`` ("tflite", "saved_model" or "onnx"); return ``dest``.

    ``quant`` (TFLite only): None (float32), "float16", "dynamic" (dynamic-range int8 weights), "int8" / "uint8"
    (full-integer with int8 / uint8 input and output, calibrated on ``num_calibration`` images of
    ``representative_data``, a folder of images or a ``.bin``). ``include_preprocessing`` makes the input uint8
    RGB with ``data.normalize_image`` built in; ``l2_normalize`` L2-normalizes the output; ``dynamic_input_size``
    accepts any HxW and resizes it to the model's size. ``dest`` defaults to a name next to a model file.
    Raises ``ExportError`` naming unsupported ops / layers; nothing is left half-written on any error.
    """
    _check_options(format, quant, representative_data)
    if dest is None:
        if isinstance(model_or_path, keras.Model):
            raise ValueError("dest is required when exporting a model object")
        dest = default_dest(model_or_path, format, quant, include_preprocessing, l2_normalize, dynamic_input_size)
    dest = os.fspath(dest)
    check_writable_folder(dest)
    _check_dest_kind(dest, format)
    model = models.load_basic_model(model_or_path, safe_mode=safe_mode)
    representative_images = None
    if quant in INTEGER_QUANTIZATIONS:
        representative_images = load_representative_images(representative_data, model.input_shape[1:3], num_calibration)
    deploy_model = build_deploy_model(model, include_preprocessing, l2_normalize, dynamic_input_size)
    if format == "saved_model":
        with _atomic_dir(dest) as tmp_dir:
            deploy_model.export(tmp_dir, format="tf_saved_model", verbose=False)
    elif format == "onnx":
        _write_onnx(deploy_model, dest)
    else:
        _write_tflite(deploy_model, dest, quant, representative_images, include_preprocessing)
    return dest


# ---------------------------------------------------------------------------------------------------------
# Running exported models
# ---------------------------------------------------------------------------------------------------------
def tflite_interpreter(model_path, num_threads=1, use_xnnpack=True):
    """A ``tf.lite.Interpreter`` for ``model_path``; ``use_xnnpack=False`` disables the default XNNPACK delegate."""
    resolver = tf.lite.experimental.OpResolverType
    op_resolver = resolver.AUTO if use_xnnpack else resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    with warnings.catch_warnings():  # "tf.lite.Interpreter is deprecated": still the interpreter shipped with TF
        warnings.simplefilter("ignore", UserWarning)
        return tf.lite.Interpreter(
            model_path=os.fspath(model_path), num_threads=num_threads, experimental_op_resolver_type=op_resolver
        )


def quantize_input(values, details):
    """Float input -> the integer input type of a full-integer model (no-op for float or raw uint8 inputs)."""
    scale, zero_point = details["quantization"]
    dtype = details["dtype"]
    if scale == 0 or not np.issubdtype(dtype, np.integer):
        return np.asarray(values).astype(dtype)
    info = np.iinfo(dtype)
    return np.clip(np.round(values / scale + zero_point), info.min, info.max).astype(dtype)


def dequantize_output(values, details):
    """Integer output of a full-integer model -> float32 (no-op for float outputs)."""
    scale, zero_point = details["quantization"]
    if scale == 0:
        return values.astype(np.float32)
    return ((values.astype(np.float32) - zero_point) * scale).astype(np.float32)


def tflite_predict(interpreter_or_path, images, num_threads=1, use_xnnpack=True):
    """Run a TFLite model on ``images`` one at a time; returns float32 outputs (integer outputs dequantized).

    ``images`` are in the exported model's input convention: normalized float, or uint8 RGB with built-in
    preprocessing. Float images are quantized for a full-integer model. The input is resized to each image's size.
    """
    interpreter = interpreter_or_path
    if not hasattr(interpreter, "invoke"):
        interpreter = tflite_interpreter(interpreter_or_path, num_threads=num_threads, use_xnnpack=use_xnnpack)
    input_details = interpreter.get_input_details()[0]
    outputs = []
    for image in images:
        batch = quantize_input(np.asarray(image)[None], input_details)
        if tuple(input_details["shape"]) != batch.shape:
            interpreter.resize_tensor_input(input_details["index"], batch.shape)
            interpreter.allocate_tensors()
            input_details = interpreter.get_input_details()[0]
        elif not outputs:
            interpreter.allocate_tensors()
        interpreter.set_tensor(input_details["index"], batch)
        interpreter.invoke()
        output_details = interpreter.get_output_details()[0]
        outputs.append(dequantize_output(interpreter.get_tensor(output_details["index"]), output_details))
    return np.concatenate(outputs)


def onnx_session(model_path, num_threads=1):
    """An ``onnxruntime.InferenceSession`` on CPU with ``num_threads`` intra-op threads (needs onnxruntime)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(os.fspath(model_path), options, providers=["CPUExecutionProvider"])


def onnx_predict(session_or_path, images, num_threads=1):
    """Run an ONNX model on ``images`` (batch at once) with ONNX Runtime; returns float32 outputs."""
    session = session_or_path
    if not hasattr(session, "run"):
        session = onnx_session(session_or_path, num_threads=num_threads)
    model_input = session.get_inputs()[0]
    dtype = np.uint8 if model_input.type == "tensor(uint8)" else np.float32
    return np.asarray(session.run(None, {model_input.name: np.asarray(images).astype(dtype)})[0], dtype=np.float32)


def calibrate_batch_norm(model, images):
    """Set every BatchNormalization's moving statistics to those of ``images`` (one training-mode pass).

    An untrained model then has realistic activation ranges, so export and quantization agreement measured on
    it means something (random-init statistics can shrink activations to ~1e-20, below float16's range).
    """
    batch_norms = [layer for layer in _flat_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    momentums = [layer.momentum for layer in batch_norms]
    for layer in batch_norms:
        layer.momentum = 0.0
    model(np.asarray(images, dtype=np.float32), training=True)
    for layer, momentum in zip(batch_norms, momentums):
        layer.momentum = momentum
    return model


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------

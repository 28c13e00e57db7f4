"""Embed face images with a trained model: a Keras model (object or ``.keras`` / ``.h5`` file), a pretrained model of
another tool (imported by ``models.load_model``) or an ONNX file.

One place for "model -> embeddings" used by distillation data, sub-center cleaning, IJB evaluation and photo
comparison. An :class:`Embedder` takes normalized float32 NHWC batches (see ``formats.normalize_image``);
``embed_image_files`` decodes, resizes and normalizes image files for it.
"""

import os

import keras
import numpy as np

from keras_insightface.data.formats import SEEDS_SCALE, normalize_image
from keras_insightface.models import foreign as foreign_models
from keras_insightface.models import onnx_graph


class Embedder:
    """``embedder(batch)`` -> float32 embeddings of a normalized float32 NHWC batch.

    ``image_size`` is the model's input (height, width), or None when the model accepts any size.
    """

    def __init__(self, predict, image_size):
        self.predict, self.image_size = predict, image_size

    def __call__(self, batch):
        return np.asarray(self.predict(np.ascontiguousarray(batch, dtype=np.float32)), dtype=np.float32)


def _static_size(height, width):
    return (int(height), int(width)) if isinstance(height, int) and isinstance(width, int) else None


def compiled_inference(model):
    """``f(batch) -> first output`` of a Keras model in inference mode, compiled once: a ``tf.function`` on
    TensorFlow, a ``jax.jit`` of ``model.stateless_call`` on JAX (with the weights at each call). Calling a functional
    model eagerly dispatches every layer from Python, several times slower."""
    if keras.backend.backend() == "jax":
        import jax

        @jax.jit
        def infer(trainable, non_trainable, images):
            outputs, _ = model.stateless_call(trainable, non_trainable, images, training=False)
            return outputs[0] if isinstance(outputs, list | tuple) else outputs

        def call(images):
            weights = [
                [var.value for var in variables]
                for variables in (model.trainable_variables, model.non_trainable_variables)
            ]
            return infer(*weights, np.asarray(images))

        return call
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def call(images):
        outputs = model(images, training=False)
        return outputs[0] if isinstance(outputs, list | tuple) else outputs

    return call


def _keras_embedder(model):
    height, width = model.inputs[0].shape[1:3]
    infer = compiled_inference(model)
    return Embedder(
        lambda batch: keras.ops.convert_to_numpy(infer(batch)).astype(np.float32), _static_size(height, width)
    )


def _onnx_embedder(path):
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(f"{path}: an ONNX model needs onnxruntime: pip install onnxruntime") from err
    session = onnxruntime.InferenceSession(path, providers=onnxruntime.get_available_providers())
    model_input = session.get_inputs()[0]
    shape = model_input.shape
    channels_first = shape[1] == 3
    height, width = (shape[2], shape[3]) if channels_first else (shape[1], shape[2])

    def predict(batch):
        batch = np.transpose(batch, (0, 3, 1, 2)) if channels_first else batch
        return session.run(None, {model_input.name: np.ascontiguousarray(batch)})[0]

    return Embedder(predict, _static_size(height, width))


def load_embedder(model, safe_mode=True):
    """An :class:`Embedder` of a Keras model object, a Keras model file (loaded with ``safe_mode``), a pretrained model
    of another tool that ``models.load_model`` imports (insightface ``.onnx``, arcface_torch ``.pth`` / ``.pt``,
    Keras_insightface ``.h5``), or any other ONNX file (run by onnxruntime, fed this library's normalized NHWC
    batches, as this library's ONNX exports expect)."""
    if isinstance(model, Embedder):
        return model
    if not isinstance(model, str | os.PathLike):
        return _keras_embedder(model)
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file not found: {path}")
    if path.endswith(".onnx") and not onnx_graph.is_insightface_graph(path):
        return _onnx_embedder(path)
    if path.endswith((".keras", ".h5", ".hdf5")) or foreign_models.foreign_model_kind(path):
        from keras_insightface.models import zoo as models

        return _keras_embedder(models.load_basic_model(path, safe_mode=safe_mode))
    raise ValueError(
        f"unsupported model file {path}: expected .keras, .h5, .onnx, or an arcface_torch checkpoint (.pth / .pt)"
    )


def embed_batch(embedder, batch, flip=False):
    """Embeddings of one normalized NHWC batch; ``flip`` adds the embeddings of the mirrored images (test-time
    augmentation, as the verification metrics use)."""
    embeddings = embedder(batch)
    return embeddings + embedder(batch[:, :, ::-1]) if flip else embeddings


def embed_image_files(embedder, image_names, batch_size=128, scale=SEEDS_SCALE, image_size=None, flip=False):
    """L2-normalized embeddings ``(N, D)`` of image files: decoded in parallel, resized to the model's input size
    (or ``image_size``, default 112x112 for models of any size) and normalized with ``(x - 127.5) * scale``;
    ``flip`` as in ``embed_batch``."""
    import tensorflow as tf

    from keras_insightface.data import pipeline as data

    size = image_size or embedder.image_size or (112, 112)
    ds = tf.data.Dataset.from_tensor_slices(np.asarray(image_names, dtype=str))
    ds = ds.map(lambda name: normalize_image(data.decode_image(name, size), scale), tf.data.AUTOTUNE)
    batches = ds.batch(batch_size).as_numpy_iterator()
    embeddings = np.concatenate([embed_batch(embedder, images, flip) for images in batches], axis=0)
    return embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)

"""Evaluate a basic (embedding) model: verification ``.bin`` files during training (``eval_callback``) and
from the command line (``keras-insightface evals -m MODEL -t lfw.bin ...``, which also runs the evaluations of
``photo_evals`` on your own data).

The metrics themselves live in ``metrics`` (pure numpy) and face alignment in ``alignment``; their names are
re-exported here because scripts written for earlier versions import them from ``evals``.
"""

import os
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_insightface.data import pipeline as data
from keras_insightface.evaluation.embedder import compiled_inference
from keras_insightface.evaluation.metrics import (  # noqa: F401
    balanced_best_threshold,
    best_threshold_accuracy,
    evaluation_1N,
    kfold_accuracy,
    kfold_val_far,
    l2_normalize,
    roc_tar_at_far,
    squared_l2_distances,
    verification_metrics,
)
from keras_insightface.faces.alignment import (  # noqa: F401
    ARCFACE_TEMPLATE,
    alignment_template,
    estimate_alignment,
    face_align_landmarks,
)
from keras_insightface.models.zoo import load_basic_model  # noqa: F401 (the name scripts use)
from keras_insightface.utils import atomic_write


# ---------------------------------------------------------------------------------------------------------
# Embedding a .bin and the Keras callback.
# ---------------------------------------------------------------------------------------------------------
def model_image_size(model):
    """Static (height, width) of a single-input image model, or None when it accepts any size."""
    shape = model.input_shape
    shape = shape[0] if isinstance(shape, list) else shape
    height, width = shape[1], shape[2]
    return None if height is None or width is None else (int(height), int(width))


def decode_image_size(encoded, name="image"):
    """(height, width) of one encoded image; a ValueError with ``name`` when it cannot be decoded."""
    try:
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as err:
        raise ValueError(f"{name}: cannot decode image ({err.message.strip()[:200]})") from err
    return int(image.shape[0]), int(image.shape[1])


def images_dataset(encoded_images, image_size, batch_size=128, image_scale=data.SEEDS_SCALE):
    """``tf.data`` of normalized float32 batches decoded in parallel from a list of encoded images.

    Images of another size than ``image_size`` = (height, width) are resized to it (bilinear).
    """
    height, width = image_size

    def decode(encoded):
        image = tf.cast(tf.io.decode_image(encoded, channels=3, expand_animations=False), "float32")
        same_size = tf.reduce_all(tf.shape(image)[:2] == (height, width))
        image = tf.cond(same_size, lambda: image, lambda: tf.image.resize(image, (height, width)))
        return data.normalize_image(tf.ensure_shape(image, (height, width, 3)), image_scale)

    dataset = tf.data.Dataset.from_tensor_slices(tf.constant(list(encoded_images), dtype=tf.string))
    dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def make_embedding_function(basic_model, flip=True, input_spec=None):
    """A compiled function mapping a normalized batch to float32 embeddings ``f(x) [+ f(flip(x))]``.

    On TensorFlow a ``tf.function`` with a plain model call (not ``model.predict``), so it also runs from the
    cross-replica context of a distribution strategy; ``input_spec`` (a ``tf.TensorSpec`` with a None batch size)
    avoids retracing. On JAX the model's jitted inference (``embedder.compiled_inference``).
    """
    if keras.backend.backend() != "tensorflow":
        infer = compiled_inference(basic_model)

        def embed_any(images):
            images = np.asarray(images)
            embeddings = keras.ops.cast(infer(images), "float32")
            return embeddings + keras.ops.cast(infer(images[:, :, ::-1]), "float32") if flip else embeddings

        return embed_any
    signature = None if input_spec is None else [input_spec]

    @tf.function(input_signature=signature, reduce_retracing=True)
    def embed(images):
        embeddings = tf.cast(basic_model(images, training=False), "float32")
        if flip:
            embeddings += tf.cast(basic_model(tf.image.flip_left_right(images), training=False), "float32")
        return embeddings

    return embed


def embed_dataset(embed_fn, dataset):
    """Run ``embed_fn`` over every batch of ``dataset``; returns the stacked numpy embeddings."""
    return np.concatenate([np.asarray(embed_fn(batch)) for batch in dataset], axis=0)


def check_bin_images(bins, path):
    """Raise a ValueError naming ``path`` and the image index when any image of a bin cannot be decoded: checked
    before training starts, so a bad bin cannot cost a trained epoch."""
    bad = data.undecodable_indices(bins, is_path=False)
    if len(bad):
        others = f" (and {len(bad) - 1} more: {bad[1:6].tolist()})" if len(bad) > 1 else ""
        raise ValueError(f"{path}: cannot decode image {bad[0]} (of {len(bins)}){others}")


def _bin_name(test_bin_file):
    return os.path.splitext(os.path.basename(test_bin_file))[0]


class eval_callback(keras.callbacks.Callback):  # noqa: N801 (Keras_insightface's public name)
    """Evaluate ``basic_model`` on a verification ``.bin`` at each epoch end (and every ``eval_freq`` batches).

    Prints Keras_insightface's line and the insightface 10-fold line, writes ``logs[name]``, ``logs[name + "_thresh"]``,
    ``logs[name + "_10fold"]``, ``logs[name + "_10fold_std"]`` and ``logs[name + "_val_far"]`` (``name`` = bin
    file stem) and, when ``save_model`` is a path prefix, keeps the best basic model as
    ``<save_model>_basic_<name>_epoch_<E>[_batch_<B>]_<acc>.keras``. ``image_scale`` selects the input
    normalization (``data.SEEDS_SCALE`` = 1/128 or ``data.INSIGHTFACE_SCALE`` = 1/127.5). ``PCA_acc`` adds the
    10-fold result to that line, as Keras_insightface printed it. Standalone use: ``eval_callback(m, "lfw.bin").on_epoch_end(0)``.
    """

    def __init__(
        self,
        basic_model,
        test_bin_file,
        batch_size=128,
        save_model=None,
        eval_freq=1,
        flip=True,
        PCA_acc=False,  # noqa: N803
        image_scale=data.SEEDS_SCALE,
    ):
        super().__init__()
        bins, issame = data.load_bin(test_bin_file)
        if len(issame) == 0:
            raise ValueError(f"{test_bin_file}: no pairs in verification bin")
        check_bin_images(bins, test_bin_file)
        target_size = model_image_size(basic_model) or decode_image_size(bins[0], f"{test_bin_file} image 0")
        self.basic_model, self.test_issame, self.test_names = basic_model, issame, _bin_name(test_bin_file)
        self.batch_size, self.save_model, self.eval_freq, self.flip = batch_size, save_model, eval_freq, flip
        self.PCA_acc, self.image_scale = PCA_acc, image_scale
        self.dataset = images_dataset(bins, target_size, batch_size, image_scale)
        self.max_accuracy, self.cur_acc, self.acc_thresh, self.metrics = 0.0, 0.0, 0.0, {}
        self.cur_epoch, self._embed_fn, self._saved_path = 0, None, None

    def compute_embeddings(self):
        """Flip-TTA embeddings of every image of the bin, L2-normalized (2N x D)."""
        if self._embed_fn is None:
            self._embed_fn = make_embedding_function(self.basic_model, self.flip, self.dataset.element_spec)
        return l2_normalize(embed_dataset(self._embed_fn, self.dataset))

    def on_epoch_begin(self, epoch, logs=None):
        self.cur_epoch = epoch

    def on_batch_end(self, batch=0, logs=None):
        if self.eval_freq > 1 and batch > 0 and batch % self.eval_freq == 0:
            self._evaluate(logs, save_suffix="_epoch_%d_batch_%d" % (self.cur_epoch + 1, batch))

    def on_epoch_end(self, epoch=0, logs=None):
        self.cur_epoch = epoch
        self._evaluate(logs, save_suffix="_epoch_%d" % (epoch + 1))

    def _evaluate(self, logs, save_suffix):
        """Evaluate and log; a failure is a warning, so it never stops training nor the epoch's checkpoint."""
        try:
            self._evaluate_and_log(logs, save_suffix)
        except Exception as err:  # noqa: BLE001 - any failure of one evaluation must not end a long run
            warnings.warn(
                f"{self.test_names} evaluation failed, no result this time: {err!r}", RuntimeWarning, stacklevel=2
            )

    def _evaluate_and_log(self, logs, save_suffix):
        embeddings = self.compute_embeddings()
        if not np.all(np.isfinite(embeddings)):
            print(f">>>> {self.test_names} evaluation: embeddings contain NaN / Inf, accuracy set to 0")
            metrics = dict.fromkeys(("accuracy", "thresh", "10fold", "10fold_std", "val", "val_std", "far"), 0.0)
        else:
            metrics = verification_metrics(embeddings, self.test_issame)
        self.metrics, self.cur_acc, self.acc_thresh = metrics, metrics["accuracy"], metrics["thresh"]
        previous = self.max_accuracy
        line = ">>>> %s evaluation max accuracy: %f, thresh: %f, previous max accuracy: %f" % (
            self.test_names,
            self.cur_acc,
            self.acc_thresh,
            previous,
        )
        if self.PCA_acc:
            line += ", PCA accuray = %f ± %f" % (metrics["10fold"], metrics["10fold_std"])
        print(line)
        print(
            ">>>> %s 10-fold accuracy: %f ± %f, VAL@FAR=1e-3: %f ± %f (FAR %f)"
            % (
                self.test_names,
                metrics["10fold"],
                metrics["10fold_std"],
                metrics["val"],
                metrics["val_std"],
                metrics["far"],
            )
        )
        if logs is not None:
            logs.update(self.log_values())
        if self.cur_acc > previous:
            self.max_accuracy = self.cur_acc
            if self.save_model:
                self._save_best(save_suffix)

    def log_values(self):
        """The latest results under the history keys the trainer records."""
        name, metrics = self.test_names, self.metrics
        return {
            name: metrics["accuracy"],
            name + "_thresh": metrics["thresh"],
            name + "_10fold": metrics["10fold"],
            name + "_10fold_std": metrics["10fold_std"],
            name + "_val_far": metrics["val"],
        }

    def _save_best(self, save_suffix):
        """Save the basic model atomically under a name holding epoch and accuracy; drop the previous best."""
        path = "%s_basic_%s%s_%f.keras" % (self.save_model, self.test_names, save_suffix, self.max_accuracy)
        with atomic_write(path, suffix=".keras") as tmp_path:
            self.basic_model.save(tmp_path)
        if self._saved_path and self._saved_path != path and os.path.exists(self._saved_path):
            os.remove(self._saved_path)
        self._saved_path = path
        print(">>>> Saved best basic model:", path)


# ---------------------------------------------------------------------------------------------------------
# Command line: evaluate a saved model on bins.
# ---------------------------------------------------------------------------------------------------------
def evaluate_bins(basic_model, bin_files, batch_size=128, flip=True, image_scale=data.SEEDS_SCALE):
    """Metrics of ``basic_model`` on every bin: ``{bin name: verification_metrics dict}``."""
    results = {}
    for bin_file in bin_files:
        callback = eval_callback(basic_model, bin_file, batch_size=batch_size, flip=flip, image_scale=image_scale)
        callback.on_epoch_end(0)
        results[callback.test_names] = callback.metrics
    return results


def format_results_table(results):
    """A Markdown table of ``evaluate_bins`` results."""
    lines = [
        "| bin | accuracy | thresh | 10-fold acc | 10-fold std | VAL@FAR=1e-3 | VAL std | FAR |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    keys = ("accuracy", "thresh", "10fold", "10fold_std", "val", "val_std", "far")
    for name, metrics in results.items():
        lines.append("| %s | " % name + " | ".join("%.6f" % metrics[key] for key in keys) + " |")
    return "\n".join(lines)

"""Verification on insightface ``.bin`` files: the SPEC §5 metrics, the ``eval_callback`` and a CLI.

The metrics are exact re-implementations of the reference algorithms (the seeds' best-threshold accuracy
and insightface's 10-fold accuracy / VAL@FAR), vectorized: sort once and count with ``searchsorted``.
"""

import argparse
import os

import keras
import numpy as np
import tensorflow as tf

import data
from utils import atomic_write

KFOLD_THRESHOLDS = np.arange(0, 4, 0.01)  # insightface calculate_roc thresholds on squared L2 distance
VAL_THRESHOLDS = np.arange(0, 4, 0.001)  # insightface calculate_val thresholds
VAL_FAR_TARGET = 1e-3
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)  # SPEC §3, for a 112x112 crop


# ---------------------------------------------------------------------------------------------------------
# Metrics (SPEC §5), pure numpy.
# ---------------------------------------------------------------------------------------------------------
def l2_normalize(embeddings, axis=-1):
    """L2-normalize rows (zero rows stay zero)."""
    embeddings = np.asarray(embeddings)
    norm = np.linalg.norm(embeddings, axis=axis, keepdims=True)
    return embeddings / np.where(norm == 0, 1, norm)


def _check_pairs(embeddings, issame):
    embeddings = np.asarray(embeddings)
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    if embeddings.ndim != 2 or embeddings.shape[0] != 2 * issame.shape[0]:
        raise ValueError(
            f"expected 2 * {issame.shape[0]} embeddings for {issame.shape[0]} pairs, got shape {embeddings.shape}"
        )
    return embeddings, issame


def best_threshold_accuracy(scores, issame):
    """The seeds' accuracy: max over candidate thresholds of (#genuine > t + #impostor <= t) / N.

    Candidates are the top 10% impostor scores (``int(0.1 * n_impostor)`` of them, at least one); ties go to
    the smallest candidate, as ``np.argmax`` in the reference. Returns ``(accuracy, threshold)``.
    """
    scores = np.asarray(scores).reshape(-1)
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    if scores.shape != issame.shape:
        raise ValueError(f"{scores.shape[0]} scores for {issame.shape[0]} labels")
    genuine = np.sort(scores[issame])
    impostor = np.sort(scores[~issame])
    if impostor.size == 0:
        raise ValueError("best-threshold accuracy needs at least one impostor pair")
    num_steps = max(int(0.1 * impostor.shape[0]), 1)
    candidates = impostor[-num_steps:]
    correct = genuine.shape[0] - np.searchsorted(genuine, candidates, side="right")
    correct = correct + np.searchsorted(impostor, candidates, side="right")
    best = int(np.argmax(correct))
    return correct[best] / scores.shape[0], candidates[best]


def squared_l2_distances(embeddings):
    """Squared L2 distance of consecutive pairs ``e[0::2], e[1::2]``, computed as the reference does."""
    return np.sum(np.square(np.subtract(embeddings[0::2], embeddings[1::2])), 1)


def _kfold_slices(num_pairs, num_folds=10):
    """Contiguous test folds of ``sklearn.model_selection.KFold(num_folds, shuffle=False)``."""
    sizes = np.full(num_folds, num_pairs // num_folds, dtype=np.int64)
    sizes[: num_pairs % num_folds] += 1
    ends = np.cumsum(sizes)
    return [slice(int(end - size), int(end)) for end, size in zip(ends, sizes)]


def _count_less(sorted_values, thresholds):
    """Number of values strictly below each threshold (the reference predicts same-person by ``dist < t``)."""
    return np.searchsorted(sorted_values, thresholds, side="left")


def _fold_counts(dist, issame, folds, thresholds):
    """Per fold: (genuine < t, impostor < t, #genuine, #impostor) for the test fold and the train split."""
    all_gen = _count_less(np.sort(dist[issame]), thresholds)
    all_imp = _count_less(np.sort(dist[~issame]), thresholds)
    num_gen, num_imp = int(issame.sum()), int((~issame).sum())
    for fold in folds:
        fold_dist, fold_same = dist[fold], issame[fold]
        test_gen = _count_less(np.sort(fold_dist[fold_same]), thresholds)
        test_imp = _count_less(np.sort(fold_dist[~fold_same]), thresholds)
        test_num_gen = int(fold_same.sum())
        test_num_imp = fold_same.shape[0] - test_num_gen
        test = (test_gen, test_imp, test_num_gen, test_num_imp)
        train = (all_gen - test_gen, all_imp - test_imp, num_gen - test_num_gen, num_imp - test_num_imp)
        yield test, train


def kfold_accuracy(dist, issame, num_folds=10, thresholds=KFOLD_THRESHOLDS):
    """insightface ``calculate_roc`` accuracy: per fold the first threshold maximizing train accuracy.

    ``dist`` are squared L2 distances. Returns the array of per-fold test accuracies.
    """
    dist = np.asarray(dist).reshape(-1)
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    folds = _kfold_slices(dist.shape[0], num_folds)
    accuracy = np.zeros(num_folds)
    for fold_idx, (test, train) in enumerate(_fold_counts(dist, issame, folds, thresholds)):
        train_correct = train[0] + (train[3] - train[1])  # tp + tn
        best = int(np.argmax(train_correct))
        test_size = test[2] + test[3]
        accuracy[fold_idx] = float(test[0][best] + test[3] - test[1][best]) / test_size
    return accuracy


def _interpolate_threshold(far, thresholds, far_target):
    """Threshold where the FAR curve crosses ``far_target``: what scipy's pre-1.9.3 slinear interp1d did."""
    if np.max(far) < far_target:
        return 0.0
    j = int(np.searchsorted(far, far_target, side="right")) - 1
    if j + 1 >= far.shape[0]:
        return float(thresholds[j])
    return thresholds[j] + (far_target - far[j]) * (thresholds[j + 1] - thresholds[j]) / (far[j + 1] - far[j])


def _safe_ratio(count, total):
    return float(count) / float(total) if total else 0.0


def kfold_val_far(dist, issame, far_target=VAL_FAR_TARGET, num_folds=10, thresholds=VAL_THRESHOLDS):
    """insightface ``calculate_val``: returns ``(val_mean, val_std, far_mean)`` on squared L2 distances."""
    dist = np.asarray(dist).reshape(-1)
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    folds = _kfold_slices(dist.shape[0], num_folds)
    val, far = np.zeros(num_folds), np.zeros(num_folds)
    for fold_idx, (_, train) in enumerate(_fold_counts(dist, issame, folds, thresholds)):
        far_train = train[1] / float(train[3]) if train[3] else np.zeros(thresholds.shape[0])
        threshold = _interpolate_threshold(far_train, thresholds, far_target)
        fold_dist, fold_same = dist[folds[fold_idx]], issame[folds[fold_idx]]
        predict = fold_dist < threshold
        val[fold_idx] = _safe_ratio(np.sum(predict & fold_same), np.sum(fold_same))
        far[fold_idx] = _safe_ratio(np.sum(predict & ~fold_same), np.sum(~fold_same))
    return np.mean(val), np.std(val), np.mean(far)


def verification_metrics(embeddings, issame, num_folds=10):
    """All SPEC §5 metrics for 2N embeddings (pairs consecutive) and N labels, as a dict.

    Embeddings are L2-normalized first. Keys: ``accuracy``, ``thresh`` (best-threshold cosine accuracy),
    ``10fold``, ``10fold_std`` (insightface), ``val``, ``val_std``, ``far`` (VAL@FAR=1e-3).
    """
    embeddings, issame = _check_pairs(embeddings, issame)
    embeddings = l2_normalize(embeddings)
    scores = np.einsum("ij,ij->i", embeddings[0::2], embeddings[1::2])
    accuracy, thresh = best_threshold_accuracy(scores, issame)
    dist = squared_l2_distances(embeddings)
    fold_acc = kfold_accuracy(dist, issame, num_folds)
    val, val_std, far = kfold_val_far(dist, issame, num_folds=num_folds)
    return {
        "accuracy": float(accuracy),
        "thresh": float(thresh),
        "10fold": float(np.mean(fold_acc)),
        "10fold_std": float(np.std(fold_acc)),
        "val": float(val),
        "val_std": float(val_std),
        "far": float(far),
    }


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
    """A ``tf.function`` mapping a normalized batch to float32 embeddings ``f(x) [+ f(flip(x))]``.

    A plain model call (not ``model.predict``), so it also runs from the cross-replica context of a
    distribution strategy. ``input_spec`` (a ``tf.TensorSpec`` with a None batch size) avoids retracing.
    """
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


def _bin_name(test_bin_file):
    return os.path.splitext(os.path.basename(test_bin_file))[0]


class eval_callback(keras.callbacks.Callback):  # noqa: N801 (the seeds' public name)
    """Evaluate ``basic_model`` on a verification ``.bin`` at each epoch end (and every ``eval_freq`` batches).

    Prints the seeds' line and the insightface 10-fold line, writes ``logs[name]``, ``logs[name + "_thresh"]``,
    ``logs[name + "_10fold"]``, ``logs[name + "_10fold_std"]`` and ``logs[name + "_val_far"]`` (``name`` = bin
    file stem) and, when ``save_model`` is a path prefix, keeps the best basic model as
    ``<save_model>_basic_<name>_epoch_<E>[_batch_<B>]_<acc>.keras``. ``image_scale`` selects the input
    normalization (``data.SEEDS_SCALE`` = 1/128 or ``data.INSIGHTFACE_SCALE`` = 1/127.5). ``PCA_acc`` adds the
    10-fold result to the seeds' line, as the seeds printed it. Standalone use: ``eval_callback(m, "lfw.bin").on_epoch_end(0)``.
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
        first_size = decode_image_size(bins[0], f"{test_bin_file} image 0")  # fails early on undecodable bins
        target_size = model_image_size(basic_model) or first_size
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
# Face alignment (SPEC §3).
# ---------------------------------------------------------------------------------------------------------
def alignment_template(image_size=(112, 112)):
    """The ArcFace 5-point template scaled from 112x112 to ``image_size`` = (height, width)."""
    height, width = image_size
    return ARCFACE_TEMPLATE * np.array([width / 112.0, height / 112.0], dtype=np.float32)


def estimate_alignment(landmarks, image_size=(112, 112)):
    """Similarity transform (skimage) mapping 5 detected landmarks (x, y) onto the ArcFace template."""
    from skimage.transform import SimilarityTransform

    landmarks = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    if landmarks.shape != (5, 2):
        raise ValueError(f"expected 5 (x, y) landmarks, got shape {np.shape(landmarks)}")
    transform = SimilarityTransform.from_estimate(landmarks, alignment_template(image_size).astype(np.float64))
    if not transform:
        raise ValueError(f"cannot estimate an alignment from landmarks {landmarks.tolist()}: {transform}")
    return transform


def face_align_landmarks(image, landmarks, image_size=(112, 112)):
    """Crop a face: warp ``image`` (HxWx3) so its 5 landmarks land on the ArcFace template; zero border.

    ``landmarks`` is (5, 2) or 10 values (x1, y1, ..., x5, y5). Uses OpenCV's ``warpAffine`` when installed
    (faster), else skimage ``warp``; both bilinear. Returns an array of ``image``'s dtype, ``image_size`` big.
    """
    image = np.asarray(image)
    matrix = estimate_alignment(landmarks, image_size).params
    height, width = image_size
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is not None:
        return cv2.warpAffine(image, matrix[:2], (width, height), flags=cv2.INTER_LINEAR, borderValue=0)
    from skimage.transform import AffineTransform, warp

    warped = warp(
        image,
        AffineTransform(matrix=matrix).inverse,
        output_shape=(height, width),
        order=1,
        mode="constant",
        cval=0,
        preserve_range=True,
    )
    if np.issubdtype(image.dtype, np.integer):
        warped = np.clip(np.round(warped), np.iinfo(image.dtype).min, np.iinfo(image.dtype).max)
    return warped.astype(image.dtype)


# ---------------------------------------------------------------------------------------------------------
# Command line: evaluate a saved model on bins.
# ---------------------------------------------------------------------------------------------------------
def load_basic_model(model_path, safe_mode=True):
    """Load a ``.keras`` / ``.h5`` basic model for inference (``safe_mode`` refuses pickled lambdas)."""
    if not os.path.exists(model_path):
        raise FileNotFoundError(f"model not found: {model_path}")
    return keras.models.load_model(model_path, compile=False, safe_mode=safe_mode)


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


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(
        description="Evaluate a basic model on insightface verification .bin files",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-m", "--model", required=True, help="saved basic model, .keras or .h5")
    parser.add_argument("-t", "--test_bin_files", nargs="+", required=True, help="verification .bin files")
    parser.add_argument("-b", "--batch_size", type=int, default=128, help="evaluation batch size")
    parser.add_argument(
        "--no-flip", dest="flip", action="store_false", help="disable the flip test-time augmentation (on by default)"
    )
    parser.add_argument(
        "--scale", type=float, default=128.0, choices=(128.0, 127.5), help="input normalization (x - 127.5) / scale"
    )
    parser.add_argument(
        "--unsafe_load", action="store_true", help="load the model with safe_mode=False (trusted files only)"
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_arguments(argv)
    basic_model = load_basic_model(args.model, safe_mode=not args.unsafe_load)
    results = evaluate_bins(basic_model, args.test_bin_files, args.batch_size, args.flip, 1.0 / args.scale)
    print(format_results_table(results))
    return results


if __name__ == "__main__":
    main()

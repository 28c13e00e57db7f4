"""Data input: class folders, cached image lists and npz/tfrecord files to ``tf.data``; verification ``.bin`` I/O.

Training folders are ``root/<class>/<image>``; labels are sparse integers (SPEC §2). The image list is cached
next to the checkpoint (or in ``cache_dir``) and invalidated automatically when the folder changes.
"""

import importlib
import io
import os
import pickle

import numpy as np

from utils import atomic_write

IMAGE_MEAN = 127.5
SEEDS_SCALE = 0.0078125  # the seeds' `(x - 127.5) * 0.0078125`, used for training
INSIGHTFACE_SCALE = 1 / 127.5  # insightface's `(x - 127.5) / 127.5`, offered for evaluation
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "keras_insightface")


def normalize_image(images, scale=SEEDS_SCALE):
    """Map 0..255 RGB to the model input range: ``(x - 127.5) * scale``. Works on numpy arrays and tensors."""
    return (images - IMAGE_MEAN) * scale


# ---------------------------------------------------------------------------------------------------------
# Verification .bin files: a pickle of (bins, issame_list), loaded with a restricted unpickler.
# ---------------------------------------------------------------------------------------------------------
_ALLOWED_PICKLE_GLOBALS = {
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "dict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytes"),
    ("builtins", "bytearray"),
    ("builtins", "bool"),
    ("builtins", "int"),
    ("builtins", "float"),
    ("_codecs", "encode"),  # protocol-2 pickles store bytes as _codecs.encode(str, "latin1")
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that admits only plain containers, numbers, bytes and numpy arrays: no code can run."""

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load '{module}.{name}': only containers, bytes and numpy arrays are allowed"
            )
        if module.startswith("numpy.core"):  # numpy 2 renamed numpy.core to numpy._core
            module = module.replace("numpy.core", "numpy._core", 1)
        return getattr(importlib.import_module(module), name)


def restricted_pickle_load(file_obj):
    """Load a pickle from ``file_obj`` allowing only data types (SPEC §2). Python-2 pickles load as bytes."""
    return _RestrictedUnpickler(file_obj, encoding="bytes").load()


def _to_bytes(image, index, path):
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 1:
        return image.tobytes()  # CFP-FP / AgeDB-30 style: encoded bytes stored as a uint8 array
    raise ValueError(f"{path}: image {index} is {type(image).__name__}, expected encoded image bytes")


def load_bin(path):
    """Read an insightface verification ``.bin``: returns ``(bins, issame)``.

    ``bins`` is a list of 2N encoded images (bytes; pairs are consecutive), ``issame`` a bool array of N.
    Both the byte-string and the numpy-uint8-array image encodings are accepted.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"verification bin not found: {path}")
    try:
        with open(path, "rb") as ff:
            content = restricted_pickle_load(ff)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: not a valid verification bin ({err})") from err
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise ValueError(f"{path}: not a valid verification bin, unreadable pickle ({err!r})") from err
    if not isinstance(content, tuple | list) or len(content) != 2:
        raise ValueError(f"{path}: not a valid verification bin, expected a pickled (bins, issame_list) pair")
    bins, issame = content
    try:
        issame = np.asarray(issame, dtype=bool).reshape(-1)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: issame_list is not a list of booleans") from err
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs, expected {2 * len(issame)} images")
    bins = [_to_bytes(image, index, path) for index, image in enumerate(bins)]
    return bins, issame


def write_bin(path, bins, issame):
    """Write ``(bins, issame_list)`` in the insightface pickle format, atomically."""
    bins = [bytes(image) for image in bins]
    issame = [bool(ii) for ii in issame]
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{len(bins)} images for {len(issame)} pairs, expected {2 * len(issame)} images")
    with atomic_write(path) as tmp_path, open(tmp_path, "wb") as ff:
        pickle.dump((bins, issame), ff, protocol=pickle.HIGHEST_PROTOCOL)
    return path


def encode_jpeg(image, quality=95):
    """Encode a uint8 HxWx3 RGB array to JPEG bytes (PIL, no TensorFlow needed)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------
# Image lists: class folders and cached npz files.
# ---------------------------------------------------------------------------------------------------------
def _class_sort_key(names):
    """Numeric class names sort numerically, anything else lexicographically (SPEC §2)."""
    if all(name.isdigit() for name in names):
        return lambda name: int(name)
    return lambda name: name


def _folder_fingerprint(data_path):
    """A cheap signature of a class folder: class dir names and mtimes change whenever images are added/removed."""
    entries = sorted((entry.name, entry.stat().st_mtime_ns) for entry in os.scandir(data_path) if entry.is_dir())
    return str(hash_strings([f"{name}:{mtime}" for name, mtime in entries]))


def hash_strings(strings):
    """Stable hex digest of a list of strings."""
    import hashlib

    digest = hashlib.sha1()
    for item in strings:
        digest.update(item.encode("utf-8", "surrogateescape"))
        digest.update(b"\0")
    return digest.hexdigest()


def scan_class_folder(data_path):
    """Index ``root/<class>/<image>`` into ``(image_names, image_classes, class_names)``; empty classes skipped."""
    import logging

    if not os.path.isdir(data_path):
        raise FileNotFoundError(f"training data folder not found: {data_path}")
    class_dirs = [entry.name for entry in os.scandir(data_path) if entry.is_dir()]
    class_dirs.sort(key=_class_sort_key(class_dirs))
    image_names, image_classes, class_names = [], [], []
    for class_dir in class_dirs:
        folder = os.path.join(data_path, class_dir)
        images = sorted(entry.path for entry in os.scandir(folder) if entry.name.lower().endswith(IMAGE_EXTENSIONS))
        if not images:
            logging.warning("skipping empty class folder: %s", folder)
            continue
        image_names.extend(images)
        image_classes.extend([len(class_names)] * len(images))
        class_names.append(class_dir)
    if not image_names:
        raise ValueError(f"no images found in {data_path}: expected root/<class>/<image>.jpg|png")
    return np.array(image_names), np.array(image_classes, dtype=np.int64), class_names


def find_corrupt_images(image_names):
    """Return the names of files that cannot be decoded (PIL ``verify``); used by ``verify_images=True``."""
    from PIL import Image

    corrupt = []
    for name in image_names:
        try:
            with Image.open(name) as image:
                image.verify()
        except Exception:  # noqa: BLE001 - any decoder failure means the file is unusable
            corrupt.append(name)
    return corrupt


def pre_process_folder(data_path, cache_dir=None, verify_images=False):
    """Image list of ``data_path`` (folder or npz) as a dict with ``image_names``, ``image_classes``[, ``embeddings``].

    For a folder the list is cached as ``<cache_dir>/<folder name>_shuffle.npz`` and rebuilt when the folder
    changes. With ``verify_images`` every image is decoded once and unreadable ones are dropped and reported.
    """
    import logging

    data_path = os.fspath(data_path)
    if data_path.endswith(".npz"):
        if not os.path.isfile(data_path):
            raise FileNotFoundError(f"image list not found: {data_path}")
        with np.load(data_path, allow_pickle=False) as content:
            if "image_names" not in content or "image_classes" not in content:
                raise ValueError(f"{data_path}: an image-list npz needs 'image_names' and 'image_classes'")
            return {key: content[key] for key in ("image_names", "image_classes", "embeddings") if key in content}
    if not os.path.isdir(data_path):
        raise FileNotFoundError(f"training data folder not found: {data_path}")
    fingerprint = _folder_fingerprint(data_path)
    cache_dir = cache_dir or DEFAULT_CACHE_DIR
    cache_file = os.path.join(cache_dir, os.path.basename(os.path.normpath(data_path)) + "_shuffle.npz")
    if os.path.isfile(cache_file):
        with np.load(cache_file, allow_pickle=False) as content:
            if (
                str(content.get("fingerprint", "")) == fingerprint
                and bool(content.get("verified", False)) >= verify_images
            ):
                return {"image_names": content["image_names"], "image_classes": content["image_classes"]}
    image_names, image_classes, _ = scan_class_folder(data_path)
    if verify_images:
        corrupt = set(find_corrupt_images(image_names))
        if corrupt:
            logging.warning("dropping %d unreadable images, e.g. %s", len(corrupt), sorted(corrupt)[:5])
            keep = np.array([name not in corrupt for name in image_names])
            image_names, image_classes = image_names[keep], image_classes[keep]
    try:
        with atomic_write(cache_file) as tmp_path:
            np.savez(
                tmp_path,
                image_names=image_names,
                image_classes=image_classes,
                fingerprint=fingerprint,
                verified=verify_images,
            )
    except OSError as err:  # a read-only dataset location must not stop training
        logging.warning("could not write image-list cache %s: %s", cache_file, err)
    return {"image_names": image_names, "image_classes": image_classes}


# ---------------------------------------------------------------------------------------------------------
# tf.data pipeline.
# ---------------------------------------------------------------------------------------------------------
class TrainDataset:
    """What the trainer needs from the input: the batched dataset, its size and the label space.

    ``dataset`` yields ``(images, targets)``: images float32 ``(B, H, W, 3)`` already normalized, targets a dict
    with ``"label"`` (sparse int32 ``(B,)``) and, for distillation data, ``"embedding"`` (float32 ``(B, D)``).
    It repeats forever; an epoch is ``steps_per_epoch`` batches.
    """

    def __init__(self, dataset, steps_per_epoch, classes, num_images, embedding_dim=0):
        self.dataset, self.steps_per_epoch, self.classes = dataset, steps_per_epoch, classes
        self.num_images, self.embedding_dim = num_images, embedding_dim

    @classmethod
    def from_dataset(cls, dataset, classes, steps_per_epoch):
        """Wrap a user's batched ``tf.data.Dataset`` of ``(images, labels)`` (or ``(images, {"label": ...})``).

        Images must already be normalized; labels sparse integers. The dataset is repeated.
        """
        import tensorflow as tf

        def as_targets(images, targets):
            if not isinstance(targets, dict):
                targets = {"label": tf.cast(tf.reshape(targets, [-1]), tf.int32)}
            return images, targets

        spec = dataset.element_spec
        if not isinstance(spec, tuple) or len(spec) != 2:
            raise ValueError(f"expected a dataset of (images, labels) batches, got element_spec {spec}")
        embedding_spec = spec[1].get("embedding") if isinstance(spec[1], dict) else None
        embedding_dim = 0 if embedding_spec is None else int(embedding_spec.shape[-1])
        dataset = dataset.map(as_targets).repeat()
        return cls(
            dataset,
            int(steps_per_epoch),
            int(classes),
            int(steps_per_epoch) * int(spec[0].shape[0] or 0),
            embedding_dim,
        )


def random_process_image(image, img_shape=(112, 112), random_status=0, random_crop=(100, 100, 3)):
    """Augment one float32 0..255 image per SPEC §3 ``random_status`` (cumulative levels; >= 100: RandAugment)."""
    import tensorflow as tf

    if random_status >= 0:
        image = tf.image.random_flip_left_right(image)
    if random_status >= 100:
        return rand_augment(image, magnitude=5 * random_status / 100)
    if random_status >= 1:
        image = tf.image.random_brightness(image, 12.75 * random_status)
    if random_status >= 2:
        lower, upper = 1 - 0.1 * random_status, 1 + 0.1 * random_status
        image = tf.image.random_contrast(image, max(lower, 0.0), upper)
        image = tf.image.random_saturation(image, max(lower, 0.0), upper)
    if random_status >= 3:
        crop = tf.image.random_crop(image, (random_crop[0], random_crop[1], 3))
        image = tf.image.resize(crop, img_shape)
    return tf.clip_by_value(image, 0.0, 255.0)


def rand_augment(image, magnitude=5.0, num_ops=2):
    """RandAugment-style: ``num_ops`` random ops out of colour and geometric ones, strength ``magnitude`` (0-10)."""
    import tensorflow as tf

    level = magnitude / 10.0
    height, width = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)

    def affine(transform):
        transform = tf.reshape(tf.cast(transform, tf.float32), [1, 8])
        out = tf.raw_ops.ImageProjectiveTransformV3(
            images=image[None],
            transforms=transform,
            output_shape=tf.shape(image)[:2],
            fill_value=0.0,
            interpolation="BILINEAR",
            fill_mode="CONSTANT",
        )
        return out[0]

    def signed(value):
        return value * tf.where(tf.random.uniform([]) < 0.5, -1.0, 1.0)

    ops = [
        lambda: tf.image.adjust_brightness(image, signed(level * 0.5 * 255)),
        lambda: tf.image.adjust_contrast(image, 1 + signed(level * 0.9)),
        lambda: tf.image.adjust_saturation(image, 1 + signed(level * 0.9)),
        lambda: tf.where(image < 256 - level * 128, image, 255.0 - image),  # solarize
        lambda: affine([1, signed(level * 0.3), 0, 0, 1, 0, 0, 0]),  # shear x
        lambda: affine([1, 0, signed(level * 0.3 * width), 0, 1, 0, 0, 0]),  # translate x
        lambda: affine([1, 0, 0, 0, 1, signed(level * 0.3 * height), 0, 0]),  # translate y
        lambda: _rotate(image, signed(level * 30.0)),
    ]
    for _ in range(num_ops):
        index = tf.random.uniform([], 0, len(ops), dtype=tf.int32)
        image = tf.switch_case(index, ops)
    return tf.clip_by_value(image, 0.0, 255.0)


def _rotate(image, degrees):
    import math

    import tensorflow as tf

    angle = degrees * math.pi / 180
    height, width = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
    cos, sin = tf.cos(angle), tf.sin(angle)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    transform = [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=tf.reshape(tf.stack(transform), [1, 8]),
        output_shape=tf.shape(image)[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    return out[0]


def random_cutout_mask(image, probability):
    """Simulated face mask: with ``probability`` fill the image from a random row near the nose tip downwards."""
    import tensorflow as tf

    height = tf.shape(image)[0]
    start = tf.cast(tf.cast(height, tf.float32) * tf.random.uniform([], 0.55, 0.7), tf.int32)
    rows = tf.range(height)[:, None, None]
    color = tf.random.uniform([3], 0, 255)
    masked = tf.where(rows >= start, color, image)
    return tf.cond(tf.random.uniform([]) < probability, lambda: masked, lambda: image)


def decode_image(path_or_bytes, img_shape=(112, 112), is_path=True):
    """Read (if a path) and decode a JPEG/PNG to float32 0..255 RGB, resized to ``img_shape`` if needed."""
    import tensorflow as tf

    content = tf.io.read_file(path_or_bytes) if is_path else path_or_bytes
    image = tf.io.decode_image(content, channels=3, expand_animations=False)
    image = tf.cast(image, tf.float32)
    image.set_shape([None, None, 3])
    size_ok = tf.reduce_all(tf.shape(image)[:2] == tf.constant(img_shape, tf.int32))
    return tf.cond(size_ok, lambda: image, lambda: tf.image.resize(image, img_shape))


def _triplet_index_dataset(image_classes, image_per_class, seed=None, shard=None):
    """Infinite dataset of image indices laid out as P classes x K images, classes reshuffled each epoch.

    ``shard=(num_shards, index)`` keeps every ``num_shards``-th class, so P x K groups stay whole.
    """
    import tensorflow as tf

    order = np.argsort(image_classes, kind="stable")
    classes, starts, counts = np.unique(image_classes[order], return_index=True, return_counts=True)
    order, starts, counts = tf.constant(order), tf.constant(starts), tf.constant(counts)
    class_ids = tf.data.Dataset.range(len(classes))
    if shard is not None:
        class_ids = class_ids.shard(*shard)

    def sample(class_index):
        count = counts[class_index]
        repeats = (image_per_class + count - 1) // count  # classes smaller than K repeat images
        picks = tf.random.shuffle(tf.tile(tf.range(count), [repeats]))[:image_per_class]
        return tf.gather(order, starts[class_index] + picks)

    ds = class_ids.shuffle(len(classes), seed=seed, reshuffle_each_iteration=True).repeat()
    return ds.map(sample).unbatch()


def prepare_dataset(
    data_path,
    batch_size=128,
    img_shape=(112, 112),
    random_status=0,
    random_crop=(100, 100, 3),
    image_per_class=0,
    random_cutout_mask_area=0.0,
    mixup_alpha=0,
    cache_dir=None,
    verify_images=False,
    seed=None,
    shard=None,
):
    """Build the training :class:`TrainDataset` from a class folder, an image-list npz or a distill TFRecord.

    ``image_per_class > 0`` makes triplet batches (P identities x K images). Decoding and augmentation run in
    parallel; unreadable images are skipped with a logged warning instead of stopping the epoch.
    ``shard=(num_shards, index)`` keeps one worker's share of the images (of the identities for triplet batches)
    before anything is decoded; ``classes`` and ``num_images`` still describe the whole dataset, ``steps_per_epoch``
    is the shard's.
    """
    import tensorflow as tf

    data_path = os.fspath(data_path)
    img_shape = tuple(int(ii) for ii in img_shape[:2])
    if data_path.endswith((".tfrecord", ".tfrecords")):
        import data_distiller  # lazily: the distillation record format lives with its writer

        records, header = data_distiller.read_distill_tfrecord(data_path)
        image_classes = None
        num_images, classes, embedding_dim = header["total"], header["classes"], header["emb_shape"]
        records = records if shard is None else records.shard(*shard)
        ds = records.shuffle(min(num_images, 100_000), seed=seed, reshuffle_each_iteration=True).repeat()
    else:
        content = pre_process_folder(data_path, cache_dir=cache_dir, verify_images=verify_images)
        image_names, image_classes = content["image_names"], content["image_classes"].astype(np.int64)
        embeddings = content.get("embeddings")
        num_images, classes = len(image_names), int(image_classes.max()) + 1
        embedding_dim = 0 if embeddings is None else embeddings.shape[-1]
        if image_per_class > 0:
            indices = _triplet_index_dataset(image_classes, image_per_class, seed=seed, shard=shard)
            ds = indices.map(lambda ii: (tf.gather(image_names, ii), tf.gather(image_classes, ii)))
        else:
            slices = (image_names, image_classes) if embeddings is None else (image_names, image_classes, embeddings)
            ds = tf.data.Dataset.from_tensor_slices(slices)
            ds = ds if shard is None else ds.shard(*shard)
            ds = ds.shuffle(num_images, seed=seed, reshuffle_each_iteration=True).repeat()

    def load(name, label, embedding=None):
        image = decode_image(name, img_shape)
        image = random_process_image(image, img_shape, random_status, random_crop)
        if random_cutout_mask_area > 0:
            image = random_cutout_mask(image, random_cutout_mask_area)
        targets = {"label": tf.cast(label, tf.int32)}
        if embedding is not None:
            targets["embedding"] = tf.cast(embedding, tf.float32)
        return normalize_image(image), targets

    if image_per_class > 0:
        batch_size = max(image_per_class, batch_size // image_per_class * image_per_class)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=image_per_class > 0)
    ds = ds.ignore_errors(log_warning=True)
    if image_per_class > 0:  # regroup by label, so a skipped unreadable image cannot shift the P x K layout
        ds = ds.group_by_window(
            key_func=lambda image, targets: tf.cast(targets["label"], tf.int64),
            reduce_func=lambda key, window: window.batch(image_per_class),
            window_size=image_per_class,
        ).unbatch()
    ds = ds.batch(batch_size, drop_remainder=True)
    if mixup_alpha > 0:
        ds = ds.map(lambda images, targets: mixup(images, targets, mixup_alpha), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    steps_per_epoch = max(1, num_images // (batch_size * (1 if shard is None else shard[0])))
    return TrainDataset(ds, steps_per_epoch, classes, num_images, embedding_dim)


def mixup(images, targets, alpha):
    """Batch mixup that keeps labels sparse: adds ``label_b`` (partner label) and ``mix`` (weight of ``label``)."""
    import tensorflow as tf

    batch = tf.shape(images)[0]
    gamma_a = tf.random.gamma([batch], alpha)
    gamma_b = tf.random.gamma([batch], alpha)
    mix = gamma_a / (gamma_a + gamma_b)
    partner = tf.random.shuffle(tf.range(batch))
    images = mix[:, None, None, None] * images + (1 - mix[:, None, None, None]) * tf.gather(images, partner)
    targets = dict(targets, label_b=tf.gather(targets["label"], partner), mix=mix)
    return images, targets

"""File formats of face data, readable without TensorFlow: the model input convention, verification ``.bin``
files, image lists of class folders (and their cache), and distillation data (npz / TFRecord).

Training folders are ``root/<class>/<image>``; class names that are all numbers sort numerically, others
lexicographically, and a label is the class's index in that order. Only the distillation TFRecord functions need
TensorFlow, and they import it when called.
"""

import hashlib
import importlib
import io
import logging
import os
import pickle
import re

import numpy as np

from keras_insightface.utils import atomic_write

IMAGE_MEAN = 127.5
SEEDS_SCALE = 0.0078125  # `(x - 127.5) * 0.0078125`: the library's training convention
INSIGHTFACE_SCALE = 1 / 127.5  # insightface's `(x - 127.5) / 127.5`, offered for evaluation
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "keras_insightface")
DISTILL_HEADER_KEYS = ("classes", "emb_shape", "total", "use_fp16")
# What the image codecs print about a bad file, besides the error that names it (libjpeg writes some of these to the
# process's stderr directly; TensorFlow logs others).
CODEC_NOISE = re.compile(
    r"(Corrupt JPEG data|Premature end of JPEG|Improper call to JPEG library|Not a JPEG file|Invalid JPEG file "
    r"structure|Bogus (marker|Huffman)|Unsupported marker|libpng (warning|error)"
    r"|[EW]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ (jpeg_mem|png_io|decode_image_op)\.cc:\d+\])"
)


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
    """Load a pickle from ``file_obj`` allowing only data types (a ``.bin`` may come from anywhere).
    Python-2 pickles load their strings as bytes."""
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
# Image lists: class folders, image-list npz files and their cache.
# ---------------------------------------------------------------------------------------------------------
def hash_strings(strings):
    """Stable hex digest of a list of strings."""
    digest = hashlib.sha1()
    for item in strings:
        digest.update(item.encode("utf-8", "surrogateescape"))
        digest.update(b"\0")
    return digest.hexdigest()


def _class_sort_key(names):
    """Numeric class names sort numerically, anything else lexicographically."""
    if all(name.isdigit() for name in names):
        return lambda name: int(name)
    return lambda name: name


def folder_fingerprint(data_path):
    """A cheap signature of a class folder: class dir names and mtimes change whenever images are added/removed."""
    entries = sorted((entry.name, entry.stat().st_mtime_ns) for entry in os.scandir(data_path) if entry.is_dir())
    return hash_strings([f"{name}:{mtime}" for name, mtime in entries])


def scan_class_folder(data_path, what="training data folder"):
    """Index ``root/<class>/<image>`` into ``(image_names, image_classes, class_names)``; empty classes skipped.
    ``what`` names the folder in the error when it does not exist."""
    if not os.path.isdir(data_path):
        raise FileNotFoundError(f"{what} not found: {data_path}")
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


def read_image_list(path):
    """An image-list npz as a dict of ``image_names``, ``image_classes`` and, if present, ``embeddings``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image list not found: {path}")
    with np.load(path, allow_pickle=False) as content:
        if "image_names" not in content or "image_classes" not in content:
            raise ValueError(f"{path}: an image-list npz needs 'image_names' and 'image_classes'")
        return {key: content[key] for key in ("image_names", "image_classes", "embeddings") if key in content}


def read_npz_cache(cache_file, fingerprint, fields, need_verified=False):
    """The arrays ``fields`` of ``cache_file`` if it was written for this ``fingerprint`` of its source (and marked
    verified, when that is asked for), else None."""
    if not os.path.isfile(cache_file):
        return None
    with np.load(cache_file, allow_pickle=False) as content:
        if str(content.get("fingerprint", "")) != fingerprint or bool(content.get("verified", False)) < need_verified:
            return None
        return {field: content[field] for field in fields}


def write_npz_cache(cache_file, arrays, fingerprint, verified=False):
    """Write ``arrays`` with the ``fingerprint`` of their source, atomically; a cache that cannot be written (a
    read-only location) is a warning, never a stop."""
    try:
        with atomic_write(cache_file) as tmp_path:
            np.savez(tmp_path, **arrays, fingerprint=fingerprint, verified=verified)
    except OSError as err:
        logging.warning("could not write the cache %s: %s", cache_file, err)


def list_images(data_path, cache_dir=None, verifier=None):
    """Image list of ``data_path`` (class folder or image-list npz): a dict with ``image_names``, ``image_classes``
    and, for distillation data, ``embeddings``.

    A folder's list is cached as ``<cache_dir>/<folder name>_shuffle.npz`` and rebuilt when the folder changes.
    ``verifier(image_names) -> names of unreadable files``, when given, runs once per folder state (its result is
    cached) and the files it names are dropped with a warning.
    """
    data_path = os.fspath(data_path)
    if data_path.endswith(".npz"):
        return read_image_list(data_path)
    if not os.path.isdir(data_path):
        raise FileNotFoundError(f"training data folder not found: {data_path}")
    fingerprint = folder_fingerprint(data_path)
    cache_file = os.path.join(cache_dir or DEFAULT_CACHE_DIR, os.path.basename(os.path.normpath(data_path)))
    cache_file += "_shuffle.npz"
    cached = read_npz_cache(cache_file, fingerprint, ("image_names", "image_classes"), verifier is not None)
    if cached is not None:
        return cached
    image_names, image_classes, _ = scan_class_folder(data_path)
    if verifier is not None:
        unreadable = set(verifier(image_names))
        if unreadable:
            logging.warning("dropping %d unreadable images: %s", len(unreadable), ", ".join(sorted(unreadable)[:20]))
            keep = np.array([name not in unreadable for name in image_names])
            image_names, image_classes = image_names[keep], image_classes[keep]
    listing = {"image_names": image_names, "image_classes": image_classes}
    write_npz_cache(cache_file, listing, fingerprint, verified=verifier is not None)
    return listing


# ---------------------------------------------------------------------------------------------------------
# Distillation data: image names, classes and teacher embeddings, as an npz or a TFRecord.
# ---------------------------------------------------------------------------------------------------------
def load_distill_npz(path):
    """``(image_names, image_classes, embeddings)`` of a distillation npz (no pickle allowed)."""
    with np.load(path, allow_pickle=False) as content:
        missing = [key for key in ("image_names", "image_classes", "embeddings") if key not in content]
        if missing:
            raise ValueError(
                f"{path}: a distillation npz needs image_names, image_classes, embeddings; missing {missing}"
            )
        return content["image_names"], content["image_classes"].astype(np.int64), content["embeddings"]


def save_distill_npz(dest_file, image_names, image_classes, embeddings):
    """Write a distillation npz atomically; return its path."""
    with atomic_write(dest_file) as tmp_path:
        np.savez(
            tmp_path,
            image_names=np.asarray(image_names, dtype=str),
            image_classes=np.asarray(image_classes, dtype=np.int64),
            embeddings=embeddings,
        )
    return dest_file


def _example(features):
    """A serialized ``tf.train.Example`` of ``{key: int | bytes}``."""
    import tensorflow as tf

    def feature(value):
        if isinstance(value, bytes):
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))

    proto = tf.train.Example(features=tf.train.Features(feature={key: feature(vv) for key, vv in features.items()}))
    return proto.SerializeToString()


def write_distill_tfrecord(dest_file, image_names, image_classes, embeddings, classes=None):
    """Write a distillation TFRecord atomically; return its path.

    The first record is a header (``classes``, ``emb_shape``, ``total``, ``use_fp16``), then one record per image:
    ``image_names`` (bytes), ``image_classes`` (int64), ``embeddings`` (raw little-endian float16/float32 bytes).
    """
    import tensorflow as tf

    embeddings = np.asarray(embeddings)
    if embeddings.dtype not in (np.float16, np.float32) or embeddings.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D float16/float32 array, got {embeddings.dtype} {embeddings.shape}")
    if not len(image_names) == len(image_classes) == len(embeddings):
        raise ValueError(f"{len(image_names)} names, {len(image_classes)} classes and {len(embeddings)} embeddings")
    classes = int(np.max(image_classes)) + 1 if classes is None else int(classes)
    header = {"classes": classes, "emb_shape": embeddings.shape[1], "total": len(image_names)}
    header["use_fp16"] = int(embeddings.dtype == np.float16)
    little_endian = embeddings.astype(embeddings.dtype.newbyteorder("<"), copy=False)
    with atomic_write(dest_file) as tmp_path, tf.io.TFRecordWriter(tmp_path) as writer:
        writer.write(_example(header))
        for name, label, emb in zip(image_names, image_classes, little_endian):
            name = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else bytes(name)
            writer.write(_example({"image_names": name, "image_classes": label, "embeddings": emb.tobytes()}))
    return dest_file


def _read_distill_header(path):
    import tensorflow as tf

    header_spec = {key: tf.io.FixedLenFeature([], tf.int64) for key in DISTILL_HEADER_KEYS}
    try:
        first = next(iter(tf.data.TFRecordDataset(path).take(1)))
        header = tf.io.parse_single_example(first, header_spec)
    except (StopIteration, tf.errors.OpError) as err:
        raise ValueError(f"{path}: not a distillation TFRecord, no header record with {DISTILL_HEADER_KEYS}") from err
    header = {key: int(value) for key, value in header.items()}
    header["use_fp16"] = bool(header["use_fp16"])
    return header


def read_distill_tfrecord(path):
    """Open a distillation TFRecord: ``(dataset, header)``.

    ``dataset`` yields ``(image_name tf.string, image_class tf.int64, embedding float32 (emb_shape,))`` per
    image, in file order; ``header`` is ``{"classes", "emb_shape", "total": int, "use_fp16": bool}``.
    """
    import tensorflow as tf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"distillation TFRecord not found: {path}")
    header = _read_distill_header(path)
    emb_dtype, emb_shape = (tf.float16 if header["use_fp16"] else tf.float32), header["emb_shape"]
    record_spec = {
        "image_names": tf.io.FixedLenFeature([], tf.string),
        "image_classes": tf.io.FixedLenFeature([], tf.int64),
        "embeddings": tf.io.FixedLenFeature([], tf.string),
    }

    def parse(record):
        example = tf.io.parse_single_example(record, record_spec)
        embedding = tf.io.decode_raw(example["embeddings"], emb_dtype, little_endian=True)
        return example["image_names"], example["image_classes"], tf.reshape(tf.cast(embedding, tf.float32), [emb_shape])

    dataset = tf.data.TFRecordDataset(path).skip(1).map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset, header


def npz_to_tfrecord(npz_path, dest_file=None):
    """Convert a distillation npz to the TFRecord format (default ``<npz stem>.tfrecord`` next to it)."""
    dest_file = dest_file or os.path.splitext(npz_path)[0] + ".tfrecord"
    return write_distill_tfrecord(dest_file, *load_distill_npz(npz_path))

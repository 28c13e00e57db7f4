#!/usr/bin/env python3
"""Knowledge-distillation data: embed every training image with a teacher model and save the embeddings.

Output (SPEC §2): an npz with ``image_names``, ``image_classes``, ``embeddings`` (float16 or float32), or a
TFRecord whose first record is a header (``classes``, ``emb_shape``, ``total``, ``use_fp16``) followed by one
record per image (``image_names`` bytes, ``image_classes`` int64, ``embeddings`` raw little-endian bytes).
Embeddings are L2-normalized. Work is done in chunks saved atomically under ``<dest>.parts/`` so an interrupted
run resumes where it stopped; the final file is written atomically and the parts are removed.
"""

import argparse
import json
import os
import shutil
import sys

import numpy as np

from utils import atomic_write, load_json, save_json

HEADER_KEYS = ("classes", "emb_shape", "total", "use_fp16")
SHUFFLE_SEED = 0  # the image order is shuffled once (deterministically, so resuming sees the same order)


# ---------------------------------------------------------------------------------------------------------
# Teachers: Keras model (object or file) or ONNX file, as a function of a float32 0..255 NHWC batch.
# ---------------------------------------------------------------------------------------------------------
class Teacher:
    """A callable ``teacher(images_0_255) -> embeddings`` plus its input size ``img_shape`` (H, W)."""

    def __init__(self, infer, img_shape):
        self.infer, self.img_shape = infer, tuple(img_shape)

    def __call__(self, images):
        return np.asarray(self.infer(np.asarray(images, dtype=np.float32)), dtype=np.float32)


def _spatial_size(shape, default=(112, 112)):
    return tuple(int(ii) if isinstance(ii, int | np.integer) and ii > 0 else dd for ii, dd in zip(shape, default))


def _keras_teacher(model, scale):
    import tensorflow as tf

    import data

    img_shape = _spatial_size(model.inputs[0].shape[1:3])

    # A traced graph: calling a functional model eagerly dispatches every layer from Python (several times slower).
    @tf.function(input_signature=[tf.TensorSpec([None, *img_shape, 3], tf.float32)])
    def embed(images):
        outputs = model(data.normalize_image(images, scale), training=False)
        return outputs[0] if isinstance(outputs, list | tuple) else outputs

    return Teacher(lambda images: embed(images).numpy(), img_shape)


def _onnx_teacher(path, scale):
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(f"{path}: an ONNX teacher needs onnxruntime (pip install onnxruntime)") from err
    import data

    session = onnxruntime.InferenceSession(path, providers=onnxruntime.get_available_providers())
    model_input = session.get_inputs()[0]
    channels_first = model_input.shape[1] == 3
    img_shape = _spatial_size(model_input.shape[2:4] if channels_first else model_input.shape[1:3])

    def infer(images):
        images = data.normalize_image(images, scale).astype(np.float32)
        images = images.transpose(0, 3, 1, 2) if channels_first else images
        return session.run(None, {model_input.name: images})[0]

    return Teacher(infer, img_shape)


def load_keras_model(path, safe_mode=True):
    """Load a Keras model file for inference after registering this project's custom layers and losses."""
    import importlib
    import importlib.util

    import keras

    for module in ("losses", "models"):  # importing them registers their serializable classes
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
    return keras.saving.load_model(path, compile=False, safe_mode=safe_mode)


def load_teacher(model, scale=None, safe_mode=True):
    """A :class:`Teacher` from a Keras model object, a Keras model file (``safe_mode`` by default) or an ONNX file.

    Images are normalized with ``(x - 127.5) * scale`` (default ``data.SEEDS_SCALE``, the training convention).
    """
    import data

    scale = data.SEEDS_SCALE if scale is None else scale
    if isinstance(model, Teacher):
        return model
    if not isinstance(model, str | os.PathLike):
        return _keras_teacher(model, scale)
    model = os.fspath(model)
    if not os.path.isfile(model):
        raise FileNotFoundError(f"teacher model file not found: {model}")
    if model.endswith(".onnx"):
        return _onnx_teacher(model, scale)
    return _keras_teacher(load_keras_model(model, safe_mode=safe_mode), scale)


# ---------------------------------------------------------------------------------------------------------
# TFRecord format.
# ---------------------------------------------------------------------------------------------------------
def _int64_feature(value):
    import tensorflow as tf

    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def _bytes_feature(value):
    import tensorflow as tf

    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def write_distill_tfrecord(dest_file, image_names, image_classes, embeddings, classes=None):
    """Write a distillation TFRecord (header record, then one record per image) atomically; return its path."""
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
        features = {key: _int64_feature(value) for key, value in header.items()}
        writer.write(tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString())
        for name, label, emb in zip(image_names, image_classes, little_endian):
            name = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else bytes(name)
            features = {
                "image_names": _bytes_feature(name),
                "image_classes": _int64_feature(label),
                "embeddings": _bytes_feature(emb.tobytes()),
            }
            writer.write(tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString())
    return dest_file


def read_distill_tfrecord(path):
    """Open a distillation TFRecord: ``(dataset, header)``.

    ``dataset`` yields ``(image_name tf.string, image_class tf.int64, embedding float32 (emb_shape,))`` per
    image, in file order; ``header`` is ``{"classes", "emb_shape", "total": int, "use_fp16": bool}``.
    """
    import tensorflow as tf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"distillation TFRecord not found: {path}")
    header_spec = {key: tf.io.FixedLenFeature([], tf.int64) for key in HEADER_KEYS}
    try:
        first = next(iter(tf.data.TFRecordDataset(path).take(1)))
        header = tf.io.parse_single_example(first, header_spec)
    except (StopIteration, tf.errors.OpError) as err:
        raise ValueError(f"{path}: not a distillation TFRecord, no header record with {HEADER_KEYS}") from err
    header = {key: int(value) for key, value in header.items()}
    header["use_fp16"] = bool(header["use_fp16"])
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


def load_distill_npz(path):
    """``(image_names, image_classes, embeddings)`` of a distillation npz (no pickle allowed)."""
    with np.load(path, allow_pickle=False) as content:
        missing = [key for key in ("image_names", "image_classes", "embeddings") if key not in content]
        if missing:
            raise ValueError(
                f"{path}: a distillation npz needs image_names, image_classes, embeddings; missing {missing}"
            )
        return content["image_names"], content["image_classes"].astype(np.int64), content["embeddings"]


def npz_to_tfrecord(npz_path, dest_file=None):
    """Convert a distillation npz to the TFRecord format (default ``<npz stem>.tfrecord`` next to it)."""
    dest_file = dest_file or os.path.splitext(npz_path)[0] + ".tfrecord"
    return write_distill_tfrecord(dest_file, *load_distill_npz(npz_path))


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


# ---------------------------------------------------------------------------------------------------------
# Embedding extraction, chunked and resumable.
# ---------------------------------------------------------------------------------------------------------
def embed_images(teacher, image_names, batch_size):
    """L2-normalized teacher embeddings of ``image_names`` (decoded and resized with ``data.decode_image``)."""
    import tensorflow as tf

    import data

    ds = tf.data.Dataset.from_tensor_slices(image_names).map(
        lambda name: data.decode_image(name, teacher.img_shape), num_parallel_calls=tf.data.AUTOTUNE
    )
    embeddings = [teacher(images.numpy()) for images in ds.batch(batch_size)]
    embeddings = np.concatenate(embeddings, axis=0)
    return embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)


def _default_dest(data_path, emb_dim, use_fp16, save_npz):
    stem = os.path.splitext(os.path.basename(os.path.normpath(data_path)))[0]
    return (
        f"{stem}_shuffle_label_embs_normed_{emb_dim}{'_fp16' if use_fp16 else ''}.{'npz' if save_npz else 'tfrecord'}"
    )


def _prepare_parts_dir(parts_dir, signature):
    """Reuse ``parts_dir`` if it belongs to the same job (``signature``), else start it afresh."""
    meta_path = os.path.join(parts_dir, "job.json")
    if load_json(meta_path) != signature:
        shutil.rmtree(parts_dir, ignore_errors=True)
        os.makedirs(parts_dir)
        save_json(meta_path, signature)


def data_distiller(
    data_path,
    model_file,
    dest_file=None,
    batch_size=256,
    limit=-1,
    use_fp16=False,
    save_npz=False,
    scale=None,
    chunk_size=None,
):
    """Embed the images of ``data_path`` (class folder or image-list npz) with the teacher ``model_file``.

    ``model_file``: Keras model (object or file, loaded with ``safe_mode``) or ONNX file. With ``model_file=None``
    and an npz ``data_path`` holding embeddings, the npz is converted to TFRecord instead. ``limit > 0`` keeps
    the first ``limit`` images (after the fixed shuffle). Returns the output path.
    """
    import data

    data_path = os.fspath(data_path)
    if model_file is None:
        if not data_path.endswith(".npz"):
            raise ValueError("a teacher model (-M) is needed unless data_path is a distillation npz to convert")
        return npz_to_tfrecord(data_path, dest_file)
    content = data.pre_process_folder(data_path)
    image_names, image_classes = (
        np.asarray(content["image_names"]),
        np.asarray(content["image_classes"], dtype=np.int64),
    )
    classes = int(image_classes.max()) + 1
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(image_names))
    image_names, image_classes = image_names[order], image_classes[order]
    if limit > 0:
        image_names, image_classes = image_names[:limit], image_classes[:limit]

    teacher = load_teacher(model_file, scale)
    emb_dim = teacher(np.zeros([1, *teacher.img_shape, 3], np.float32)).shape[-1]
    dest_file = dest_file or _default_dest(data_path, emb_dim, use_fp16, save_npz)
    emb_dtype = np.float16 if use_fp16 else np.float32
    chunk_size = chunk_size or batch_size * 16
    parts_dir = dest_file + ".parts"
    signature = {
        "data_path": os.path.abspath(data_path),
        "total": len(image_names),
        "chunk_size": chunk_size,
        "use_fp16": use_fp16,
        "emb_dim": int(emb_dim),
        "names_hash": data.hash_strings([str(name) for name in image_names]),
    }
    _prepare_parts_dir(parts_dir, signature)

    from tqdm import tqdm

    starts = range(0, len(image_names), chunk_size)
    for part, start in enumerate(tqdm(starts, desc="Embedding chunks")):
        part_path = os.path.join(parts_dir, f"part_{part:06d}.npy")
        if not os.path.exists(part_path):
            embeddings = embed_images(teacher, image_names[start : start + chunk_size], batch_size).astype(emb_dtype)
            with atomic_write(part_path) as tmp_path:
                np.save(tmp_path, embeddings)
    embeddings = np.concatenate(
        [np.load(os.path.join(parts_dir, f"part_{part:06d}.npy")) for part in range(len(starts))]
    )
    if save_npz:
        save_distill_npz(dest_file, image_names, image_classes, embeddings)
    else:
        write_distill_tfrecord(dest_file, image_names, image_classes, embeddings, classes=classes)
    shutil.rmtree(parts_dir, ignore_errors=True)
    print(
        ">>>> Output:",
        dest_file,
        json.dumps({"total": len(image_names), "classes": classes, "emb_shape": int(emb_dim)}),
    )
    return dest_file


def parse_arguments(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "-D",
        "--data_path",
        required=True,
        help="Class folder / image-list npz, or a distillation npz to convert to tfrecord",
    )
    parser.add_argument(
        "-M",
        "--model_file",
        default=None,
        help="Teacher: Keras model file (.keras/.h5) or ONNX (.onnx, needs onnxruntime)",
    )
    parser.add_argument(
        "-d",
        "--dest_file",
        default=None,
        help="Output file (default <data>_shuffle_label_embs_normed_<emb>[_fp16].tfrecord|npz)",
    )
    parser.add_argument("-b", "--batch_size", type=int, default=256, help="Batch size")
    parser.add_argument("-L", "--limit", type=int, default=-1, help="Test parameter, process only the first NUM images")
    parser.add_argument("--use_fp16", action="store_true", help="Save embeddings as float16 (half the disk space)")
    parser.add_argument("--save_npz", action="store_true", help="Save as npz instead of tfrecord")
    parser.add_argument(
        "--scale",
        type=float,
        default=None,
        help="Input scale: (x - 127.5) * scale (default 0.0078125; insightface ONNX: 1/127.5)",
    )
    parser.add_argument(
        "--unsafe", action="store_true", help="Load a Keras model with safe_mode=False (only for files you trust)"
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_arguments(sys.argv[1:] if argv is None else argv)
    model = args.model_file
    if model is not None and args.unsafe and not model.endswith(".onnx"):
        model = load_keras_model(model, safe_mode=False)
    data_distiller(
        args.data_path, model, args.dest_file, args.batch_size, args.limit, args.use_fp16, args.save_npz, args.scale
    )


if __name__ == "__main__":
    main()

"""Knowledge-distillation data: embed every training image with a teacher model and save the embeddings.

Output: an npz with ``image_names``, ``image_classes``, ``embeddings`` (float16 or float32), or a
TFRecord whose first record is a header (``classes``, ``emb_shape``, ``total``, ``use_fp16``) followed by one
record per image (``image_names`` bytes, ``image_classes`` int64, ``embeddings`` raw little-endian bytes).
Embeddings are L2-normalized. Work is done in chunks saved atomically under ``<dest>.parts/`` so an interrupted
run resumes where it stopped; the final file is written atomically and the parts are removed.
"""

import json
import os
import shutil

import numpy as np

from keras_insightface.data.formats import (  # noqa: F401 (the format functions keep their names in this module too)
    DISTILL_HEADER_KEYS,
    SEEDS_SCALE,
    hash_strings,
    load_distill_npz,
    npz_to_tfrecord,
    read_distill_tfrecord,
    save_distill_npz,
    write_distill_tfrecord,
)
from keras_insightface.evaluation.embedder import embed_image_files, load_embedder
from keras_insightface.utils import atomic_write, load_json, save_json

SHUFFLE_SEED = 0  # the image order is shuffled once (deterministically, so resuming sees the same order)


def load_teacher(model, safe_mode=True):
    """The teacher as an ``embedder.Embedder``: a Keras model object, a Keras model file (``safe_mode`` by default)
    or an ONNX file."""
    if isinstance(model, str | os.PathLike) and not os.path.isfile(model):
        raise FileNotFoundError(f"teacher model file not found: {model}")
    return load_embedder(model, safe_mode=safe_mode)


def embed_images(teacher, image_names, batch_size, scale=SEEDS_SCALE):
    """L2-normalized teacher embeddings of image files (one chunk of the job)."""
    return embed_image_files(teacher, image_names, batch_size, scale)


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


def _shuffled_listing(data_path, limit):
    """Image names and labels of ``data_path`` in a fixed shuffled order (the first ``limit`` when ``limit > 0``)."""
    from keras_insightface.data import pipeline as data

    content = data.pre_process_folder(data_path)
    image_names = np.asarray(content["image_names"])
    image_classes = np.asarray(content["image_classes"], dtype=np.int64)
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(image_names))
    if limit > 0:
        order = order[:limit]
    return image_names[order], image_classes[order]


def _embed_in_parts(teacher, image_names, parts_dir, chunk_size, batch_size, scale, emb_dtype):
    """Embed ``image_names`` chunk by chunk into ``parts_dir/part_<n>.npy`` (chunks already there are skipped, so an
    interrupted job resumes); returns all embeddings."""
    from tqdm import tqdm

    starts = range(0, len(image_names), chunk_size)
    part_paths = [os.path.join(parts_dir, f"part_{part:06d}.npy") for part in range(len(starts))]
    for start, part_path in zip(tqdm(starts, desc="Embedding chunks"), part_paths):
        if not os.path.exists(part_path):
            names = image_names[start : start + chunk_size]
            embeddings = embed_images(teacher, names, batch_size, scale=scale).astype(emb_dtype)
            with atomic_write(part_path) as tmp_path:
                np.save(tmp_path, embeddings)
    return np.concatenate([np.load(part_path) for part_path in part_paths])


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
    data_path = os.fspath(data_path)
    if model_file is None:
        if not data_path.endswith(".npz"):
            raise ValueError("a teacher model (-M) is needed unless data_path is a distillation npz to convert")
        return npz_to_tfrecord(data_path, dest_file)
    image_names, image_classes = _shuffled_listing(data_path, limit)
    classes = int(image_classes.max()) + 1
    teacher, scale = load_teacher(model_file), SEEDS_SCALE if scale is None else scale
    emb_dim = int(teacher(np.zeros([1, *(teacher.image_size or (112, 112)), 3], np.float32)).shape[-1])
    dest_file = dest_file or _default_dest(data_path, emb_dim, use_fp16, save_npz)
    chunk_size = chunk_size or batch_size * 16
    names_hash = hash_strings([str(name) for name in image_names])
    signature = {"data_path": os.path.abspath(data_path), "total": len(image_names), "chunk_size": chunk_size}
    signature.update({"use_fp16": use_fp16, "emb_dim": emb_dim, "names_hash": names_hash})
    parts_dir = dest_file + ".parts"
    _prepare_parts_dir(parts_dir, signature)
    emb_dtype = np.float16 if use_fp16 else np.float32
    embeddings = _embed_in_parts(teacher, image_names, parts_dir, chunk_size, batch_size, scale, emb_dtype)
    if save_npz:
        save_distill_npz(dest_file, image_names, image_classes, embeddings)
    else:
        write_distill_tfrecord(dest_file, image_names, image_classes, embeddings, classes=classes)
    shutil.rmtree(parts_dir, ignore_errors=True)
    print(">>>> Output:", dest_file, json.dumps({"total": len(image_names), "classes": classes, "emb_shape": emb_dim}))
    return dest_file

"""Sub-center ArcFace dataset cleaning: drop images far from their class's dominant sub-center.

After training with ``lossTopK=K`` the head ``losses.NormDense`` holds K sub-centers per class (kernel columns
class-major: column ``c * K + k`` is sub-center ``k`` of class ``c``). Each image votes for the sub-center of its
class nearest to its embedding; the most voted one is the class's dominant sub-center, and images whose angle
to it exceeds ``deg_thresh`` degrees are dropped (Deng et al. 2020, "Sub-center ArcFace"). The result is an
image-list npz (``image_names``, ``image_classes``) that ``Train.reset_dataset`` accepts.
"""

import os

import numpy as np

from keras_insightface.utils import atomic_write


def find_norm_dense(model):
    """The model's ``NormDense`` (or ``PartialFCNormDense``) head, the last one if several."""
    from keras_insightface.nn import heads as head_layers

    heads = [layer for layer in model.layers if isinstance(layer, head_layers.NormDense)]
    if not heads:
        raise ValueError(
            f"model {model.name!r} has no NormDense layer: pass the full training model, not the basic model"
        )
    return heads[-1]


def sub_center_cosines(embeddings, labels, centers, top_k):
    """``(N, K)`` cosines between each L2-normalized embedding and the K sub-centers of its own class.

    ``centers`` are the head's ``class_centers()``: ``(classes * K, emb)``, row ``c * K + k`` = sub-center k of c.
    """
    centers = centers / np.maximum(np.linalg.norm(centers, axis=1, keepdims=True), 1e-12)
    centers = centers.reshape(-1, top_k, centers.shape[1])  # (classes, K, emb)
    return np.einsum("ne,nke->nk", embeddings, centers[labels])


def select_kept(cosines, labels, deg_thresh):
    """Boolean mask of images within ``deg_thresh`` degrees of their class's dominant (most voted) sub-center."""
    cos_thresh = np.cos(np.deg2rad(deg_thresh))
    top_k = cosines.shape[1]
    votes = np.zeros((labels.max() + 1, top_k), np.int64)
    np.add.at(votes, (labels, np.argmax(cosines, axis=1)), 1)
    dominant = np.argmax(votes, axis=1)  # ties go to the lower sub-center index
    return cosines[np.arange(len(labels)), dominant[labels]] > cos_thresh


def _default_dest(data_path, top_k, deg_thresh):
    stem = os.path.splitext(os.path.basename(os.path.normpath(data_path)))[0]
    return f"{stem}_topK{top_k}_deg{deg_thresh}.npz"


def _sorted_listing(data_path, limit, num_classes):
    """Image names and labels of ``data_path`` sorted by label (the first ``limit`` classes when ``limit > 0``)."""
    from keras_insightface.data import pipeline as data

    content = data.pre_process_folder(os.fspath(data_path))
    image_names = np.asarray(content["image_names"])
    image_classes = np.asarray(content["image_classes"], dtype=np.int64)
    if image_classes.max() >= num_classes:
        raise ValueError(f"data has {image_classes.max() + 1} classes but the model's head has {num_classes}")
    order = np.argsort(image_classes, kind="stable")
    if limit > 0:
        order = order[image_classes[order] < limit]
    return image_names[order], image_classes[order]


def _own_center_cosines(embedder, image_names, image_classes, centers, top_k, batch_size):
    """``(N, K)`` cosines of every image to the sub-centers of its class, embedded chunk by chunk."""
    from tqdm import tqdm

    from keras_insightface.evaluation.embedder import embed_image_files

    chunk = batch_size * 16
    parts = [
        sub_center_cosines(
            embed_image_files(embedder, image_names[start : start + chunk], batch_size),
            image_classes[start : start + chunk],
            centers,
            top_k,
        )
        for start in tqdm(range(0, len(image_names), chunk), desc="Embedding")
    ]
    return np.concatenate(parts)


def data_drop_top_k(model, data_path, dest_file=None, deg_thresh=75, limit=0, batch_size=128):
    """Clean ``data_path`` (class folder or image-list npz) with the sub-center training ``model`` (object or file).

    ``limit > 0`` processes only the first ``limit`` classes (testing). Classes left without images are removed
    and the remaining labels renumbered 0..n-1. Writes the npz atomically and returns its path.
    """
    import keras

    from keras_insightface.evaluation.embedder import load_embedder
    from keras_insightface.models import zoo as models

    if not 0 <= deg_thresh <= 180:
        raise ValueError(f"deg_thresh must be in [0, 180] degrees, got {deg_thresh}")
    model = models.load_model(model)
    head = find_norm_dense(model)
    centers, top_k = head.class_centers(), head.loss_top_k
    image_names, image_classes = _sorted_listing(data_path, limit, head.units)
    print(
        f">>>> [Before] emb = {centers.shape[1]}, classes = {image_classes.max() + 1}, top_k = {top_k}, images = {len(image_names)}"
    )
    embedder = load_embedder(keras.Model(model.inputs[0], head.input))
    cosines = _own_center_cosines(embedder, image_names, image_classes, centers, top_k, batch_size)
    keep = select_kept(cosines, image_classes, deg_thresh)
    kept_names, kept_classes = image_names[keep], image_classes[keep]
    _, new_classes = np.unique(kept_classes, return_inverse=True)  # renumber, skipping emptied classes
    dest_file = dest_file or _default_dest(data_path, top_k, deg_thresh)
    with atomic_write(dest_file) as tmp_path:
        np.savez(tmp_path, image_names=kept_names.astype(str), image_classes=new_classes.astype(np.int64))
    num_classes = new_classes.max() + 1 if len(new_classes) else 0
    print(f">>>> [After] classes = {num_classes}, images = {len(kept_names)}, dropped = {int((~keep).sum())}")
    return dest_file

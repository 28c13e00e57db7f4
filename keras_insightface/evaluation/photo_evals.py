"""Evaluate a model on your own data: a class folder of aligned faces (1:1 verification over its pairs, 1:N
identification with a gallery of each identity) and photos compared with each other (detected, aligned, embedded).
``python evals.py -m MODEL --folder DIR`` / ``--compare a.jpg b.jpg`` run these functions.
"""

import os
import warnings

import numpy as np
import tensorflow as tf

from keras_insightface.data import pipeline as data
from keras_insightface.data.formats import CODEC_NOISE
from keras_insightface.evaluation.metrics import (
    balanced_best_threshold,
    evaluation_1N,
    identification_table,
    l2_normalize,
    mean_over_galleries,
    roc_tar_at_far,
)
from keras_insightface.utils import atomic_write, filtered_stderr

# ---------------------------------------------------------------------------------------------------------
# Your own photos: evaluation on a folder of aligned faces, and photos compared with each other.
# ---------------------------------------------------------------------------------------------------------
RESULT_DIR = "eval_result"
FOLDER_FAR_TARGETS = (1e-1, 1e-2, 1e-3, 1e-4)
FOLDER_FPIR_TARGETS = (1e-1, 1e-2)
FOLDER_TOP_K = (1, 5)
MAX_PAIRS = 1_000_000  # genuine and impostor pairs each; more are sampled down to this


def _identity_groups(labels):
    """Image indices of each identity, identities in sorted order."""
    order = np.argsort(labels, kind="stable")
    _, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    return [order[start : start + count] for start, count in zip(starts, counts)]


def _genuine_pairs(labels):
    """Every ``(i, j)``, i < j, of two images of the same identity, as an (M, 2) array."""
    pairs = [np.empty((0, 2), np.int64)]
    for members in _identity_groups(labels):
        first, second = np.triu_indices(members.shape[0], k=1)
        pairs.append(np.stack([members[first], members[second]], axis=1))
    return np.sort(np.concatenate(pairs), axis=1)


def _impostor_pairs(labels, max_pairs, rng):
    """Every ``(i, j)``, i < j, of two identities, or ``max_pairs`` distinct ones drawn at random when more exist."""
    groups = _identity_groups(labels)
    order, ends = np.concatenate(groups), np.cumsum([members.shape[0] for members in groups])
    if int(np.sum(np.diff(np.r_[0, ends]) * (labels.shape[0] - ends))) <= max_pairs:
        pairs = [np.empty((0, 2), np.int64)]
        for members, end in zip(groups, ends):  # each identity with the identities after it
            pairs.append(np.stack(np.meshgrid(members, order[end:], indexing="ij"), axis=-1).reshape(-1, 2))
        return np.sort(np.concatenate(pairs), axis=1)
    found = np.empty((0, 2), np.int64)
    while found.shape[0] < max_pairs:
        drawn = rng.integers(labels.shape[0], size=(2 * max_pairs, 2))
        drawn = np.sort(drawn[labels[drawn[:, 0]] != labels[drawn[:, 1]]], axis=1)
        found = np.unique(np.concatenate([found, drawn]), axis=0)
    return found[np.sort(rng.choice(found.shape[0], max_pairs, replace=False))]


def folder_pairs(labels, max_pairs=MAX_PAIRS, seed=0):
    """Verification pairs of a folder: ``(first, second, issame)`` index arrays holding every genuine and every
    impostor pair, each kind sampled down at random to ``max_pairs`` when there are more."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    genuine = _genuine_pairs(labels)
    if genuine.shape[0] > max_pairs:
        genuine = genuine[np.sort(rng.choice(genuine.shape[0], max_pairs, replace=False))]
    pairs = np.concatenate([genuine, _impostor_pairs(labels, max_pairs, rng)])
    issame = np.arange(pairs.shape[0]) < genuine.shape[0]
    return pairs[:, 0], pairs[:, 1], issame


def pair_scores(embeddings, first, second, chunk=1 << 16):
    """Dot products ``embeddings[first] . embeddings[second]`` (cosines of normalized rows), in bounded memory."""
    scores = np.empty(len(first), np.float64)
    for start in range(0, len(first), chunk):
        end = start + chunk
        pairs = embeddings[first[start:end]].astype(np.float64), embeddings[second[start:end]]
        scores[start:end] = np.einsum("ij,ij->i", *pairs)
    return scores


def identification_split(labels, gallery_per_identity=1, seed=0):
    """The 1:N protocol of a folder: ``(gallery, half)``.

    ``gallery`` marks ``gallery_per_identity`` random images of each identity (all of them when it has no more),
    which form its gallery template; the other images are probes. ``half`` (0 or 1, per image) splits the
    identities at random in two: each half's gallery is searched in turn, so the other half's probes are the
    non-mated searches that TPIR at FPIR needs (as IJB's two galleries).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(labels.shape[0])
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]  # grouped by identity, random within
    classes, starts = np.unique(labels[order], return_index=True)
    rank = np.arange(order.shape[0]) - np.repeat(starts, np.diff(np.r_[starts, order.shape[0]]))
    gallery = np.zeros(labels.shape[0], bool)
    gallery[order[rank < gallery_per_identity]] = True
    class_half = (rng.permutation(classes.shape[0]) < classes.shape[0] // 2).astype(np.int64)
    return gallery, class_half[np.searchsorted(classes, labels)]


def folder_identification(embeddings, labels, gallery, half, fpir_targets=FOLDER_FPIR_TARGETS, top_k=FOLDER_TOP_K):
    """Open-set 1:N results of each half's gallery (templates = normalized mean of the gallery images) against
    every probe, and their mean: ``{"gallery_1": {...}, "gallery_2": {...}, "mean": {...}}``."""
    labels = np.asarray(labels)
    probes = ~gallery
    if not probes.any():
        raise ValueError("no probe images: every identity has only its gallery images, lower --gallery_size")
    results = {}
    for index in (0, 1):
        ids, members = np.unique(labels[gallery & (half == index)], return_inverse=True)
        templates = np.zeros((ids.shape[0], embeddings.shape[1]))
        np.add.at(templates, members, embeddings[gallery & (half == index)])
        results[f"gallery_{index + 1}"] = evaluation_1N(
            embeddings[probes], l2_normalize(templates), labels[probes], ids, fpir_targets, top_k
        )
    results["mean"] = mean_over_galleries([results["gallery_1"], results["gallery_2"]])
    return results


def folder_metrics(embeddings, labels, max_pairs=MAX_PAIRS, gallery_per_identity=1, seed=0):
    """1:1 verification and 1:N identification of L2-normalized ``embeddings`` of a labelled folder.

    Returns ``(results, roc, split)``: ``results`` is a JSON-ready dict with ``verification`` (pair counts, TAR at
    each FAR — None where there are fewer than 1 / FAR impostor pairs —, AUC, best-threshold balanced accuracy
    and its threshold) and ``identification`` (``folder_identification``); ``roc`` is ``(fpr, tpr, auc)``;
    ``split`` is ``identification_split``'s ``(gallery, half)``.
    """
    labels = np.asarray(labels)
    if np.unique(labels).shape[0] < 2:
        raise ValueError("a folder evaluation needs at least 2 identities")
    first, second, issame = folder_pairs(labels, max_pairs, seed)
    if not issame.any():
        raise ValueError("no genuine pairs: every identity has a single image")
    scores = pair_scores(embeddings, first, second)
    tars, roc_auc, fpr, tpr = roc_tar_at_far(issame, scores, FOLDER_FAR_TARGETS)
    accuracy, threshold = balanced_best_threshold(scores, issame)
    num_impostor = int((~issame).sum())
    verification = {"genuine_pairs": int(issame.sum()), "impostor_pairs": num_impostor}
    for far, tar in zip(FOLDER_FAR_TARGETS, tars):
        verification[f"tar@far={far:g}"] = tar if num_impostor * far >= 1 else None
    verification.update({"auc": roc_auc, "accuracy": accuracy, "threshold": threshold})
    gallery, half = identification_split(labels, gallery_per_identity, seed)
    identification = folder_identification(embeddings, labels, gallery, half)
    return {"verification": verification, "identification": identification}, (fpr, tpr, roc_auc), (gallery, half)


def _cell(value):
    return "n/a" if value is None else f"{value:.6f}"


def format_folder_table(results):
    """Markdown tables of ``folder_metrics`` results: one row of verification, one row per gallery for 1:N."""
    verification = results["verification"]
    keys = [key for key in verification if key not in ("genuine_pairs", "impostor_pairs")]
    lines = [
        f"1:1 verification ({verification['genuine_pairs']} genuine, {verification['impostor_pairs']} impostor pairs)",
        "| " + " | ".join(keys) + " |",
        "| --- " * len(keys) + "|",
        "| " + " | ".join(_cell(verification[key]) for key in keys) + " |",
        "",
        "1:N identification",
        identification_table(results["identification"]),
    ]
    return "\n".join(lines)


CROP_SIZE = (112, 112)  # what prepare_data.py --align writes by default
SIZE_CHECKS = 1000  # images whose size is read (spread over the folder); headers only


def warn_if_not_face_crops(folder, image_names, model_size=None):
    """Warn when images of ``folder`` are neither 112x112 nor the model's input size: raw photos evaluated as if they
    were aligned crops give meaningless scores without any error."""
    from PIL import Image

    picked = image_names[:: max(1, len(image_names) // SIZE_CHECKS)]
    expected = {CROP_SIZE, tuple(model_size or CROP_SIZE)}
    odd = []
    for name in picked:
        try:
            with Image.open(name) as image:
                size = image.height, image.width
        except OSError:  # unreadable: the embedding step names it
            continue
        if size not in expected:
            odd.append(f"{os.path.relpath(name, folder)} is {size[1]}x{size[0]}")
    if odd:
        sizes = " or ".join(f"{width}x{height}" for height, width in sorted(expected))
        warnings.warn(
            f"{len(odd)} of {len(picked)} images checked in {folder} are not {sizes} face crops (e.g. {odd[0]}): "
            "--folder expects aligned faces; align photos first with python prepare_data.py --align PHOTOS -o FACES",
            stacklevel=2,
        )


def _embed_folder(embedder, image_names, batch_size, flip, image_scale):
    """Embeddings of a folder's images; an undecodable image is named in a ValueError instead of a TF traceback."""
    from keras_insightface.evaluation.embedder import embed_image_files

    try:
        with filtered_stderr(CODEC_NOISE):  # the error below names the bad files
            return embed_image_files(embedder, image_names, batch_size, image_scale, flip=flip)
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as err:
        with filtered_stderr(CODEC_NOISE):
            bad = [str(image_names[index]) for index in data.undecodable_indices(list(image_names))]
        named = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "") if bad else "an image"
        raise ValueError(f"cannot decode {named} ({len(bad)} in all): remove or re-align them") from err


def _save_folder_results(base, results, roc, image_names, labels, embeddings, split):
    """``<base>_folder.json`` / ``.md``, ``<base>_roc.png`` and ``<base>_embeddings.npz`` (embeddings, labels and
    the gallery split, to recompute any metric); returns the paths."""
    from keras_insightface.evaluation.plot import plot_roc_curves
    from keras_insightface.utils import save_bytes, save_json

    fpr, tpr, roc_auc = roc
    paths = [base + "_folder.json", base + "_folder.md", base + "_roc.png", base + "_embeddings.npz"]
    save_json(paths[0], results, indent=2)
    save_bytes(paths[1], (format_folder_table(results) + "\n").encode())
    min_fpr = 1 / max(results["verification"]["impostor_pairs"], 1)
    curves = {os.path.basename(base): (fpr, tpr, roc_auc)}
    plot_roc_curves(curves, paths[2], f"ROC of {os.path.basename(base)}", xlim=(min_fpr, 1), ylim=(0, 1))
    with atomic_write(paths[3]) as tmp_path, open(tmp_path, "wb") as ff:
        np.savez(ff, embeddings=embeddings, labels=labels, image_names=image_names, gallery=split[0], half=split[1])
    return paths


def evaluate_folder(
    model,
    folder,
    batch_size=128,
    flip=True,
    image_scale=data.SEEDS_SCALE,
    max_pairs=MAX_PAIRS,
    gallery_per_identity=1,
    seed=0,
    result_dir=RESULT_DIR,
    name=None,
):
    """Evaluate a model (Keras object, ``.keras`` / ``.h5`` / ``.onnx`` file) on ``folder/<identity>/<aligned face>``.

    Prints and saves (``<result_dir>/<name>_<folder>_*``) the ``folder_metrics`` tables, a ROC plot and the
    embeddings. Returns the results dict, with the written ``files``.
    """
    from keras_insightface.evaluation.embedder import load_embedder

    image_names, labels, class_names = data.scan_class_folder(folder, what="folder of aligned faces")
    if len(class_names) < 2:
        raise ValueError(f"{folder}: a folder evaluation needs at least 2 identity folders")
    embedder = load_embedder(model)
    warn_if_not_face_crops(folder, image_names, embedder.image_size)
    embeddings = _embed_folder(embedder, image_names, batch_size, flip, image_scale)
    results, roc, split = folder_metrics(embeddings, labels, max_pairs, gallery_per_identity, seed)
    name = name or model_name(model)
    base = os.path.join(result_dir, f"{name}_{os.path.basename(os.path.normpath(folder))}")
    relative = np.array([os.path.relpath(path, folder) for path in image_names])
    results["files"] = _save_folder_results(base, results, roc, relative, labels, embeddings, split)
    print(format_folder_table(results))
    names = ", ".join(os.path.basename(path) for path in results["files"])
    print(f">>>> Saved in {os.path.abspath(result_dir)}: {names}")
    return results


def model_name(model):
    """A name for result files: the file stem of a model path, else the Keras model's name."""
    if isinstance(model, str | os.PathLike):
        return os.path.splitext(os.path.basename(os.fspath(model)))[0]
    return getattr(model, "name", "model")


# Photo comparison.
def _threshold_in_history(history, bin_name, path):
    """The ``<bin>_thresh`` of the epoch with the best ``<bin>`` accuracy (the epoch whose basic model was kept)."""
    keys = [key[: -len("_thresh")] for key in history if key.endswith("_thresh")]
    bin_name = bin_name or (keys[0] if len(keys) == 1 else None)
    if bin_name is None or f"{bin_name}_thresh" not in history:
        raise ValueError(f"{path}: name one of the evaluated bins {keys} as {path}:BIN")
    thresholds = history[f"{bin_name}_thresh"]
    best = int(np.nanargmax(np.asarray(history[bin_name], np.float64))) if bin_name in history else -1
    return float(thresholds[best])


def threshold_from_file(spec):
    """A verification threshold from a folder evaluation ``*_folder.json`` or a training ``*_hist.json``
    (``HIST.json:BIN`` picks the bin when several were evaluated)."""
    from keras_insightface.utils import load_json

    path, _, bin_name = spec.rpartition(":") if not os.path.exists(spec) and ":" in spec else (spec, "", "")
    content = load_json(path)
    if content is None:
        raise FileNotFoundError(f"threshold file not found: {path}")
    if "verification" in content:
        return float(content["verification"]["threshold"])
    return _threshold_in_history(content, bin_name or None, path)


def find_model_threshold(model_path, result_dir=RESULT_DIR):
    """``(threshold, where it comes from)`` recorded for a model file, or ``(None, None)``: its newest folder
    evaluation in ``result_dir``, else the training history next to a ``<stem>_basic_<bin>_epoch_<E>_<acc>.keras``
    file saved by the trainer (the threshold of the epoch with the best accuracy on that bin)."""
    import glob
    import re

    stem = model_name(model_path)
    evaluations = sorted(glob.glob(os.path.join(glob.escape(result_dir), glob.escape(stem) + "_*_folder.json")))
    if evaluations:
        newest = max(evaluations, key=os.path.getmtime)
        return threshold_from_file(newest), f"the folder evaluation {newest}"
    match = re.match(r"(?P<prefix>.+?)_basic_(?P<bin>.+?)_epoch_\d+", stem)
    history = match and os.path.join(os.path.dirname(os.fspath(model_path)), match["prefix"] + "_hist.json")
    if history and os.path.exists(history):
        source = f"the training history {history} (best {match['bin']} epoch)"
        return threshold_from_file(f"{history}:{match['bin']}"), source
    return None, None


def compare_photos(
    model,
    photos,
    threshold=None,
    detector=None,
    keep="largest",
    flip=True,
    image_scale=data.SEEDS_SCALE,
    save_path=None,
    threshold_source=None,
):
    """Detect, align and embed the face of each photo; return a dict with the cosine ``similarity`` matrix of the
    faces, with a ``threshold`` (from ``threshold_source``, a phrase for the printout) which pairs are the ``same``
    person (score > threshold), and the aligned ``crops``.

    ``keep`` picks the face of a photo with several (``"largest"`` or ``"central"``). ``save_path`` also saves a
    picture of the aligned crops with the scores. A photo without a face raises a ValueError naming it.
    """
    from keras_insightface.evaluation.embedder import embed_batch, load_embedder
    from keras_insightface.faces.detector import FaceDetector, align_faces, load_image, select_faces

    if keep not in ("largest", "central"):
        raise ValueError(f"keep must be largest or central, got {keep!r}")
    embedder = load_embedder(model)
    images = [load_image(photo) for photo in photos]
    detected = (detector or FaceDetector()).detect_batch(images)
    missing = [photo for photo, faces in zip(photos, detected) if not faces]
    if missing:
        raise ValueError(f"no face found in {', '.join(map(str, missing))}")
    size = embedder.image_size or (112, 112)
    chosen = [select_faces(faces, image.shape, keep) for image, faces in zip(images, detected)]
    crops = [align_faces(image, faces, size)[0] for image, faces in zip(images, chosen)]
    batch = data.normalize_image(np.stack(crops).astype(np.float32), image_scale)
    embeddings = l2_normalize(embed_batch(embedder, batch, flip))
    similarity = embeddings @ embeddings.T
    same = None if threshold is None else (similarity > threshold).tolist()
    result = {
        "photos": [str(p) for p in photos],
        "similarity": similarity.tolist(),
        "threshold": threshold,
        "threshold_source": threshold_source,
        "same": same,
        "crops": crops,
    }
    if save_path:
        from keras_insightface.evaluation.plot import plot_face_comparison

        names = [os.path.basename(str(photo)) for photo in photos]
        result["picture"] = plot_face_comparison(crops, names, similarity, threshold, save_path)
    return result


def format_comparison(result):
    """The cosine matrix of ``compare_photos`` as text, then one line per pair with the verdict."""
    names = [os.path.basename(photo) for photo in result["photos"]]
    width = max(10, *(len(name) for name in names))
    lines = [" " * width + "".join(f" {index:>8d}" for index in range(len(names)))]
    for index, (name, row) in enumerate(zip(names, result["similarity"])):
        lines.append(f"{name:>{width}}" + "".join(f" {value:8.4f}" for value in row) + f"   [{index}]")
    threshold = result["threshold"]
    for first in range(len(names)):
        for second in range(first + 1, len(names)):
            score = result["similarity"][first][second]
            verdict = "" if threshold is None else (" same" if score > threshold else " different")
            lines.append(f"{names[first]} vs {names[second]}: {score:.4f}{verdict}")
    source = f" (from {result['threshold_source']})" if result.get("threshold_source") else ""
    lines.append("no threshold: pass --threshold" if threshold is None else f"threshold {threshold:.4f}{source}")
    return "\n".join(lines)

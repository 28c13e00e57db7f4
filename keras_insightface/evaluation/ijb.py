"""IJB-B / IJB-C evaluation, as insightface's IJB scripts compute it: 1:1 verification TAR@FAR with AUC and 1:N identification.

Image embeddings come from a Keras model (``.keras`` / ``.h5``), an ONNX model (needs ``onnxruntime``) or
embeddings saved earlier with ``-E``. Scenario ``N{0,1}D{0,1}F{0,1}``: N L2-normalizes each image embedding,
D multiplies it by the detector score, F adds the flipped image's embedding. Templates average the images
of each media, sum the media and L2-normalize; 1:1 scores are dot products computed block-wise with a
bounded amount of memory. Results (scores, tables, ROC plot) go to ``IJB_result/``.
"""

import io
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # no TensorFlow C++ chatter (info and warnings) on the console

import numpy as np

from keras_insightface.data import pipeline as data
from keras_insightface.evaluation.embedder import load_embedder
from keras_insightface.evaluation.metrics import (  # noqa: F401
    FAR_TARGETS,
    evaluation_1N,
    identification_table,
    l2_normalize,
    mean_over_galleries,
    roc_curve,
    roc_tar_at_far,
)
from keras_insightface.evaluation.plot import plot_roc_curves
from keras_insightface.faces.alignment import ARCFACE_TEMPLATE, face_align_landmarks
from keras_insightface.utils import atomic_write, save_bytes

DEFAULT_SCENARIO = "N0D1F1"
RESULT_DIR = "IJB_result"
_GALLERIES = {"IJBB": ("S1", "S2"), "IJBC": ("G1", "G2")}


# ---------------------------------------------------------------------------------------------------------
# Meta files.
# ---------------------------------------------------------------------------------------------------------
def meta_paths(data_path, subset):
    """Paths of the meta files and the image folder of ``<data_path>/<subset>`` (subset IJBB or IJBC)."""
    subset = subset.upper()
    if subset not in _GALLERIES:
        raise ValueError(f"unknown IJB subset {subset!r}: expected IJBB or IJBC")
    root = os.path.join(data_path, subset)
    meta, prefix = os.path.join(root, "meta"), subset.lower()
    gallery_1, gallery_2 = _GALLERIES[subset]
    return {
        "tid_mid": os.path.join(meta, f"{prefix}_face_tid_mid.txt"),
        "pair_label": os.path.join(meta, f"{prefix}_template_pair_label.txt"),
        "landmarks": os.path.join(meta, f"{prefix}_name_5pts_score.txt"),
        "gallery_1": os.path.join(meta, f"{prefix}_1N_gallery_{gallery_1}.csv"),
        "gallery_2": os.path.join(meta, f"{prefix}_1N_gallery_{gallery_2}.csv"),
        "probe": os.path.join(meta, f"{prefix}_1N_probe_mixed.csv"),
        "images": os.path.join(root, "loose_crop"),
    }


def read_meta_table(path, num_columns, sep=" ", skiprows=0):
    """Read a whitespace / comma separated meta file as a pandas DataFrame with a clear error when malformed."""
    import pandas as pd

    if not os.path.isfile(path):
        raise FileNotFoundError(f"IJB meta file not found: {path}")
    table = pd.read_csv(path, sep=sep, skiprows=skiprows, header=None)
    if table.shape[1] < num_columns:
        raise ValueError(f"{path}: expected at least {num_columns} columns, found {table.shape[1]}")
    return table


def load_ijb_meta(data_path, subset, check_images=True):
    """All 1:1 meta of a subset as a dict of arrays; missing images raise a ValueError naming a few of them."""
    paths = meta_paths(data_path, subset)
    tid_mid = read_meta_table(paths["tid_mid"], 3)
    pairs = read_meta_table(paths["pair_label"], 3)
    marks = read_meta_table(paths["landmarks"], 12)
    image_names = marks[0].astype(str).to_numpy()
    if tid_mid.shape[0] != marks.shape[0] or not np.array_equal(tid_mid[0].astype(str).to_numpy(), image_names):
        raise ValueError(f"{paths['tid_mid']} and {paths['landmarks']} do not list the same images in the same order")
    meta = {
        "image_dir": paths["images"],
        "image_names": image_names,
        "templates": tid_mid[1].to_numpy(np.int64),
        "medias": tid_mid[2].to_numpy(np.int64),
        "p1": pairs[0].to_numpy(np.int64),
        "p2": pairs[1].to_numpy(np.int64),
        "label": pairs[2].to_numpy(np.int64),
        "landmarks": marks.iloc[:, 1:11].to_numpy(np.float32).reshape(-1, 5, 2),
        "face_scores": marks[11].to_numpy(np.float32),
    }
    if check_images:
        check_images_exist(meta["image_dir"], image_names)
    return meta


def check_images_exist(image_dir, image_names):
    """Raise a ValueError listing how many images of the meta files are missing under ``image_dir``."""
    missing = [name for name in image_names if not os.path.isfile(os.path.join(image_dir, name))]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(image_names)} images listed in the IJB meta files are missing in {image_dir}, e.g. {missing[:3]}"
        )


def load_1n_meta(data_path, subset):
    """(templates, subject ids) of the two galleries and the mixed probe set: three pairs of arrays."""
    paths = meta_paths(data_path, subset)
    out = []
    for key in ("gallery_1", "gallery_2", "probe"):
        table = read_meta_table(paths[key], 2, sep=",", skiprows=1)
        out.append((table[0].to_numpy(np.int64), table[1].to_numpy(np.int64)))
    return out


# ---------------------------------------------------------------------------------------------------------
# Image embeddings.
# ---------------------------------------------------------------------------------------------------------
def aligned_images_dataset(image_paths, landmarks, batch_size=128, image_size=(112, 112), image_scale=data.SEEDS_SCALE):
    """``tf.data`` of aligned, normalized face batches: decode in parallel, warp with ``face_align_landmarks``."""
    import tensorflow as tf

    height, width = image_size

    def align(image, marks):
        return face_align_landmarks(image, marks, image_size)

    def load(path, marks):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        aligned = tf.numpy_function(align, [image, marks], tf.uint8, stateful=False)
        aligned = tf.ensure_shape(tf.cast(aligned, "float32"), (height, width, 3))
        return data.normalize_image(aligned, image_scale)

    dataset = tf.data.Dataset.from_tensor_slices((list(image_paths), np.asarray(landmarks, np.float32)))
    return dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(tf.data.AUTOTUNE)


def compute_image_embeddings(
    predict, image_paths, landmarks, batch_size=128, image_size=(112, 112), image_scale=data.SEEDS_SCALE
):
    """Embeddings of every aligned image and of its horizontal flip, ``(embs, embs_f)``, with a progress bar."""
    from tqdm import tqdm

    dataset = aligned_images_dataset(image_paths, landmarks, batch_size, image_size, image_scale)
    embs, embs_f = [], []
    total = int(np.ceil(len(image_paths) / batch_size))
    for batch in tqdm(dataset.as_numpy_iterator(), total=total, desc="Embedding"):
        embs.append(predict(batch))
        embs_f.append(predict(np.ascontiguousarray(batch[:, :, ::-1])))
    return np.concatenate(embs), np.concatenate(embs_f)


# ---------------------------------------------------------------------------------------------------------
# Scenarios and templates.
# ---------------------------------------------------------------------------------------------------------
def parse_scenario(name):
    """``"N0D1F1"`` -> (use_norm_score, use_detector_score, use_flip_test)."""
    name = name.upper()
    if len(name) != 6 or name[0::2] != "NDF" or any(flag not in "01" for flag in name[1::2]):
        raise ValueError(f"scenario must look like N0D1F1, got {name!r}")
    return name[1] == "1", name[3] == "1", name[5] == "1"


def all_scenarios():
    """The 8 scenarios ``N{0,1}D{0,1}F{0,1}`` run by ``-B``."""
    return [f"N{nn}D{dd}F{ff}" for nn in "01" for dd in "01" for ff in "01"]


def process_embeddings(
    embs, embs_f=None, face_scores=None, use_norm_score=False, use_detector_score=True, use_flip_test=True
):
    """Per-image features of a scenario: add the flip embedding, then L2-normalize, then scale by detector score."""
    feats = embs + embs_f if use_flip_test and embs_f is not None and len(embs_f) else embs
    if use_norm_score:
        feats = l2_normalize(feats)
    if use_detector_score and face_scores is not None:
        feats = feats * np.asarray(face_scores, feats.dtype)[:, None]
    return feats


def image2template_feature(img_feats, templates, medias, choose_templates=None):
    """Template features: mean of the images of each media, summed over media, L2-normalized (float64).

    ``choose_templates`` restricts (and orders by sorted id) the templates computed; every chosen template must
    have images. Returns ``(template_feats, unique_templates)``.
    """
    templates, medias = np.asarray(templates), np.asarray(medias)
    unique_templates = np.unique(templates if choose_templates is None else choose_templates)
    keep = np.isin(templates, unique_templates)
    missing = np.setdiff1d(unique_templates, templates[keep])
    if missing.size:
        raise ValueError(f"{missing.size} templates have no images in the meta file, e.g. {missing[:5].tolist()}")
    rows = np.flatnonzero(keep)
    rows = rows[np.lexsort((medias[rows], templates[rows]))]
    sorted_t, sorted_m = templates[rows], medias[rows]
    media_start = np.flatnonzero(np.r_[True, (sorted_t[1:] != sorted_t[:-1]) | (sorted_m[1:] != sorted_m[:-1])])
    media_counts = np.diff(np.r_[media_start, rows.shape[0]])
    media_feats = np.add.reduceat(np.asarray(img_feats)[rows], media_start, axis=0, dtype=np.float64)
    media_feats /= media_counts[:, None]
    media_t = sorted_t[media_start]
    template_start = np.flatnonzero(np.r_[True, media_t[1:] != media_t[:-1]])
    template_feats = np.add.reduceat(media_feats, template_start, axis=0)
    return l2_normalize(template_feats), unique_templates


def template_indices(unique_templates, template_ids, what="pair list"):
    """Row (int32) of each template id in the sorted ``unique_templates``; unknown ids raise a ValueError.

    Non-negative ids below 2**26 go through a lookup table (one gather), others through ``searchsorted``.
    """
    unique_templates, template_ids = np.asarray(unique_templates), np.asarray(template_ids)
    top = int(unique_templates[-1]) if unique_templates.size else -1
    if unique_templates.size and unique_templates[0] >= 0 and top < 2**26 and template_ids.dtype.kind in "iu":
        lookup = np.full(top + 1, -1, dtype=np.int32)
        lookup[unique_templates] = np.arange(unique_templates.shape[0], dtype=np.int32)
        index = lookup[np.clip(template_ids, 0, top)]
        index[(template_ids < 0) | (template_ids > top)] = -1
        unknown = index < 0
    else:
        index = np.minimum(np.searchsorted(unique_templates, template_ids), max(unique_templates.shape[0] - 1, 0))
        unknown = unique_templates[index] != template_ids if unique_templates.size else np.ones(index.shape, bool)
        index = index.astype(np.int32)
    if np.any(unknown):
        examples = np.unique(template_ids[unknown])[:5].tolist()
        raise ValueError(
            f"{int(unknown.sum())} entries of the {what} name templates without features, e.g. ids {examples}"
        )
    return index


def _block_starts(size, block_elements):
    """Row starts of blocks of an upper-triangular ``size x size`` product, each at most ``block_elements`` big."""
    starts = [0]
    while starts[-1] < size:
        starts.append(starts[-1] + max(1, block_elements // (size - starts[-1])))
    return np.minimum(np.array(starts), size)


def pair_scores(template_feats, unique_templates, p1, p2, block_elements=2**25):
    """Dot products of the template features of every pair ``(p1[i], p2[i])``, as float32, in bounded memory.

    The score is symmetric, so each pair is ordered (low, high) by template row. Pairs are grouped (radix sort)
    by blocks of ``low``; a block of rows is multiplied (BLAS) with the features of all rows from its start
    on — an upper-triangular band of at most ``block_elements`` entries — and the pairs' scores are picked from
    it. Blocks with few pairs gather and multiply the pairs' rows in chunks instead.
    """
    first = template_indices(unique_templates, p1, "pair list (first column)")
    second = template_indices(unique_templates, p2, "pair list (second column)")
    size = template_feats.shape[0]
    used = np.flatnonzero(np.bincount(first, minlength=size) + np.bincount(second, minlength=size))
    rank = np.zeros(size, dtype=np.int32)
    rank[used] = np.arange(used.shape[0], dtype=np.int32)
    first, second = rank[first], rank[second]
    low, high = np.minimum(first, second), np.maximum(first, second)
    del first, second
    feats = np.ascontiguousarray(np.asarray(template_feats)[used], dtype=np.float32)
    feats_t = np.ascontiguousarray(feats.T)
    starts = _block_starts(used.shape[0], block_elements)
    num_blocks = starts.shape[0] - 1
    block_of_row = np.repeat(
        np.arange(num_blocks, dtype=np.uint16 if num_blocks < 2**16 else np.uint32), np.diff(starts)
    )
    pair_block = block_of_row[low]
    order = np.argsort(pair_block, kind="stable")  # radix sort for 16-bit keys
    bounds = np.r_[0, np.cumsum(np.bincount(pair_block, minlength=num_blocks))]
    del pair_block
    scores = np.empty(low.shape[0], dtype=np.float32)
    for block_index in range(num_blocks):
        selected = order[bounds[block_index] : bounds[block_index + 1]]
        start, stop = starts[block_index], starts[block_index + 1]
        if selected.shape[0] == 0:
            continue
        if 32 * selected.shape[0] >= (stop - start) * (used.shape[0] - start):
            similarity = feats[start:stop] @ feats_t[:, start:]
            scores[selected] = similarity[low[selected] - start, high[selected] - start]
        else:
            _gathered_scores(feats, low, high, selected, scores, max(1, block_elements // feats.shape[1]))
    return scores


def _gathered_scores(feats, first, second, selected, scores, chunk):
    """Row-wise dot products for sparse pairs, ``chunk`` pairs at a time."""
    for start in range(0, selected.shape[0], chunk):
        part = selected[start : start + chunk]
        scores[part] = np.einsum("ij,ij->i", feats[first[part]], feats[second[part]])


# ---------------------------------------------------------------------------------------------------------
# 1:N on the IJB galleries.
# ---------------------------------------------------------------------------------------------------------
def run_1n(img_feats, meta, one_n_meta):
    """1:N results of both galleries and their average, as a dict of dicts."""
    (g1_templates, g1_ids), (g2_templates, g2_ids), (probe_templates, probe_ids) = one_n_meta
    probe_feats, probe_unique, probe_unique_ids = _template_subjects(img_feats, meta, probe_templates, probe_ids)
    results = {}
    for name, templates, ids in (("gallery_1", g1_templates, g1_ids), ("gallery_2", g2_templates, g2_ids)):
        gallery_feats, _, gallery_unique_ids = _template_subjects(img_feats, meta, templates, ids)
        results[name] = evaluation_1N(probe_feats, gallery_feats, probe_unique_ids, gallery_unique_ids)
    results["average"] = mean_over_galleries([results["gallery_1"], results["gallery_2"]])
    return results


def _template_subjects(img_feats, meta, templates, subject_ids):
    unique_templates, first_row = np.unique(templates, return_index=True)
    feats, _ = image2template_feature(img_feats, meta["templates"], meta["medias"], unique_templates)
    return feats, unique_templates, np.asarray(subject_ids)[first_row]


# ---------------------------------------------------------------------------------------------------------
# Reports and plots.
# ---------------------------------------------------------------------------------------------------------
def tar_far_table(results, far_targets=FAR_TARGETS):
    """A Markdown table: one row per method, TAR at each FAR and AUC."""
    header = "| Methods | " + " | ".join(f"{far:g}" for far in far_targets) + " | AUC |"
    lines = [header, "| --- " * (len(far_targets) + 2) + "|"]
    for name, (tars, roc_auc) in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{tar:.6f}" for tar in tars) + f" | {roc_auc:.6f} |")
    return "\n".join(lines)


def one_n_table(results):
    """A Markdown table of ``run_1n`` results: one row per gallery plus the average."""
    return identification_table(results)


# ---------------------------------------------------------------------------------------------------------
# A small synthetic dataset in the IJB layout, for tests and demos.
# ---------------------------------------------------------------------------------------------------------
def make_synthetic_ijb(
    data_path,
    subset="IJBB",
    num_subjects=6,
    templates_per_subject=3,
    medias_per_template=2,
    images_per_media=2,
    image_size=96,
    seed=0,
):
    """Write ``<data_path>/<subset>/`` with meta files, 5-point landmarks and ``loose_crop`` images (PNG, lossless
    so any decoder reads the same pixels).

    Every subject has a base pattern (images are that pattern plus noise, placed by a random similarity
    transform whose landmarks are written); template ids are ``10 * k + 3``, media ids unique. 1:1 pairs are
    all template pairs; each subject's first template is in gallery 1 (even subjects) or 2 (odd subjects),
    the other templates form the mixed probe set. Returns ``meta_paths``.
    """
    rng = np.random.default_rng(seed)
    paths = meta_paths(data_path, subset)
    os.makedirs(paths["images"], exist_ok=True)
    patterns = rng.integers(0, 256, size=(num_subjects, 8, 8, 3))
    face_rows, mark_rows, template_subject, template_images = [], [], {}, {}
    media_id = 100
    for subject in range(num_subjects):
        for tt in range(templates_per_subject):
            template = 10 * (subject * templates_per_subject + tt) + 3
            template_subject[template], template_images[template] = subject, []
            for _ in range(medias_per_template):
                media_id += 1
                for _ in range(images_per_media):
                    name = f"{len(face_rows)}.png"
                    marks = _write_synthetic_face(
                        os.path.join(paths["images"], name), patterns[subject], image_size, rng
                    )
                    face_rows.append(f"{name} {template} {media_id}")
                    mark_rows.append(
                        name + " " + " ".join(f"{vv:.4f}" for vv in marks.reshape(-1)) + f" {rng.uniform(0.5, 1):.6f}"
                    )
                    template_images[template].append(name)
    templates = sorted(template_subject)
    pair_rows = [
        f"{t1} {t2} {int(template_subject[t1] == template_subject[t2])}"
        for ii, t1 in enumerate(templates)
        for t2 in templates[ii + 1 :]
    ]
    gallery_rows = {"gallery_1": [], "gallery_2": [], "probe": []}
    for template in templates:
        subject = template_subject[template]
        is_first = template == 10 * subject * templates_per_subject + 3
        key = ("gallery_1" if subject % 2 == 0 else "gallery_2") if is_first else "probe"
        gallery_rows[key] += [f"{template},{subject},{name}" for name in template_images[template]]
    for key, rows in [("tid_mid", face_rows), ("landmarks", mark_rows), ("pair_label", pair_rows)]:
        save_bytes(paths[key], ("\n".join(rows) + "\n").encode())
    for key, rows in gallery_rows.items():
        save_bytes(paths[key], ("TEMPLATE_ID,SUBJECT_ID,FILENAME\n" + "\n".join(rows) + "\n").encode())
    return paths


def _write_synthetic_face(path, pattern, image_size, rng):
    """Save the subject pattern, warped into a noisy image by a random similarity transform; return its landmarks."""
    from PIL import Image
    from skimage.transform import SimilarityTransform, warp

    face = np.asarray(Image.fromarray(pattern.astype(np.uint8)).resize((112, 112), Image.BILINEAR), dtype=np.float64)
    face = np.clip(face + rng.normal(0, 60, size=face.shape), 0, 255)
    scale = rng.uniform(0.6, 0.75)
    transform = SimilarityTransform(
        scale=scale, rotation=rng.uniform(-0.2, 0.2), translation=rng.uniform(5, image_size - 112 * scale - 5, 2)
    )
    image = warp(face, transform.inverse, output_shape=(image_size, image_size), preserve_range=True)
    buffer = io.BytesIO()
    Image.fromarray(np.round(image).astype(np.uint8)).save(buffer, format="PNG")
    save_bytes(path, buffer.getvalue())
    return transform(ARCFACE_TEMPLATE.astype(np.float64))


# ---------------------------------------------------------------------------------------------------------
# The evaluation run behind the CLI.
# ---------------------------------------------------------------------------------------------------------
def save_npz(path, **arrays):
    """``np.savez`` atomically (plain arrays only, so it reloads with ``allow_pickle=False``)."""
    with atomic_write(path, suffix=".npz") as tmp_path:
        np.savez(tmp_path, **arrays)
    return path


def load_saved_embeddings(path):
    """``(embs, embs_f, model_signature)`` from an npz written by ``-E`` (signature "" when absent)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"saved embeddings not found: {path}")
    with np.load(path, allow_pickle=False) as saved:
        if "embs" not in saved:
            raise ValueError(f"{path}: no 'embs' array, not an embeddings file written by IJB_evals.py -E")
        embs_f = saved["embs_f"] if "embs_f" in saved else None
        signature = str(saved["model_signature"]) if "model_signature" in saved else ""
        return saved["embs"], embs_f, signature


def model_signature(model_path):
    """Path, size and modification time of a model file: saved embeddings are reused only for the same file."""
    stat = os.stat(model_path)
    return f"{os.path.abspath(model_path)}:{stat.st_size}:{stat.st_mtime_ns}"


def get_embeddings(args, meta):
    """Embeddings from ``-R``, from a matching ``-E`` file of an earlier run (unless ``-F``) or from the model.

    Returns ``(embs, embs_f, name)``; with ``-E`` freshly computed embeddings are saved for later runs.
    """
    if args.restore_embs:
        embs, embs_f, _ = load_saved_embeddings(args.restore_embs)
        name = os.path.splitext(os.path.basename(args.restore_embs))[0].removesuffix("_" + args.subset)
        return _checked(embs, meta, args.subset), embs_f, name
    name = os.path.splitext(os.path.basename(args.model_file))[0]
    saved_path = os.path.join(args.result_dir, f"{name}_{args.subset}.npz")
    signature = model_signature(args.model_file) if os.path.exists(args.model_file) else ""
    if not args.force_reload and os.path.isfile(saved_path):
        embs, embs_f, saved_signature = load_saved_embeddings(saved_path)
        if saved_signature == signature:
            print(">>>> Reusing embeddings of the same model file (-F recomputes):", saved_path)
            return _checked(embs, meta, args.subset), embs_f, name
    check_images_exist(meta["image_dir"], meta["image_names"])
    predict = load_embedder(args.model_file, safe_mode=not args.unsafe_load)
    paths = [os.path.join(meta["image_dir"], image) for image in meta["image_names"]]
    embs, embs_f = compute_image_embeddings(
        predict, paths, meta["landmarks"], args.batch_size, predict.image_size or (112, 112), 1.0 / args.scale
    )
    if args.save_embeddings:
        save_npz(saved_path, embs=embs, embs_f=embs_f, model_signature=np.array(signature))
        print(">>>> Saved embeddings:", saved_path)
    return embs, embs_f, name


def _checked(embs, meta, subset):
    if embs.shape[0] != meta["templates"].shape[0]:
        raise ValueError(f"{embs.shape[0]} saved embeddings for {meta['templates'].shape[0]} images of {subset}")
    return embs


def run_evaluation(args):
    """Run the 1:1 (or, with ``-N``, 1:N) evaluation described by the parsed CLI ``args``; returns the results."""
    meta = load_ijb_meta(args.data_path, args.subset, check_images=False)  # checked before embedding images
    embs, embs_f, name = get_embeddings(args, meta)
    scenarios = all_scenarios() if args.is_bunch else [args.scenario]
    one_n_meta = load_1n_meta(args.data_path, args.subset) if args.is_one_2_N else None
    scenario_tag = "all_scenarios" if args.is_bunch else args.scenario.upper()  # runs of other scenarios keep theirs
    base = os.path.join(args.result_dir, f"{name}_{args.subset}_{scenario_tag}")
    results, curves, scores_by_name = {}, {}, {}
    for scenario in scenarios:
        use_norm, use_detector, use_flip = parse_scenario(scenario)
        img_feats = process_embeddings(embs, embs_f, meta["face_scores"], use_norm, use_detector, use_flip)
        label = f"{name}_{scenario}"
        if one_n_meta is not None:
            results[label] = run_1n(img_feats, meta, one_n_meta)
            print(f">>>> {label} 1:N\n" + one_n_table(results[label]))
            continue
        template_feats, unique_templates = image2template_feature(img_feats, meta["templates"], meta["medias"])
        scores = pair_scores(template_feats, unique_templates, meta["p1"], meta["p2"])
        tars, roc_auc, fpr, tpr = roc_tar_at_far(meta["label"], scores)
        results[label], curves[label], scores_by_name[label] = (tars, roc_auc), (fpr, tpr, roc_auc), scores
    if one_n_meta is None:
        extra = {"label": meta["label"]} if args.save_label else {}
        save_npz(base + "_scores.npz", **scores_by_name, **extra)
        table = tar_far_table(results)
        save_bytes(base + "_1v1.md", (table + "\n").encode())
        plot_roc_curves(curves, base + "_roc.png", title=f"ROC on {args.subset}")
        print(table)
        print(">>>> Saved:", base + "_scores.npz", base + "_1v1.md", base + "_roc.png")
    else:
        import json

        save_bytes(base + "_1N.json", json.dumps(results, indent=2).encode())
    return results


def load_pair_labels(path):
    """Labels from a ``*_template_pair_label.txt`` (third column) or an ``.npy`` array."""
    if path.endswith(".npy"):
        return np.load(path, allow_pickle=False)
    return read_meta_table(path, 3)[2].to_numpy(np.int64)


def plot_only(files, result_dir=RESULT_DIR):
    """Table and ROC plot of saved scores: ``.npy`` arrays or ``_scores.npz`` files, plus a label file (or the npz's)."""
    label_files = [ff for ff in files if ff.endswith(".txt") or os.path.basename(ff).startswith("label")]
    score_files = [ff for ff in files if ff not in label_files]
    label = load_pair_labels(label_files[0]) if label_files else None
    scores = {}
    for path in score_files:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as saved:
                label = saved["label"] if label is None and "label" in saved else label
                scores.update({key: saved[key] for key in saved.files if key != "label"})
        else:
            scores[os.path.splitext(os.path.basename(path))[0]] = np.load(path, allow_pickle=False)
    if label is None:
        raise ValueError("--plot_only needs labels: a *_template_pair_label.txt, a label .npy, or scores saved with -L")
    results, curves = {}, {}
    for name, score in scores.items():
        if score.shape[0] != label.shape[0]:
            raise ValueError(f"{name}: {score.shape[0]} scores for {label.shape[0]} labels")
        tars, roc_auc, fpr, tpr = roc_tar_at_far(label, score)
        results[name], curves[name] = (tars, roc_auc), (fpr, tpr, roc_auc)
    print(tar_far_table(results))
    print(">>>> Saved:", plot_roc_curves(curves, os.path.join(result_dir, "plot_only_roc.png")))
    return results

"""Tests of IJB_evals.py against hand-worked examples and independent loop-based computations (insightface's IJB evaluation written out)."""

import json
import os

import keras
import numpy as np
import pytest
from PIL import Image
from skimage.transform import SimilarityTransform, warp
from sklearn.metrics import roc_curve

from keras_insightface.cli import ijb as ijb_cli
from keras_insightface.data import pipeline as data
from keras_insightface.evaluation import embedder
from keras_insightface.evaluation import ijb as IJB_evals


# ---------------------------------------------------------------------------------------------------------
# Template aggregation and pair scores.
# ---------------------------------------------------------------------------------------------------------
def test_template_aggregation_hand_worked():
    # template 7: media 1 = images [1, 0], [3, 0] -> mean [2, 0]; media 2 = [0, 2]; sum [2, 2] -> [.7071, .7071]
    # template 3: media 5 = [0, 1], [0, 3], [0, -1] -> mean [0, 1] -> [0, 1]
    # template 11: media 9 = [-2, 0] and media 4 = [0, 0.5], [0, 1.5] -> [-2, 0] + [0, 1] -> [-2, 1] / sqrt(5)
    feats = np.array([[1, 0], [0, 1], [0, 2], [-2, 0], [3, 0], [0, 3], [0, 0.5], [0, -1], [0, 1.5]], np.float32)
    templates = np.array([7, 3, 7, 11, 7, 3, 11, 3, 11])
    medias = np.array([1, 5, 2, 9, 1, 5, 4, 5, 4])
    template_feats, unique_templates = IJB_evals.image2template_feature(feats, templates, medias)
    np.testing.assert_array_equal(unique_templates, [3, 7, 11])
    expected = np.array([[0, 1], [np.sqrt(0.5), np.sqrt(0.5)], [-2 / np.sqrt(5), 1 / np.sqrt(5)]])
    np.testing.assert_allclose(template_feats, expected, atol=1e-7)
    chosen, chosen_ids = IJB_evals.image2template_feature(feats, templates, medias, choose_templates=[11, 7, 11])
    np.testing.assert_array_equal(chosen_ids, [7, 11])
    np.testing.assert_allclose(chosen, expected[1:], atol=1e-7)
    with pytest.raises(ValueError, match="1 templates have no images"):
        IJB_evals.image2template_feature(feats, templates, medias, choose_templates=[3, 99])


def reference_template_features(img_feats, templates, medias):
    """insightface image2template_feature, loop by loop."""
    unique_templates = np.unique(templates)
    out = np.zeros((unique_templates.shape[0], img_feats.shape[1]))
    for row, template in enumerate(unique_templates):
        in_template = templates == template
        for media in np.unique(medias[in_template]):
            out[row] += img_feats[in_template & (medias == media)].mean(axis=0)
    return out / np.linalg.norm(out, axis=1, keepdims=True), unique_templates


@pytest.mark.parametrize("block_elements", [2**25, 600, 40])
def test_pair_scores_match_direct_dot_products(block_elements):
    rng = np.random.default_rng(block_elements)
    ids = rng.choice(10**6, size=60, replace=False)  # unsorted, non-contiguous template ids
    feats = rng.normal(size=(60, 16))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    order = np.argsort(ids)
    p1, p2 = rng.choice(ids[:50], 3000), rng.choice(ids, 3000)  # templates 50..59 only ever second
    p1[:5] = p2[:5]  # self pairs
    scores = IJB_evals.pair_scores(feats[order], ids[order], p1, p2, block_elements=block_elements)
    row = {tid: ii for ii, tid in enumerate(ids)}
    expected = np.array([feats[row[aa]] @ feats[row[bb]] for aa, bb in zip(p1, p2)])
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    sparse = IJB_evals.pair_scores(feats[order], ids[order], p1[:7], p2[:7], block_elements=block_elements)
    np.testing.assert_allclose(sparse, expected[:7], atol=1e-6)


def test_pair_scores_unknown_template():
    with pytest.raises(
        ValueError,
        match="3 entries of the pair list \\(first column\\) name templates without features, e.g. ids \\[5, 8\\]",
    ):
        IJB_evals.pair_scores(np.eye(3), np.array([1, 2, 4]), np.array([1, 5, 8, 8]), np.array([1, 2, 4, 4]))
    with pytest.raises(
        ValueError,
        match="1 entries of the pair list \\(second column\\) name templates without features, e.g. ids \\[3\\]",
    ):
        IJB_evals.pair_scores(np.eye(3), np.array([1, 2, 4]), np.array([1, 2]), np.array([3, 4]))
    with pytest.raises(ValueError, match="without features, e.g. ids \\[-7\\]"):
        IJB_evals.pair_scores(
            np.eye(3), np.array([-3, 2, 4]), np.array([-3, -7]), np.array([2, 4])
        )  # searchsorted path


# ---------------------------------------------------------------------------------------------------------
# TAR@FAR and 1:N.
# ---------------------------------------------------------------------------------------------------------
def reference_tar_at_far(label, scores, far_targets):
    """Direct ROC: (FP, TP) counts at every distinct threshold, descending. As sklearn's roc_curve, a point is
    dropped when the step into it equals the step out of it, then (0, 0) is prepended. TAR = TPR of the point
    with the nearest FPR, ties to the larger TPR; AUC by trapezoids."""
    counts = [
        (int(np.sum(scores[label == 0] >= tt)), int(np.sum(scores[label == 1] >= tt))) for tt in np.unique(scores)[::-1]
    ]
    kept = [counts[0]]
    for prev, cur, nxt in zip(counts[:-2], counts[1:-1], counts[2:]):
        if (cur[0] - prev[0], cur[1] - prev[1]) != (nxt[0] - cur[0], nxt[1] - cur[1]):
            kept.append(cur)
    kept = [(0, 0)] + kept + ([counts[-1]] if len(counts) > 1 else [])
    num_neg, num_pos = counts[-1]
    points = [(fp / num_neg, tp / num_pos) for fp, tp in kept]
    auc = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(points[:-1], points[1:]))
    tars = []
    for far in far_targets:
        best = None
        for fpr, tpr in points:
            if best is None or (abs(fpr - far), -tpr) < (abs(best[0] - far), -best[1]):
                best = (fpr, tpr)
        tars.append(best[1])
    return tars, auc


def test_tar_at_far_matches_direct_computation():
    rng = np.random.default_rng(0)
    label = (rng.random(4000) < 0.3).astype(np.int64)
    scores = np.round(rng.normal(size=4000) + 1.5 * label, 2)  # rounding makes ties
    fars = (1e-3, 1e-2, 3e-2, 1e-1, 0.5)
    tars, auc, fpr, tpr = IJB_evals.roc_tar_at_far(label, scores, fars)
    ref_tars, ref_auc = reference_tar_at_far(label, scores, fars)
    np.testing.assert_allclose(tars, ref_tars, atol=1e-12)
    assert auc == pytest.approx(ref_auc, abs=1e-12)
    sk_fpr, sk_tpr, _ = roc_curve(label, scores)
    np.testing.assert_array_equal(fpr, sk_fpr)
    np.testing.assert_array_equal(tpr, sk_tpr)


@pytest.mark.parametrize("num, decimals", [(20000, None), (20000, 1), (3, None)])
def test_roc_curve_equals_sklearn(num, decimals):
    rng = np.random.default_rng(num)
    label = np.r_[0, 1, (rng.random(num - 2) < 0.1)].astype(np.int64)
    scores = (rng.normal(size=num) + label).astype(np.float32)
    scores = np.round(scores, decimals) if decimals is not None else scores
    fpr, tpr = IJB_evals.roc_curve(label, scores)
    sk_fpr, sk_tpr, _ = roc_curve(label, scores)
    np.testing.assert_array_equal(fpr, sk_fpr)
    np.testing.assert_array_equal(tpr, sk_tpr)
    with pytest.raises(ValueError, match="both genuine and impostor"):
        IJB_evals.roc_curve(np.ones(num), scores)


def test_tar_at_far_hand_worked_tie_to_larger_tpr():
    # scores desc: 0.9 (pos), 0.8 (neg), 0.7 (pos), 0.6 (pos), 0.5 (neg), 0.4 (neg), 0.3 (neg)
    label = np.array([1, 0, 1, 1, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    # ROC corners: (0,0) (0,1/3) (.25,1/3) (.25,1) (1,1). FAR 0.25 -> two points, larger TPR 1. FAR 0.1 -> (0, 1/3)
    tars, auc, _, _ = IJB_evals.roc_tar_at_far(label, scores, (0.1, 0.25, 0.2))
    assert tars == [pytest.approx(1 / 3), 1.0, 1.0]
    assert auc == pytest.approx(0.25 * 1 / 3 + 0.75 * 1)


def test_evaluation_1n_hand_worked():
    gallery = np.eye(3)  # subjects 10, 20, 30
    gallery_ids = np.array([10, 20, 30])
    probes = np.array(
        [
            [0.9, 0.1, 0.0],  # subject 10: rank 0, mate score 0.9
            [0.6, 0.5, 0.0],  # subject 20: rank 1
            [0.0, 0.2, 0.7],  # subject 30: rank 0, mate score 0.7
            [0.1, 0.2, 0.3],  # non-mated (subject 40), max 0.3
            [0.8, 0.0, 0.0],  # non-mated (subject 50), max 0.8
        ]
    )
    result = IJB_evals.evaluation_1N(
        probes, gallery, np.array([10, 20, 30, 40, 50]), gallery_ids, fpir_targets=(0.5, 1.0), top_k=(1, 2)
    )
    assert result["num_mated"] == 3 and result["num_non_mated"] == 2
    assert result["top1"] == pytest.approx(2 / 3) and result["top2"] == 1.0
    # FPIR 0.5: sorted non-mated max [0.8, 0.3], index max(int(2*0.5)-1, 0)=0 -> 0.8: only 0.9 passes
    assert result["tpir@fpir=0.5"] == pytest.approx(1 / 3)
    # FPIR 1.0: index 1 -> 0.3: rank-0 probes with 0.9 and 0.7 pass
    assert result["tpir@fpir=1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="one template per subject"):
        IJB_evals.evaluation_1N(probes, gallery, np.arange(5), np.array([10, 10, 30]))


def test_scenarios():
    assert IJB_evals.parse_scenario("n1d0f1") == (True, False, True)
    assert len(set(IJB_evals.all_scenarios())) == 8
    with pytest.raises(ValueError, match="N0D1F1"):
        IJB_evals.parse_scenario("N2D1F1")
    embs, embs_f = np.array([[3.0, 4.0]]), np.array([[1.0, 0.0]])
    scores = np.array([0.5])
    np.testing.assert_allclose(IJB_evals.process_embeddings(embs, embs_f, scores, False, True, True), [[2.0, 2.0]])
    # N: normalize after the flip sum, then detector score: [4, 4] / sqrt(32) * 0.5
    np.testing.assert_allclose(
        IJB_evals.process_embeddings(embs, embs_f, scores, True, True, True), [[0.5 / np.sqrt(2)] * 2]
    )
    np.testing.assert_allclose(IJB_evals.process_embeddings(embs, embs_f, scores, True, False, False), [[0.6, 0.8]])


# ---------------------------------------------------------------------------------------------------------
# End to end on the synthetic dataset.
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ijb_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("ijb")
    IJB_evals.make_synthetic_ijb(
        str(root), "IJBB", num_subjects=4, templates_per_subject=3, medias_per_template=2, images_per_media=2, seed=3
    )
    keras.utils.set_random_seed(0)
    inputs = keras.Input((112, 112, 3))
    nn = keras.layers.Conv2D(4, 8, strides=8, activation="relu", bias_initializer="random_normal")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(8)(keras.layers.Flatten()(nn)))
    model_path = str(root / "tiny.keras")
    model.save(model_path)
    return str(root), model, model_path


def reference_image_embeddings(root, model, scale=data.SEEDS_SCALE):
    """Read each image with PIL, align with skimage directly, embed image and flipped image with the model."""
    paths = IJB_evals.meta_paths(root, "IJBB")
    rows = [line.split() for line in open(paths["landmarks"]).read().splitlines()]
    template = np.array(
        [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
    )
    faces = []
    for row in rows:
        image = np.asarray(Image.open(os.path.join(paths["images"], row[0])).convert("RGB"), np.float64)
        transform = SimilarityTransform.from_estimate(np.array(row[1:11], float).reshape(5, 2), template)
        faces.append(np.round(warp(image, transform.inverse, output_shape=(112, 112), order=1, preserve_range=True)))
    faces = (np.array(faces, np.float32) - 127.5) * scale
    scores = np.array([float(row[11]) for row in rows])
    return np.asarray(model(faces)), np.asarray(model(faces[:, :, ::-1])), scores


def test_end_to_end_1v1(ijb_case, tmp_path):
    root, model, model_path = ijb_case
    result_dir = str(tmp_path / "IJB_result")
    results = ijb_cli.main(
        ["-m", model_path, "-d", root, "-s", "IJBB", "-b", "8", "-E", "-L", "--result_dir", result_dir]
    )
    ref_embs, ref_embs_f, det_scores = reference_image_embeddings(root, model)
    with np.load(os.path.join(result_dir, "tiny_IJBB.npz")) as saved:
        embs, embs_f = saved["embs"], saved["embs_f"]
    # landmarks are read as float32 (as insightface does), so a few warped pixels round the other way
    np.testing.assert_allclose(embs, ref_embs, atol=1e-3)
    np.testing.assert_allclose(embs_f, ref_embs_f, atol=1e-3)
    meta = IJB_evals.load_ijb_meta(root, "IJBB")
    np.testing.assert_allclose(meta["face_scores"], det_scores, atol=1e-6)
    # default scenario N0D1F1 on the saved embeddings, the insightface way, loop by loop
    img_feats = (embs + embs_f) * det_scores[:, None]
    template_feats, unique_templates = reference_template_features(img_feats, meta["templates"], meta["medias"])
    row = {tid: ii for ii, tid in enumerate(unique_templates)}
    expected = np.array([template_feats[row[aa]] @ template_feats[row[bb]] for aa, bb in zip(meta["p1"], meta["p2"])])
    with np.load(os.path.join(result_dir, "tiny_IJBB_N0D1F1_scores.npz")) as saved:
        np.testing.assert_allclose(saved["tiny_N0D1F1"], expected, atol=1e-6)
        np.testing.assert_array_equal(saved["label"], meta["label"])
        ref_tars, ref_auc = reference_tar_at_far(meta["label"], saved["tiny_N0D1F1"], IJB_evals.FAR_TARGETS)
    assert results["tiny_N0D1F1"][0] == pytest.approx(ref_tars, abs=1e-12)
    assert results["tiny_N0D1F1"][1] == pytest.approx(ref_auc, abs=1e-12)
    with open(os.path.join(result_dir, "tiny_IJBB_N0D1F1_roc.png"), "rb") as ff:
        assert ff.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| tiny_N0D1F1 |" in open(os.path.join(result_dir, "tiny_IJBB_N0D1F1_1v1.md")).read()

    # -R: the saved embeddings give the same table without the model; all 8 scenarios with -B
    bunch = ijb_cli.main(
        ["-R", os.path.join(result_dir, "tiny_IJBB.npz"), "-d", root, "-B", "--result_dir", result_dir]
    )
    assert len(bunch) == 8 and bunch["tiny_N0D1F1"] == results["tiny_N0D1F1"]
    bunch_table = open(os.path.join(result_dir, "tiny_IJBB_all_scenarios_1v1.md")).read()
    assert sum(line.startswith("| tiny_N") for line in bunch_table.splitlines()) == 8
    single_table = open(os.path.join(result_dir, "tiny_IJBB_N0D1F1_1v1.md")).read()
    assert sum(line.startswith("| tiny_N") for line in single_table.splitlines()) == 1  # not overwritten by -B
    # --plot_only from the saved scores + the pair label text file
    label_txt = IJB_evals.meta_paths(root, "IJBB")["pair_label"]
    np.save(os.path.join(result_dir, "alone.npy"), expected)
    plotted = ijb_cli.main(
        ["--plot_only", os.path.join(result_dir, "alone.npy"), label_txt, "--result_dir", result_dir]
    )
    ref_tars, ref_auc = reference_tar_at_far(meta["label"], expected, IJB_evals.FAR_TARGETS)
    assert plotted["alone"][0] == pytest.approx(ref_tars, abs=1e-12)
    assert plotted["alone"][1] == pytest.approx(ref_auc, abs=1e-12)


def test_saved_embeddings_reused_unless_forced(ijb_case, tmp_path):
    """-E embeddings of the same model file are reused by later runs; -F recomputes them."""
    root, _, model_path = ijb_case
    result_dir = str(tmp_path / "IJB_result")
    args = ["-m", model_path, "-d", root, "--result_dir", result_dir]
    original = ijb_cli.main(args + ["-E"])["tiny_N0D1F1"]
    saved_path = os.path.join(result_dir, "tiny_IJBB.npz")
    with np.load(saved_path) as saved:
        arrays = dict(saved)
    arrays["embs"] = np.random.default_rng(0).normal(size=arrays["embs"].shape).astype(np.float32)
    np.savez(saved_path, **arrays)
    assert ijb_cli.main(args)["tiny_N0D1F1"] != original  # the tampered embeddings were used
    assert ijb_cli.main(args + ["-F"])["tiny_N0D1F1"] == original


def test_end_to_end_1n(ijb_case, tmp_path):
    root, _, model_path = ijb_case
    result_dir = str(tmp_path / "IJB_result")
    results = ijb_cli.main(
        ["-m", model_path, "-d", root, "-N", "-E", "--scenario", "N1D0F1", "--result_dir", result_dir]
    )
    with np.load(os.path.join(result_dir, "tiny_IJBB.npz")) as saved:  # embeddings are checked by the 1:1 test
        img_feats = saved["embs"] + saved["embs_f"]
    img_feats /= np.linalg.norm(img_feats, axis=1, keepdims=True)
    meta = IJB_evals.load_ijb_meta(root, "IJBB")
    template_feats, unique_templates = reference_template_features(img_feats, meta["templates"], meta["medias"])
    (g1, g1_ids), (g2, g2_ids), (probe, probe_ids) = IJB_evals.load_1n_meta(root, "IJBB")
    subject = dict(zip(np.r_[g1, g2, probe], np.r_[g1_ids, g2_ids, probe_ids]))
    probe_templates = np.unique(probe)
    probe_feats = template_feats[np.searchsorted(unique_templates, probe_templates)]
    expected = {}
    for name, gallery in (("gallery_1", np.unique(g1)), ("gallery_2", np.unique(g2))):
        gallery_feats = template_feats[np.searchsorted(unique_templates, gallery)]
        similarity = probe_feats @ gallery_feats.T
        gallery_subjects = [subject[tt] for tt in gallery]
        top1 = []
        for row, template in enumerate(probe_templates):
            if subject[template] in gallery_subjects:
                top1.append(gallery_subjects[int(np.argmax(similarity[row]))] == subject[template])
        expected[name] = np.mean(top1)
    saved = json.load(open(os.path.join(result_dir, "tiny_IJBB_N1D0F1_1N.json")))
    for name in ("gallery_1", "gallery_2"):
        assert results["tiny_N1D0F1"][name]["top1"] == pytest.approx(expected[name])
        assert saved["tiny_N1D0F1"][name]["top1"] == pytest.approx(expected[name])
    assert results["tiny_N1D0F1"]["average"]["top1"] == pytest.approx(np.mean(list(expected.values())))


# ---------------------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------------------
def test_missing_images_give_clear_error(tmp_path):
    root = str(tmp_path)
    paths = IJB_evals.make_synthetic_ijb(
        root, "IJBC", num_subjects=2, templates_per_subject=1, medias_per_template=1, images_per_media=2
    )
    os.remove(os.path.join(paths["images"], "1.png"))
    with pytest.raises(ValueError, match="1 of 4 images listed in the IJB meta files are missing .*1.png"):
        IJB_evals.load_ijb_meta(root, "IJBC")
    with pytest.raises(ValueError, match="missing"):
        ijb_cli.main(
            ["-m", os.path.join(root, "model.keras"), "-d", root, "-s", "IJBC", "--result_dir", str(tmp_path / "out")]
        )
    with pytest.raises(FileNotFoundError, match="IJB meta file not found"):
        IJB_evals.load_ijb_meta(root, "IJBB")
    with pytest.raises(ValueError, match="unknown IJB subset"):
        IJB_evals.meta_paths(root, "IJBA")


def test_model_types(tmp_path):
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"not a model")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install onnxruntime"):
            embedder.load_embedder(str(fake))
    other = tmp_path / "model,0"
    other.write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported model file"):
        embedder.load_embedder(str(other))
    with pytest.raises(SystemExit):
        ijb_cli.parse_arguments(["-d", str(tmp_path)])  # neither model, embeddings nor --plot_only

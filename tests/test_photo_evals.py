"""Folder evaluation and photo comparison (``photo_evals``, run by ``evals.py --folder`` / ``--compare``).

Every metric is recomputed here from the saved embeddings with plain loops and numpy / scikit-learn formulas
written from their definitions, not with the library's own metric code.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import skimage.data
from PIL import Image
from skimage.transform import SimilarityTransform, warp

from keras_insightface.cli import evals as evals_cli
from keras_insightface.data import pipeline as data
from keras_insightface.evaluation import photo_evals
from keras_insightface.faces import detector as face_detector

TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)


def tiny_model(size, seed=0):
    """A small random embedding model: different images get clearly different embeddings."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    hidden = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    hidden = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(hidden)
    hidden = keras.layers.GlobalAveragePooling2D()(hidden)
    return keras.Model(inputs, keras.layers.Dense(12)(hidden), name="tiny")


# ---------------------------------------------------------------------------------------------------------
# Independent references.
# ---------------------------------------------------------------------------------------------------------
def reference_embeddings(model, paths, scale=data.SEEDS_SCALE):
    """Flip-TTA, L2-normalized embeddings with ``model.predict``. Decoded by TensorFlow's JPEG decoder, as the
    evaluation does: PIL's differs by up to 14 levels on these small JPEGs, which moves a random model's output."""
    import tensorflow as tf

    images = np.stack([tf.io.decode_jpeg(tf.io.read_file(path)).numpy().astype(np.float32) for path in paths])
    batch = (images - 127.5) * scale
    embeddings = model.predict(batch, verbose=0) + model.predict(batch[:, :, ::-1], verbose=0)
    return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)


def reference_verification(embeddings, labels, far_targets):
    """All pairs i < j; TAR at FAR (point of scikit-learn's ROC with the nearest FPR, ties to the larger TPR),
    AUC and the best balanced accuracy found by trying every score as the threshold."""
    from sklearn.metrics import roc_auc_score, roc_curve

    scores, same = [], []
    for first in range(len(labels)):
        for second in range(first + 1, len(labels)):
            scores.append(float(np.dot(embeddings[first], embeddings[second])))
            same.append(labels[first] == labels[second])
    scores, same = np.array(scores), np.array(same)
    fpr, tpr, _ = roc_curve(same, scores)
    tars = []
    for far in far_targets:
        distance = np.abs(fpr - far)
        tars.append(tpr[distance == distance.min()].max())
    best, best_threshold = -1.0, None
    for threshold in np.unique(scores):
        balanced = (np.mean(scores[same] > threshold) + np.mean(scores[~same] <= threshold)) / 2
        if balanced > best:
            best, best_threshold = balanced, threshold
    return {
        "genuine_pairs": int(same.sum()),
        "impostor_pairs": int((~same).sum()),
        "tars": tars,
        "auc": roc_auc_score(same, scores),
        "accuracy": best,
        "threshold": best_threshold,
    }


def reference_identification(embeddings, labels, gallery, half, fpir_targets, top_k):
    """Per half's gallery, with loops: rank of each mated probe's own template, and TPIR at FPIR with the
    threshold at the FPIR-th highest top score of the non-mated probes."""
    results = []
    for index in (0, 1):
        ids = sorted(set(labels[gallery & (half == index)].tolist()))
        templates = []
        for identity in ids:
            mean = embeddings[gallery & (labels == identity)].mean(axis=0)
            templates.append(mean / np.linalg.norm(mean))
        templates = np.array(templates)
        ranks, mate_scores, non_mated_tops = [], [], []
        for probe in np.flatnonzero(~gallery):
            similarity = templates @ embeddings[probe]
            if labels[probe] in ids:
                mate = similarity[ids.index(labels[probe])]
                ranks.append(int(np.sum(similarity > mate)))
                mate_scores.append(mate)
            else:
                non_mated_tops.append(similarity.max())
        ranks, mate_scores = np.array(ranks), np.array(mate_scores)
        tops = sorted(non_mated_tops, reverse=True)
        result = {f"top{k}": np.mean(ranks < k) for k in top_k}
        for fpir in fpir_targets:
            threshold = tops[max(int(len(tops) * fpir) - 1, 0)]
            result[f"tpir@fpir={fpir:g}"] = np.mean((ranks == 0) & (mate_scores > threshold))
        results.append(result)
    return results


# ---------------------------------------------------------------------------------------------------------
# Folder evaluation.
# ---------------------------------------------------------------------------------------------------------
def test_folder_metrics_equal_an_independent_computation(demo_small, tmp_path):
    folder = demo_small["train_dir"]  # 12 identities x 10 aligned 32x32 faces
    model = tiny_model(32)
    results = photo_evals.evaluate_folder(
        model, folder, batch_size=32, gallery_per_identity=2, result_dir=str(tmp_path)
    )
    base = tmp_path / f"tiny_{os.path.basename(folder)}"
    saved = np.load(str(base) + "_embeddings.npz")
    paths = [os.path.join(folder, name) for name in saved["image_names"]]
    labels, embeddings = saved["labels"], saved["embeddings"]
    np.testing.assert_allclose(embeddings, reference_embeddings(model, paths), atol=1e-5)
    assert sorted(set(saved["image_names"])) == sorted(os.path.relpath(p, folder) for p in paths)
    assert [int(name.split(os.sep)[0]) for name in saved["image_names"]] == labels.tolist()

    expected = reference_verification(embeddings, labels, photo_evals.FOLDER_FAR_TARGETS)
    verification = results["verification"]
    assert verification["genuine_pairs"] == expected["genuine_pairs"] == 12 * 45
    assert verification["impostor_pairs"] == expected["impostor_pairs"] == 120 * 119 // 2 - 12 * 45
    for far, tar in zip(photo_evals.FOLDER_FAR_TARGETS, expected["tars"]):
        if expected["impostor_pairs"] * far >= 1:
            assert verification[f"tar@far={far:g}"] == pytest.approx(tar, abs=1e-12)
        else:  # fewer impostor pairs than 1 / FAR: no meaningful TAR
            assert verification[f"tar@far={far:g}"] is None
    assert verification["auc"] == pytest.approx(expected["auc"], abs=1e-9)
    assert verification["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
    assert verification["threshold"] == pytest.approx(expected["threshold"], abs=1e-6)

    gallery, half = saved["gallery"], saved["half"]
    for identity in range(12):  # the split: 2 gallery images per identity, each identity in one half
        assert gallery[labels == identity].sum() == 2
        assert len(set(half[labels == identity].tolist())) == 1
    assert sorted(np.bincount(half[gallery]).tolist()) == [12, 12]
    expected_1n = reference_identification(embeddings, labels, gallery, half, (0.1, 0.01), (1, 5))
    for name, reference in zip(("gallery_1", "gallery_2"), expected_1n):
        assert results["identification"][name]["num_mated"] == 6 * 8
        for key, value in reference.items():
            assert results["identification"][name][key] == pytest.approx(value, abs=1e-12), (name, key)
    for key in expected_1n[0]:
        mean = (expected_1n[0][key] + expected_1n[1][key]) / 2
        assert results["identification"]["mean"][key] == pytest.approx(mean, abs=1e-12)

    on_disk = json.loads((tmp_path / f"{base.name}_folder.json").read_text())
    assert on_disk["verification"] == pytest.approx(results["verification"])
    table = (tmp_path / f"{base.name}_folder.md").read_text()
    assert "| tar@far=0.1 |" in table and "| gallery_1 |" in table and "n/a" in table
    assert (tmp_path / f"{base.name}_roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_folder_pairs_are_sampled_distinct_and_correct():
    labels = np.repeat(np.arange(30), 7)  # 630 genuine, 21,420 impostor pairs
    first, second, issame = photo_evals.folder_pairs(labels, max_pairs=500, seed=1)
    assert issame.sum() == 500 and (~issame).sum() == 500
    assert (first < second).all()
    assert ((labels[first] == labels[second]) == issame).all()
    assert len(set(zip(first.tolist(), second.tolist()))) == 1000
    again = photo_evals.folder_pairs(labels, max_pairs=500, seed=1)
    assert all((aa == bb).all() for aa, bb in zip((first, second, issame), again))
    first, second, issame = photo_evals.folder_pairs(labels, max_pairs=10**6)
    assert issame.sum() == 30 * 21 and (~issame).sum() == 210 * 209 // 2 - 30 * 21


def test_folder_evaluation_refuses_unusable_folders(tmp_path):
    os.makedirs(tmp_path / "only" / "a")
    Image.new("RGB", (32, 32)).save(tmp_path / "only" / "a" / "0.jpg")
    with pytest.raises(ValueError, match="at least 2 identity"):
        photo_evals.evaluate_folder(tiny_model(32), str(tmp_path / "only"), result_dir=str(tmp_path))
    for name in ("a", "b"):
        os.makedirs(tmp_path / "bad" / name)
        for index in range(2):
            Image.new("RGB", (32, 32), (index * 90, 20, 30)).save(tmp_path / "bad" / name / f"{index}.jpg")
    (tmp_path / "bad" / "b" / "2.jpg").write_text("not an image")
    with pytest.raises(ValueError) as raised:
        photo_evals.evaluate_folder(tiny_model(32), str(tmp_path / "bad"), result_dir=str(tmp_path))
    assert str(raised.value) == f"cannot decode {tmp_path / 'bad' / 'b' / '2.jpg'} (1 in all): remove or re-align them"
    with pytest.raises(ValueError, match="every identity has only its gallery"):
        photo_evals.folder_metrics(np.eye(4), [0, 0, 1, 1], gallery_per_identity=2)


# ---------------------------------------------------------------------------------------------------------
# Comparing photos.
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def detector():
    return face_detector.FaceDetector()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The astronaut as a PNG, the astronaut rotated and shrunk inside a larger JPEG, and the cameraman."""
    root = tmp_path_factory.mktemp("photos")
    astronaut = skimage.data.astronaut()
    Image.fromarray(astronaut).save(root / "astronaut.png")
    transform = SimilarityTransform(scale=0.7, rotation=0.3, translation=(150, 40))
    moved = warp(astronaut, transform.inverse, output_shape=(500, 640), preserve_range=True, cval=30)
    Image.fromarray(moved.astype(np.uint8)).save(root / "moved.jpg", quality=95)
    Image.fromarray(skimage.data.camera()).save(root / "cameraman.png")
    Image.fromarray(skimage.data.coffee()).save(root / "coffee.jpg")
    return {
        name: str(root / f"{name}.{ext}")
        for name, ext in (("astronaut", "png"), ("moved", "jpg"), ("cameraman", "png"), ("coffee", "jpg"))
    }


def test_compare_photos_scores_and_picture(photos, detector, tmp_path):
    model = tiny_model(112)
    names = [photos["astronaut"], photos["moved"], photos["cameraman"]]
    picture = str(tmp_path / "compare.png")
    result = photo_evals.compare_photos(model, names, threshold=0.95, detector=detector, save_path=picture)
    crops = np.stack(result["crops"])
    assert crops.shape == (3, 112, 112, 3)
    # the astronaut's two crops are the same face on the template, whatever the pose in the photo (they differ
    # at edges by the detector's ~1 px landmark noise: mean 15 levels; the cameraman's crop: 81)
    assert np.abs(crops[0].astype(int) - crops[1]).mean() < 25
    assert np.abs(crops[0].astype(int) - crops[2]).mean() > 50
    batch = (crops.astype(np.float32) - 127.5) / 128
    embeddings = model.predict(batch, verbose=0) + model.predict(batch[:, :, ::-1], verbose=0)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    np.testing.assert_allclose(result["similarity"], embeddings @ embeddings.T, atol=1e-5)
    assert result["same"] == (np.array(result["similarity"]) > 0.95).tolist()
    text = photo_evals.format_comparison(result)
    assert "astronaut.png vs moved.jpg" in text and "threshold 0.9500" in text
    image = np.asarray(Image.open(picture))
    assert image.ndim == 3 and min(image.shape[:2]) > 300

    unjudged = photo_evals.compare_photos(model, names[:2], detector=detector)
    assert unjudged["same"] is None and "no threshold" in photo_evals.format_comparison(unjudged)


def test_compare_photos_bad_input(photos, detector, tmp_path):
    model = tiny_model(112)
    with pytest.raises(ValueError, match="no face found in .*coffee.jpg"):
        photo_evals.compare_photos(model, [photos["astronaut"], photos["coffee"]], detector=detector)
    (tmp_path / "fake.jpg").write_text("hello")
    with pytest.raises(ValueError, match="fake.jpg: cannot read image"):
        photo_evals.compare_photos(model, [photos["astronaut"], str(tmp_path / "fake.jpg")], detector=detector)


def test_threshold_from_folder_evaluation_or_training_history(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    os.makedirs(checkpoints)
    model_path = checkpoints / "run_basic_lfw_epoch_2_0.900000.keras"
    model_path.write_bytes(b"")
    assert photo_evals.find_model_threshold(str(model_path), str(tmp_path / "results")) == (None, None)
    history = {"loss": [3.0, 2.0, 1.5], "lfw": [0.8, 0.9, 0.85], "lfw_thresh": [0.1, 0.2, 0.3]}
    (checkpoints / "run_hist.json").write_text(json.dumps(history))
    threshold, source = photo_evals.find_model_threshold(str(model_path), str(tmp_path / "results"))
    assert threshold == 0.2 and source == f"the training history {checkpoints / 'run_hist.json'} (best lfw epoch)"
    os.makedirs(tmp_path / "results")
    folder_result = {"verification": {"threshold": 0.42}}
    folder_file = tmp_path / "results" / "run_basic_lfw_epoch_2_0.900000_mine_folder.json"
    folder_file.write_text(json.dumps(folder_result))
    threshold, source = photo_evals.find_model_threshold(str(model_path), str(tmp_path / "results"))
    assert threshold == 0.42 and source == f"the folder evaluation {folder_file}"
    two_bins = {**history, "cfp_fp": [0.7, 0.6, 0.75], "cfp_fp_thresh": [0.5, 0.6, 0.7]}
    (tmp_path / "two_hist.json").write_text(json.dumps(two_bins))
    assert photo_evals.threshold_from_file(f"{tmp_path / 'two_hist.json'}:cfp_fp") == 0.7
    with pytest.raises(ValueError, match="name one of the evaluated bins"):
        photo_evals.threshold_from_file(str(tmp_path / "two_hist.json"))


# ---------------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------------
def test_cli_folder_and_compare(demo_small, photos, tmp_path, capsys):
    model_path = str(tmp_path / "tiny112.keras")
    tiny_model(112).save(model_path)
    results_dir = str(tmp_path / "results")
    folder = demo_small["train_dir"]
    with pytest.warns(UserWarning, match=r"120 of 120 images checked in .* are not 112x112 face crops \(e\.g\. "):
        results = evals_cli.main(
            ["-m", model_path, "--folder", folder, "--result_dir", results_dir, "--max_pairs", "300"]
        )
    assert results["folder"]["verification"]["genuine_pairs"] == 300
    folder_file = os.path.join(results_dir, f"tiny112_{os.path.basename(folder)}_folder.json")
    assert os.path.exists(folder_file)
    out = capsys.readouterr().out
    assert "1:1 verification" in out  # where the results went, as an absolute path:
    assert f">>>> Saved in {os.path.abspath(results_dir)}: tiny112_{os.path.basename(folder)}_folder.json, " in out
    threshold = results["folder"]["verification"]["threshold"]
    compare = ["-m", model_path, "--compare", photos["astronaut"], photos["moved"], "--result_dir", results_dir]
    results = evals_cli.main(compare)
    assert results["compare"]["threshold"] == pytest.approx(threshold)  # read from the folder evaluation
    out = capsys.readouterr().out
    assert "astronaut.png vs moved.jpg" in out
    assert f"threshold {threshold:.4f} (from the folder evaluation {folder_file})" in out
    assert os.path.exists(os.path.join(results_dir, "compare_tiny112_astronaut_moved.png"))
    evals_cli.main(compare + ["--threshold", "0.5"])  # a second comparison keeps the first picture
    assert "threshold 0.5000 (from --threshold)" in capsys.readouterr().out
    assert os.path.exists(os.path.join(results_dir, "compare_tiny112_astronaut_moved_2.png"))
    with pytest.raises(SystemExit):
        evals_cli.main(["-m", model_path])
    assert "nothing to evaluate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evals_cli.main(["-m", model_path, "--compare", photos["astronaut"]])


@pytest.mark.slow
def test_bad_images_of_a_folder_are_named_in_one_line_without_tensorflows_log(tmp_path):
    """The command's whole stderr is its one-line error: no TensorFlow start-up lines, no codec messages."""
    for name in ("a", "b"):
        os.makedirs(tmp_path / "faces" / name)
        for index in range(2):
            Image.new("RGB", (32, 32), (index * 90, 20, 30)).save(tmp_path / "faces" / name / f"{index}.jpg")
    good = (tmp_path / "faces" / "a" / "0.jpg").read_bytes()
    (tmp_path / "faces" / "a" / "1.jpg").write_bytes(good[: len(good) // 2])  # a truncated JPEG
    tiny_model(32).save(tmp_path / "tiny.keras")
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    command = [sys.executable, "-m", "keras_insightface", "evals", "-m", str(tmp_path / "tiny.keras")]
    done = subprocess.run(
        command + ["--folder", str(tmp_path / "faces")], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    bad = tmp_path / "faces" / "a" / "1.jpg"
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"keras-insightface evals: error: cannot decode {bad} (1 in all): remove or re-align them"
    ]


def test_a_gallery_without_mated_probes_reports_n_a_not_zero():
    """Identities 0 and 1 (gallery 1) have only their gallery image: gallery 1 has no mated probe, so its top-1 is
    n/a and the mean is gallery 2's alone; gallery 2 has no non-mated probe, so its TPIR is n/a too."""
    labels = np.array([0, 1, 2, 2, 3, 3])
    gallery = np.array([True, True, True, False, True, False])
    half = np.array([0, 0, 1, 1, 1, 1])
    probe_id3 = np.array([0, 0, 0.9, 0.1]) / np.linalg.norm([0.9, 0.1])  # closer to identity 2: a top-1 miss
    embeddings = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1], probe_id3])
    results = photo_evals.folder_identification(embeddings, labels, gallery, half, fpir_targets=(0.1,), top_k=(1,))
    assert results["gallery_1"] == {
        "num_gallery": 2, "num_mated": 0, "num_non_mated": 2, "top1": None, "tpir@fpir=0.1": None
    }  # fmt: skip
    assert results["gallery_2"]["top1"] == 0.5 and results["gallery_2"]["tpir@fpir=0.1"] is None
    assert results["mean"]["top1"] == 0.5 and results["mean"]["tpir@fpir=0.1"] is None
    table = photo_evals.format_folder_table(
        {"verification": {"genuine_pairs": 2, "impostor_pairs": 4}, "identification": results}
    )
    rows = {
        line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
        for line in table.splitlines()
        if line.startswith("| gallery_") or line.startswith("| mean")
    }
    assert "| gallery | gallery | mated probes | non-mated probes | top1 | tpir@fpir=0.1 |" in table
    assert rows["gallery_1"] == ["2", "0", "2", "n/a", "n/a"] and rows["gallery_2"] == [
        "2",
        "2",
        "0",
        "0.500000",
        "n/a",
    ]
    assert rows["mean"][3] == "0.500000"

"""Tests of evals.py: verification metrics against independent loop-based references, the callback and the CLI."""

import io
import os
import pickle
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from sklearn.model_selection import KFold

from keras_insightface import utils
from keras_insightface.cli import evals as evals_cli
from keras_insightface.data import pipeline as data
from keras_insightface.evaluation import evals
from keras_insightface.evaluation import metrics as metric_functions


# ---------------------------------------------------------------------------------------------------------
# Independent references, written from the metric definitions (loops, float64).
# ---------------------------------------------------------------------------------------------------------
def reference_accuracy(threshold, dist, issame):
    predict = dist < threshold
    tp = np.sum(predict & issame)
    tn = np.sum(~predict & ~issame)
    return float(tp + tn) / dist.size


def reference_val_far(threshold, dist, issame):
    predict = dist < threshold
    return float(np.sum(predict & issame)) / float(np.sum(issame)), float(np.sum(predict & ~issame)) / float(
        np.sum(~issame)
    )


def reference_insightface(embeddings, issame):
    """insightface verification.evaluate: 10-fold accuracy (mean, std) and VAL@FAR=1e-3 (mean, std, FAR)."""
    dist = np.sum(np.square(embeddings[0::2] - embeddings[1::2]), 1)
    folds = list(KFold(n_splits=10, shuffle=False).split(np.arange(issame.shape[0])))
    thresholds = np.arange(0, 4, 0.01)
    accuracy = []
    for train, test in folds:
        train_acc = [reference_accuracy(tt, dist[train], issame[train]) for tt in thresholds]
        accuracy.append(reference_accuracy(thresholds[int(np.argmax(train_acc))], dist[test], issame[test]))
    thresholds = np.arange(0, 4, 0.001)
    val, far = [], []
    for train, test in folds:
        far_train = np.array([reference_val_far(tt, dist[train], issame[train])[1] for tt in thresholds])
        if far_train.max() >= 1e-3:
            jj = int(np.searchsorted(far_train, 1e-3, side="right")) - 1
            slope = (thresholds[jj + 1] - thresholds[jj]) / (far_train[jj + 1] - far_train[jj])
            threshold = thresholds[jj] + (1e-3 - far_train[jj]) * slope
        else:
            threshold = 0.0
        fold_val, fold_far = reference_val_far(threshold, dist[test], issame[test])
        val.append(fold_val)
        far.append(fold_far)
    return np.mean(accuracy), np.std(accuracy), np.mean(val), np.std(val), np.mean(far)


def random_pair_embeddings(num_pairs, dim=32, noise=1.5, seed=0, genuine_rate=0.5):
    rng = np.random.default_rng(seed)
    issame = rng.random(num_pairs) < genuine_rate
    first = rng.normal(size=(num_pairs, dim))
    second = np.where(
        issame[:, None], first + noise * rng.normal(size=(num_pairs, dim)), rng.normal(size=(num_pairs, dim))
    )
    embeddings = np.empty((2 * num_pairs, dim))
    embeddings[0::2], embeddings[1::2] = first, second
    return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True), issame


# ---------------------------------------------------------------------------------------------------------
# Metrics.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_pairs, noise, genuine_rate", [(600, 1.5, 0.5), (607, 1.0, 0.3), (803, 2.5, 0.6)])
def test_insightface_metrics_match_reference(num_pairs, noise, genuine_rate):
    embeddings, issame = random_pair_embeddings(num_pairs, noise=noise, seed=num_pairs, genuine_rate=genuine_rate)
    metrics = evals.verification_metrics(embeddings, issame)
    acc, acc_std, val, val_std, far = reference_insightface(embeddings, issame)
    assert 0.55 < acc < 0.999  # a non-trivial case: folds disagree on their thresholds
    assert metrics["10fold"] == pytest.approx(acc, abs=1e-12)
    assert metrics["10fold_std"] == pytest.approx(acc_std, abs=1e-12)
    assert metrics["val"] == pytest.approx(val, abs=1e-12)
    assert metrics["val_std"] == pytest.approx(val_std, abs=1e-12)
    assert metrics["far"] == pytest.approx(far, abs=1e-12)
    assert val_std > 0 and far > 0


def test_val_far_hand_worked():
    """Interpolation between the last FAR 0 and the first FAR 1 threshold; threshold 0 when FAR stays 0."""
    issame = np.arange(100) % 5 < 2  # every fold: 4 genuine, 6 impostor
    dist = np.where(issame, 0.5, 3.4995)
    # train FAR is 0 up to t = 3.499 and 1 from 3.500: t = 3.499 + 1e-3 * 0.001 -> all genuine, no impostor accepted
    assert evals.kfold_val_far(dist, issame) == (1.0, 0.0, 0.0)
    assert evals.kfold_val_far(np.full(100, 5.0), issame) == (0.0, 0.0, 0.0)  # FAR never reaches 1e-3


def test_best_threshold_accuracy_matches_brute_force():
    embeddings, issame = random_pair_embeddings(3000, noise=1.2, seed=3)
    scores = np.sum(embeddings[0::2] * embeddings[1::2], 1)
    accuracy, thresh = evals.best_threshold_accuracy(scores, issame)
    # Keras_insightface's loop over the candidate thresholds (top 10% of impostor scores), first maximum
    impostor = np.sort(scores[~issame])
    candidates = impostor[-int(0.1 * impostor.size) :]
    counts = [np.sum(scores[issame] > tt) + np.sum(scores[~issame] <= tt) for tt in candidates]
    assert accuracy == max(counts) / scores.size
    assert thresh == candidates[int(np.argmax(counts))]
    # brute force over every possible threshold (every score): the optimum lies among the candidates here
    brute = max(np.sum(scores[issame] > tt) + np.sum(scores[~issame] <= tt) for tt in np.unique(scores))
    assert accuracy == brute / scores.size
    assert 0.8 < accuracy < 1


def test_best_threshold_accuracy_hand_worked():
    scores = np.array([0.9, 0.8, 0.35, 0.7, 0.1, 0.2, 0.3, 0.4, 0.5, 0.05, 0.15, 0.25, 0.6, 0.0])
    issame = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], dtype=bool)
    # 10 impostors -> 1 candidate: 0.6 -> genuine > 0.6: 3, impostor <= 0.6: 10 -> 13 / 14
    assert evals.best_threshold_accuracy(scores, issame) == (13 / 14, 0.6)
    with pytest.raises(ValueError, match="scores for"):
        evals.best_threshold_accuracy(scores, issame[:-1])


def test_kfold_slices_match_sklearn():
    for num_pairs in (10, 57, 6000):
        expected = [test for _, test in KFold(n_splits=10, shuffle=False).split(np.arange(num_pairs))]
        got = [np.arange(num_pairs)[ss] for ss in metric_functions._kfold_slices(num_pairs)]
        assert all(np.array_equal(aa, bb) for aa, bb in zip(expected, got))


def test_metrics_reject_wrong_pair_count():
    embeddings, issame = random_pair_embeddings(20)
    with pytest.raises(ValueError, match="embeddings for 19 pairs"):
        evals.verification_metrics(embeddings, issame[:-1])


# ---------------------------------------------------------------------------------------------------------
# The callback on a tiny model and bin.
# ---------------------------------------------------------------------------------------------------------
NUM_PAIRS, IMAGE_SIZE = 20, 32


def tiny_model(image_size=IMAGE_SIZE, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, 3))
    nn = keras.layers.Conv2D(8, 3, strides=2, activation="relu", bias_initializer="random_normal")(inputs)
    nn = keras.layers.GlobalAveragePooling2D()(nn)
    return keras.Model(inputs, keras.layers.Dense(16)(nn))


def encode_png(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bin_case(tmp_path_factory):
    """A 20-pair bin of smooth random PNG images, its decoded images and labels."""
    rng = np.random.default_rng(1)
    low = rng.integers(0, 255, size=(2 * NUM_PAIRS, 4, 4, 3)).astype(np.uint8)
    images = [np.asarray(Image.fromarray(ii).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)) for ii in low]
    encoded = [encode_png(ii) for ii in images]  # lossless, so PIL decodes exactly what TensorFlow does
    decoded = np.stack(images).astype("float32")
    issame = rng.random(NUM_PAIRS) < 0.5
    path = str(tmp_path_factory.mktemp("bins") / "tinyset.bin")
    data.write_bin(path, encoded, issame)
    return path, decoded, issame


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def reference_embeddings(model, decoded, scale, flip=True):
    """numpy flip-TTA embeddings: f(x) + f(x[:, :, ::-1]), L2-normalized."""
    images = (decoded - 127.5) * scale
    embeddings = np.asarray(model(images))
    if flip:
        embeddings = embeddings + np.asarray(model(np.ascontiguousarray(images[:, :, ::-1])))
    return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)


@pytest.mark.parametrize("scale", [data.SEEDS_SCALE, data.INSIGHTFACE_SCALE])
def test_callback_embeddings_and_logs(bin_case, model, scale, capsys):
    path, decoded, issame = bin_case
    ee = evals.eval_callback(model, path, batch_size=8, image_scale=scale)
    expected = reference_embeddings(model, decoded, scale)
    np.testing.assert_allclose(ee.compute_embeddings(), expected, atol=2e-5)

    logs = {"loss": 1.0}
    ee.on_epoch_end(0, logs)
    metrics = evals.verification_metrics(expected, issame)
    assert ee.test_names == "tinyset"
    assert set(logs) == {"loss", "tinyset", "tinyset_thresh", "tinyset_10fold", "tinyset_10fold_std", "tinyset_val_far"}
    assert logs["tinyset"] == pytest.approx(metrics["accuracy"]) and ee.cur_acc == logs["tinyset"]
    assert (
        logs["tinyset_thresh"] == pytest.approx(metrics["thresh"], abs=1e-5) and ee.acc_thresh == logs["tinyset_thresh"]
    )
    assert logs["tinyset_10fold"] == pytest.approx(metrics["10fold"])
    assert logs["tinyset_10fold_std"] == pytest.approx(metrics["10fold_std"])
    assert logs["tinyset_val_far"] == pytest.approx(metrics["val"])
    assert ee.max_accuracy == logs["tinyset"]
    out = capsys.readouterr().out
    expected_line = ">>>> tinyset evaluation max accuracy: %f, thresh: %f, previous max accuracy: 0.000000" % (
        metrics["accuracy"],
        ee.acc_thresh,
    )
    assert expected_line in out and ">>>> tinyset 10-fold accuracy: " in out


def test_normalization_scales_differ(bin_case, model):
    """The model has biases, so the 1/128 vs 1/127.5 input scale changes normalized embeddings measurably."""
    path = bin_case[0]
    seeds = evals.eval_callback(model, path, image_scale=data.SEEDS_SCALE).compute_embeddings()
    insightface = evals.eval_callback(model, path, image_scale=data.INSIGHTFACE_SCALE).compute_embeddings()
    assert np.abs(seeds - insightface).max() > 1e-4


def test_callback_no_flip_and_resize(bin_case, tmp_path):
    """Images of another size than the model input are resized (bilinear), also in a bin of mixed sizes."""
    path, decoded, issame = bin_case
    bigger = tiny_model(40, seed=2)
    ee = evals.eval_callback(bigger, path, flip=False)
    resized = tf.image.resize(decoded, (40, 40)).numpy()
    expected = reference_embeddings(bigger, resized, data.SEEDS_SCALE, flip=False)
    np.testing.assert_allclose(ee.compute_embeddings(), expected, atol=2e-5)
    mixed = [encode_png(decoded[0].astype(np.uint8))] + [
        encode_png(ii.astype(np.uint8)) for ii in np.round(resized[1:]).astype(np.uint8)
    ]
    mixed_path = str(tmp_path / "mixed.bin")
    data.write_bin(mixed_path, mixed, issame)
    mixed_images = np.concatenate([resized[:1], np.round(resized[1:])])  # only image 0 needs a resize
    mixed_expected = reference_embeddings(bigger, mixed_images, data.SEEDS_SCALE, flip=False)
    np.testing.assert_allclose(
        evals.eval_callback(bigger, mixed_path, flip=False).compute_embeddings(), mixed_expected, atol=2e-5
    )


def test_callback_saves_best_model(bin_case, model, tmp_path):
    path = bin_case[0]
    prefix = str(tmp_path / "run")
    ee = evals.eval_callback(model, path, save_model=prefix)
    ee.on_epoch_end(0)
    first = "%s_basic_tinyset_epoch_1_%f.keras" % (prefix, ee.cur_acc)
    assert os.path.exists(first)
    ee.on_epoch_end(1)  # not better: nothing saved
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(first)]
    ee.max_accuracy = 0.0  # pretend the next one improves
    ee.on_epoch_end(2)
    second = "%s_basic_tinyset_epoch_3_%f.keras" % (prefix, ee.cur_acc)
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(second)]  # the previous best was removed
    reloaded = keras.models.load_model(second, compile=False)
    sample = np.random.default_rng(0).normal(size=(2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype("float32")
    np.testing.assert_allclose(reloaded(sample), model(sample), atol=1e-6)


def test_callback_eval_freq_batches(bin_case, model):
    ee = evals.eval_callback(model, bin_case[0], eval_freq=3)
    logs_per_batch = []
    for batch in range(7):
        logs = {}
        ee.on_train_batch_end(batch, logs)
        logs_per_batch.append("tinyset" in logs)
    assert logs_per_batch == [False, False, False, True, False, False, True]


def test_callback_under_mirrored_strategy(bin_case, model):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        mirrored = tiny_model(seed=5)
        mirrored.set_weights(model.get_weights())
        ee = evals.eval_callback(mirrored, bin_case[0], batch_size=8)
    plain = evals.eval_callback(model, bin_case[0], batch_size=8)
    for context in (strategy.scope(), _null_context()):
        with context:
            logs = {}
            ee.on_epoch_end(0, logs)
    np.testing.assert_allclose(ee.compute_embeddings(), plain.compute_embeddings(), atol=1e-6)


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


# ---------------------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def _write_pickle(path, obj):
    with open(path, "wb") as ff:
        pickle.dump(obj, ff)
    return str(path)


def test_bad_bins_give_clear_errors(tmp_path, model, bin_case):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"this is not a pickle at all")
    with pytest.raises(ValueError, match="not a valid verification bin"):
        evals.eval_callback(model, str(garbage))
    encoded = [data.encode_jpeg(np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8))] * 4
    with pytest.raises(ValueError, match="5 images for 2 pairs"):
        evals.eval_callback(model, _write_pickle(tmp_path / "count.bin", (encoded + encoded[:1], [True, False])))
    with pytest.raises(ValueError, match="refusing to load 'posix.system'|refusing to load 'os.system'"):
        evals.eval_callback(model, _write_pickle(tmp_path / "evil.bin", ([_Evil()] * 2, [True])))
    with pytest.raises(ValueError, match="cannot decode image"):
        evals.eval_callback(model, _write_pickle(tmp_path / "undecodable.bin", ([b"not an image"] * 2, [True])))
    with pytest.raises(FileNotFoundError):
        evals.eval_callback(model, str(tmp_path / "missing.bin"))


def test_numpy_array_encoded_bin(tmp_path, model, bin_case):
    """CFP-FP / AgeDB-30 store each encoded image as a uint8 numpy array: read without re-encoding."""
    path, decoded, issame = bin_case
    bins, _ = data.load_bin(path)
    as_arrays = _write_pickle(tmp_path / "arrays.bin", ([np.frombuffer(bb, np.uint8) for bb in bins], list(issame)))
    ee = evals.eval_callback(model, as_arrays)
    np.testing.assert_allclose(
        ee.compute_embeddings(), reference_embeddings(model, decoded, data.SEEDS_SCALE), atol=2e-5
    )


# ---------------------------------------------------------------------------------------------------------
# Face alignment and the command line.
# ---------------------------------------------------------------------------------------------------------
def test_face_align_translation_is_exact_crop():
    """Landmarks = template shifted by (10, 20): the aligned face is the crop image[20:132, 10:122]."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(150, 140, 3), dtype=np.uint8)
    landmarks = evals.ARCFACE_TEMPLATE.astype(np.float64) + [10, 20]
    aligned = evals.face_align_landmarks(image, landmarks.reshape(-1))
    assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
    np.testing.assert_array_equal(aligned, image[20:132, 10:122])


def test_face_align_rotation_scale_and_zero_border():
    """Landmarks = template scaled x2 and rotated 90 degrees: aligned(y, x) samples image at the mapped point."""
    rng = np.random.default_rng(1)
    image = rng.integers(1, 255, size=(300, 300, 3), dtype=np.uint8)
    template = evals.ARCFACE_TEMPLATE.astype(np.float64)
    # source point of template point (x, y): (250 - 2 y, 2 x)  (rotation by 90 degrees, scale 2, shift)
    landmarks = np.stack([250 - 2 * template[:, 1], 2 * template[:, 0]], axis=1)
    aligned = evals.face_align_landmarks(image, landmarks)
    for yy, xx in [(0, 0), (50, 60), (111, 111), (30, 100)]:
        np.testing.assert_array_equal(aligned[yy, xx], image[2 * xx, 250 - 2 * yy])
    # a crop larger than the image falls outside it: zero border
    far_landmarks = template + [400, 400]
    assert not evals.face_align_landmarks(image, far_landmarks).any()
    with pytest.raises(ValueError, match="5 \\(x, y\\) landmarks"):
        evals.face_align_landmarks(image, landmarks[:4])


def test_cli_prints_metrics_table(bin_case, model, tmp_path, capsys):
    path, decoded, issame = bin_case
    model_path = str(tmp_path / "basic.keras")
    model.save(model_path)
    results = evals_cli.main(["-m", model_path, "-t", path, path, "-b", "16", "--no-flip", "--scale", "127.5"])
    expected = evals.verification_metrics(
        reference_embeddings(model, decoded, data.INSIGHTFACE_SCALE, flip=False), issame
    )
    assert list(results) == ["tinyset"]
    for key, value in expected.items():
        assert results["tinyset"][key] == pytest.approx(value, abs=1e-5)
    out = capsys.readouterr().out
    assert "| bin | accuracy | thresh | 10-fold acc |" in out
    assert "| tinyset | %.6f |" % expected["accuracy"] in out
    with pytest.raises(FileNotFoundError, match="model not found"):
        evals_cli.main(["-m", str(tmp_path / "none.keras"), "-t", path])


def test_a_training_checkpoint_is_evaluated_through_its_embedding_model(bin_case, tmp_path, capsys):
    from keras_insightface.nn.heads import NormDense

    path, decoded, issame = bin_case
    basic = tiny_model()
    embedding = keras.layers.Identity(name="embedding")(basic.output)
    full = keras.Model(basic.inputs, {"arcface": NormDense(5, name="arcface")(embedding)})  # what a run saves
    checkpoint = str(tmp_path / "run.keras")
    full.save(checkpoint)
    results = evals_cli.main(["-m", checkpoint, "-t", path, "--no-flip"])
    expected = evals.verification_metrics(reference_embeddings(basic, decoded, data.SEEDS_SCALE, flip=False), issame)
    assert results["tinyset"]["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
    assert f">>>> {checkpoint} is a training model: using its embedding model" in capsys.readouterr().out


def test_cli_errors_are_one_line_with_status_2(bin_case, model, tmp_path, capsys):
    path, _, _ = bin_case
    bins, issame = data.load_bin(path)
    truncated = data.write_bin(str(tmp_path / "truncated.bin"), [bins[0][:40]] + bins[1:], issame)
    model_path = str(tmp_path / "basic.keras")
    model.save(model_path)
    for argv, message in [
        (["-m", model_path, "-t", truncated], f"{truncated}: cannot decode image 0"),
        (["-m", str(tmp_path / "none.keras"), "-t", path], "model not found"),
        (["-m", model_path, "-t", str(tmp_path / "none.bin")], "verification bin not found"),
    ]:
        assert utils.run_main(evals_cli.main, argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines


def test_files_that_are_not_models_and_unrebuildable_models_are_one_line(bin_case, tmp_path, capsys):
    path, _, _ = bin_case
    (tmp_path / "notes.keras").write_text("not a model\n")
    (tmp_path / "notes.h5").write_text("not a model\n")
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    doubled = keras.layers.Lambda(lambda x, factor=2.0: x * factor, name="embedding")(keras.layers.Flatten()(inputs))
    keras.Model(inputs, doubled).save(tmp_path / "lambda.keras")  # Keras 3.15 cannot rebuild a lambda's defaults
    for argv, message in [
        (
            ["-m", str(tmp_path / "notes.keras"), "--folder", str(tmp_path / "faces")],
            "folder of aligned faces not found",
        ),
        (["-m", str(tmp_path / "notes.keras"), "-t", path], "notes.keras: not a Keras model file (a .keras model is"),
        (["-m", str(tmp_path / "notes.h5"), "-t", path], "notes.h5: not a Keras model file (a .h5 model is"),
        (
            ["-m", str(tmp_path / "lambda.keras"), "--unsafe_load", "-t", path],
            "lambda.keras: cannot rebuild the saved model: its Lambda layer failed with TypeError: arg 4 (defaults)",
        ),
    ]:
        assert utils.run_main(evals_cli.main, argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines


@pytest.mark.slow
def test_cli_script_exits_2_on_a_corrupt_bin(bin_case, tmp_path):
    path, _, _ = bin_case
    bins, issame = data.load_bin(path)
    truncated = data.write_bin(str(tmp_path / "truncated.bin"), bins[:3] + [bins[3][:50]] + bins[4:], issame)
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "evals.py")
    keras.Sequential([keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3)), keras.layers.Flatten()]).save(tmp_path / "m.keras")
    done = subprocess.run(
        [sys.executable, script, "-m", str(tmp_path / "m.keras"), "-t", truncated], capture_output=True, text=True
    )
    ours = [line for line in done.stderr.splitlines() if line.startswith("evals.py: ")]
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert ours == [f"evals.py: error: {truncated}: cannot decode image 3 (of {len(bins)})"]

"""train.Train end to end on tiny demo data: training, history, checkpoints, resume, NaN and gentle stop."""

import csv
import glob
import io
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import tiny_basic_model
from PIL import Image

from keras_insightface.data import pipeline as data
from keras_insightface.nn import losses
from keras_insightface.training import callbacks as myCallbacks
from keras_insightface.training import train

pytestmark = pytest.mark.slow  # trains models or starts processes

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def trained(demo_small, tmp_path_factory):
    """Softmax then ArcFace on the small demo set, with TensorBoard and CSVLogger attached; shared by the checks."""
    keras.utils.set_random_seed(0)
    save_dir = tmp_path_factory.mktemp("ckpt")
    user_callbacks = [
        keras.callbacks.TensorBoard(str(save_dir / "tensorboard")),
        keras.callbacks.CSVLogger(str(save_dir / "log.csv")),  # rewritten by each stage, as by each model.fit call
    ]
    tt = train.Train(
        demo_small["train_dir"],
        str(save_dir / "tiny.keras"),
        eval_paths=[demo_small["bin_path"]],
        basic_model=tiny_basic_model(),
        batch_size=16,
        lr_base=0.01,
        random_status=0,
        verbose=0,
        callbacks=user_callbacks,
    )
    sch = [
        {"loss": keras.losses.CategoricalCrossentropy(label_smoothing=0.1), "optimizer": "adam", "epoch": 5},
        {"loss": losses.ArcfaceLoss(scale=16), "epoch": 3},
    ]
    sch_copy = [dict(ss) for ss in sch]
    history = tt.train(sch, 0)
    return tt, history, sch, sch_copy, save_dir


def test_training_beats_chance_and_loss_decreases(trained):
    _, history, _, _, _ = trained
    assert len(history["loss"]) == 8
    assert history["loss"][4] < history["loss"][0] and history["loss"][7] < history["loss"][5]
    assert max(history["accuracy"]) > 3 / 12  # 12 classes: chance is 1/12


def test_history_file_has_every_epoch_and_eval_keys(trained):
    tt, history, _, _, save_dir = trained
    with open(tt.hist_path) as ff:
        saved = json.load(ff)
    assert saved.keys() == history.keys()
    for key, values in history.items():  # per key: pytest 9's approx refuses nested containers
        np.testing.assert_allclose(np.array(saved[key], dtype=float), np.array(values, dtype=float), rtol=1e-12)
    for key in ("lr", "regular_loss", "demo_eval", "demo_eval_thresh", "demo_eval_10fold", "demo_eval_val_far"):
        assert len(saved[key]) == 8, key
    assert all(0.0 <= acc <= 1.0 for acc in saved["demo_eval"])
    assert saved["lr"][0] == pytest.approx(0.01)  # exponential schedule, lr_decay 0.05
    assert saved["lr"][4] == pytest.approx(0.01 * np.exp(-0.05 * 4), rel=1e-5)


def test_checkpoints_reload_with_same_outputs(trained):
    tt, _, _, _, save_dir = trained
    full = keras.models.load_model(tt.save_path)
    images = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(full(images)["arcface"], tt.model(images)["arcface"], atol=1e-6)
    best = [ff for ff in os.listdir(save_dir) if ff.startswith("tiny_basic_demo_eval_epoch_")]
    assert len(best) == 1 and best[0].endswith(".keras")
    assert keras.models.load_model(os.path.join(save_dir, best[0])).output_shape == (None, 32)
    assert not [ff for ff in os.listdir(save_dir) if ".tmp" in ff]


def _tensorboard_scalars(log_dir):
    """``{tag: [values by step]}`` of the scalar summaries in a TensorBoard log folder."""
    scalars = {}
    for path in sorted(glob.glob(os.path.join(log_dir, "train", "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                array = tf.make_ndarray(value.tensor) if value.HasField("tensor") else np.asarray(value.simple_value)
                if array.dtype.kind == "f" and array.ndim == 0:
                    scalars.setdefault(value.tag, {})[event.step] = float(array)
    return {tag: [steps[step] for step in sorted(steps)] for tag, steps in scalars.items()}


def test_tensorboard_and_csv_logger_record_loss_lr_and_evaluation(trained):
    _, history, _, _, save_dir = trained
    scalars = _tensorboard_scalars(str(save_dir / "tensorboard"))
    for key in ("loss", "lr", "demo_eval", "demo_eval_thresh", "accuracy"):
        np.testing.assert_allclose(scalars["epoch_" + key], history[key], rtol=1e-6)
    with open(save_dir / "log.csv") as ff:
        rows = list(csv.DictReader(ff))
    assert [int(row["epoch"]) for row in rows] == [5, 6, 7]  # the last stage (ArcFace)
    for key in ("loss", "lr", "demo_eval", "arcface_loss"):
        np.testing.assert_allclose([float(row[key]) for row in rows], history[key][5:], rtol=1e-9)


def test_history_picture_is_drawn(trained):
    _, _, _, _, save_dir = trained
    with Image.open(save_dir / "tiny_hist.png") as picture:
        assert picture.format == "PNG" and picture.size[0] > 400
    assert not [name for name in os.listdir(save_dir) if ".tmp" in name]


def test_scheduler_dicts_are_not_mutated(trained):
    _, _, sch, sch_copy, _ = trained
    assert [sorted(ss) for ss in sch] == [sorted(ss) for ss in sch_copy]
    assert [ss["epoch"] for ss in sch] == [5, 3]


def test_bottleneck_only_freezes_backbone_and_keeps_epoch_counter(demo_small, tmp_path):
    tt = train.Train(
        demo_small["train_dir"], str(tmp_path / "bn.keras"), basic_model=tiny_basic_model(), batch_size=16, verbose=0
    )
    before = [ww.copy() for ww in tt.basic_model.get_weights()]
    sch = [
        {"loss": losses.ArcfaceLoss(scale=16), "optimizer": "adam", "epoch": 1, "bottleneckOnly": True},
        {"loss": losses.ArcfaceLoss(scale=16), "epoch": 1},
    ]
    seen_epochs, weights_at_epoch_end = [], []

    class Recorder(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen_epochs.append(epoch)

        def on_epoch_end(self, epoch, logs=None):
            weights_at_epoch_end.append([ww.copy() for ww in tt.basic_model.get_weights()])

    tt.custom_callbacks.append(Recorder())
    tt.train(sch, 0)
    assert seen_epochs == [0, 0]
    after_bottleneck, after_all = weights_at_epoch_end
    assert all(np.array_equal(aa, bb) for aa, bb in zip(before, after_bottleneck))  # BN moving stats too: frozen
    assert not all(np.array_equal(aa, bb) for aa, bb in zip(before, after_all))


def nan_after_six_steps(y_true, y_pred):
    """Finite for the first epochs, then NaN: the guard must stop training and keep the last good checkpoint."""
    step = nan_after_six_steps.counter
    step.assign_add(1)
    base = tf.reduce_mean(tf.square(y_pred)) * 0.01
    return tf.cond(step > 6, lambda: base * np.nan, lambda: base)  # tf.where would leak NaN into gradients


nan_after_six_steps.head_type = "triplet"


def test_nan_loss_stops_cleanly_and_keeps_checkpoint(demo_small, tmp_path):
    nan_after_six_steps.counter = tf.Variable(0, dtype=tf.int64)
    tt = train.Train(
        demo_small["train_dir"], str(tmp_path / "nan.keras"), basic_model=tiny_basic_model(), batch_size=32, verbose=0
    )
    history = tt.train([{"loss": nan_after_six_steps, "optimizer": "sgd", "epoch": 5}, {"loss": "mse", "epoch": 1}], 0)
    assert tt.stop_reason == "nan"
    # 3 steps per epoch: steps 1-6 (epochs 1, 2) are finite, step 7 (epoch 3) is NaN and stops everything
    assert len(history["loss"]) == 3 and np.isfinite(history["loss"][:2]).all() and not np.isfinite(history["loss"][2])
    saved = keras.models.load_model(tt.save_path)  # the checkpoint of epoch 2, not the NaN one
    assert all(np.isfinite(ww).all() for ww in saved.get_weights())


def test_gently_stop_reads_n_from_a_stream(tmp_path):
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd) as reader, os.fdopen(write_fd, "w") as writer:
        stopper = myCallbacks.GentlyStop(stream=reader, require_tty=False)
        model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
        stopper.set_model(model)
        model.stop_training = False
        stopper.on_epoch_end(0)
        assert not model.stop_training  # nothing typed yet: no blocking, no stop
        writer.write("y\nn\n")
        writer.flush()
        stopper.on_epoch_end(1)
        assert model.stop_training and stopper.stop_requested
    assert myCallbacks.GentlyStop(stream=open(os.devnull)).on_epoch_end(0) is None  # not a tty: harmless


@pytest.mark.parametrize("suffix", [".h5"])  # .keras runs: test_run_safety and test_preemption kill and resume them
def test_resume_after_sigkill(demo_small, tmp_path, suffix):
    """Kill a run mid-epoch with SIGKILL, restart the same script: every epoch once, centers and optimizer slots
    restored (a .h5 file's slots too, which Keras alone does not reload)."""
    job = os.path.join(HERE, "resume_job.py")
    args = [sys.executable, job, demo_small["train_dir"], str(tmp_path / f"resume{suffix}")]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    killed = subprocess.run(args + ["--kill_at_epoch", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    with open(tmp_path / "resume_hist.json") as ff:
        assert len(json.load(ff)["loss"]) == 2  # epochs 0 and 1 completed before the kill
    centers_before = np.load(tmp_path / "resume_centers.npy")
    slots_at_checkpoint = re.search(r"epoch 2 optimizer slots sum (\S+)", killed.stdout).group(1)
    resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout.lower()
    steps_per_epoch = 120 // 16
    assert f"restored optimizer iterations {2 * steps_per_epoch} slots sum {slots_at_checkpoint}" in resumed.stdout
    assert f"initial centers sum {np.abs(centers_before).sum():.4f}" in resumed.stdout
    with open(tmp_path / "resume_hist.json") as ff:
        hist = json.load(ff)
    assert len(hist["loss"]) == 4 and len(hist["lr"]) == 4
    assert hist["lr"] == pytest.approx([0.01 * 0.5 ** sum(ee >= ss for ss in (2,)) for ee in range(4)])
    assert re.search(r"epoch 4 optimizer iterations (\d+)", resumed.stdout).group(1) == str(4 * steps_per_epoch)


def _bad_folder(root):
    """3 classes x 4 demo-like random images plus three unreadable files; returns the bad file names."""
    rng = np.random.default_rng(0)
    for class_id in range(3):
        os.makedirs(os.path.join(root, str(class_id)))
        for ii in range(4):
            image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(image).save(os.path.join(root, str(class_id), f"{ii}.png"))
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(jpeg, format="JPEG")
    bad = {"0/truncated.jpg": jpeg.getvalue()[:300], "1/random.jpg": rng.bytes(500), "2/text.png": b"not a png\n"}
    for name, content in bad.items():
        with open(os.path.join(root, name), "wb") as ff:
            ff.write(content)
    return sorted(os.path.join(root, name) for name in bad)


def test_unreadable_training_images_warn_by_name_or_are_dropped_by_verification(tmp_path):
    bad = _bad_folder(str(tmp_path / "ds"))
    kwargs = dict(basic_model=tiny_basic_model(), batch_size=4, verbose=0)
    tt = train.Train(str(tmp_path / "ds"), str(tmp_path / "bad.keras"), **kwargs)
    with pytest.warns(myCallbacks.UnreadableImagesWarning) as warned:
        history = tt.train([{"loss": losses.ArcfaceLoss(scale=16), "epoch": 2}], 0)
    assert len(history["loss"]) == 2 and np.isfinite(history["loss"]).all()  # the run completed
    reported = " ".join(str(ww.message) for ww in warned)
    assert all(name in reported for name in bad) and "epoch 1: skipped" in reported
    verified = train.Train(str(tmp_path / "ds"), str(tmp_path / "v.keras"), verify_images=True, **kwargs)
    assert verified.train_ds.num_images == 12 and verified.steps_per_epoch == 3  # all three dropped up front


def test_a_corrupt_eval_image_is_refused_before_training(demo_small, tmp_path):
    bins, issame = data.load_bin(demo_small["bin_path"])
    bins[7] = bins[7][: len(bins[7]) // 3]  # truncated JPEG
    broken = data.write_bin(str(tmp_path / "broken.bin"), bins, issame)
    with pytest.raises(ValueError, match=r"broken\.bin: cannot decode image 7 \(of 400\)"):
        train.Train(demo_small["train_dir"], str(tmp_path / "x.keras"), [broken], basic_model=tiny_basic_model())
    assert not os.path.exists(tmp_path / "x.keras") and not os.path.exists(tmp_path / "x_hist.json")


def test_a_failing_evaluation_costs_neither_checkpoint_nor_history(demo_small, tmp_path):
    tt = train.Train(
        demo_small["train_dir"], str(tmp_path / "ev.keras"), [demo_small["bin_path"]],
        basic_model=tiny_basic_model(), batch_size=16, verbose=0,
    )  # fmt: skip

    def broken_embeddings():
        raise MemoryError("out of memory while embedding")

    tt.evaluators[0].compute_embeddings = broken_embeddings
    with pytest.warns(RuntimeWarning, match="demo_eval evaluation failed.*out of memory"):
        history = tt.train([{"loss": losses.ArcfaceLoss(scale=16), "optimizer": "adam", "epoch": 2}], 0)
    assert len(history["loss"]) == 2 and "demo_eval" not in history
    assert os.path.exists(tt.save_path) and json.load(open(tt.hist_path))["loss"] == history["loss"]

"""train.Train end to end on tiny demo data: training, history, checkpoints, resume, NaN and gentle stop."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import losses
import myCallbacks
import train

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_basic_model(input_shape=(32, 32, 3), emb=32):
    """A small conv net ending in a layer named ``embedding``: fast enough for tests."""
    inputs = keras.Input(input_shape)
    nn = keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(inputs)
    nn = keras.layers.BatchNormalization(momentum=0.9)(nn)
    nn = keras.layers.ReLU()(nn)
    nn = keras.layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False)(nn)
    nn = keras.layers.BatchNormalization(momentum=0.9)(nn)
    nn = keras.layers.ReLU()(nn)
    nn = keras.layers.GlobalAveragePooling2D()(nn)
    nn = keras.layers.Dense(emb, use_bias=False)(nn)
    nn = keras.layers.BatchNormalization(momentum=0.9, name="embedding")(nn)
    return keras.Model(inputs, nn, name="tiny")


@pytest.fixture(scope="module")
def trained(demo_small, tmp_path_factory):
    """Softmax then ArcFace on the small demo set; shared by the checks below."""
    keras.utils.set_random_seed(0)
    save_dir = tmp_path_factory.mktemp("ckpt")
    tt = train.Train(
        demo_small["train_dir"],
        str(save_dir / "tiny.keras"),
        eval_paths=[demo_small["bin_path"]],
        basic_model=tiny_basic_model(),
        batch_size=16,
        lr_base=0.01,
        random_status=0,
        verbose=0,
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
    assert saved == pytest.approx(history)
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

    original = tt._callbacks
    tt._callbacks = lambda *args: keras.callbacks.CallbackList([*original(*args).callbacks, Recorder()], model=args[0])
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


def test_resume_after_sigkill(demo_small, tmp_path):
    """Kill a run mid-epoch with SIGKILL, restart the same script: every epoch once, centers restored."""
    job = os.path.join(HERE, "resume_job.py")
    args = [sys.executable, job, demo_small["train_dir"], str(tmp_path / "resume.keras")]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    killed = subprocess.run(args + ["--kill_at_epoch", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    with open(tmp_path / "resume_hist.json") as ff:
        assert len(json.load(ff)["loss"]) == 2  # epochs 0 and 1 completed before the kill
    centers_before = np.load(tmp_path / "resume_centers.npy")
    resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout.lower()
    steps_per_epoch = 120 // 16
    assert f"restored optimizer iterations {2 * steps_per_epoch}" in resumed.stdout  # Adam slots come back too
    assert f"initial centers sum {np.abs(centers_before).sum():.4f}" in resumed.stdout
    with open(tmp_path / "resume_hist.json") as ff:
        hist = json.load(ff)
    assert len(hist["loss"]) == 4 and len(hist["lr"]) == 4
    assert hist["lr"] == pytest.approx([0.01 * 0.5 ** sum(ee >= ss for ss in (2,)) for ee in range(4)])

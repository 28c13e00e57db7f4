"""Training that survives preemption: a run stopped in the middle of an epoch (SIGTERM, Ctrl-C, or a kill after a
``checkpoint_minutes`` save) resumes at the saved step with the data an uninterrupted run sees there, the same
optimizer step count and each epoch once in its history; the data pipeline starts at any batch without decoding the
images before it."""

import json
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import tiny_basic_model
from preempt_job import AtUpdate, record_labels

from keras_insightface.data import pipeline as data
from keras_insightface.data import shards
from keras_insightface.nn import losses
from keras_insightface.training import preemption, run_state, train

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]), TF_CPP_MIN_LOG_LEVEL="2")


# ------------------------------------------------------------------------------------------ the data at any position
def _batches(dataset, count):
    """``count`` batches as (images, labels) numpy pairs."""
    return [(images.numpy(), targets["label"].numpy()) for images, targets in dataset.take(count)]


def _same_batches(first, second):
    assert len(first) == len(second)
    for (images_a, labels_a), (images_b, labels_b) in zip(first, second):
        np.testing.assert_array_equal(labels_a, labels_b)
        np.testing.assert_array_equal(images_a, images_b)  # augmentation too: drawn from the record's position


@pytest.fixture(scope="module")
def sources(demo_small, tmp_path_factory):
    """The demo images as a class folder, a .rec and a folder of 4 shards."""
    from keras_insightface.tools import prepare_data

    folder = tmp_path_factory.mktemp("sources")
    prepare_data.pack_folder(demo_small["train_dir"], str(folder / "rec"))
    shards.write_shards(str(folder / "rec"), str(folder / "shards"), num_shards=4, workers=1)
    return {"folder": demo_small["train_dir"], "rec": str(folder / "rec"), "shards": str(folder / "shards")}


@pytest.mark.parametrize(
    "source, options",
    [
        ("folder", dict(random_status=2)),
        ("folder", dict(image_per_class=4, random_status=0)),
        ("folder", dict(mixup_alpha=0.4, random_cutout_mask_area=0.5)),
        ("rec", dict(random_status=100)),
        ("shards", dict(random_status=3, random_crop=(28, 28, 3), shuffle_buffer=16)),
    ],
    ids=["folder", "triplets", "mixup_mask", "rec_randaugment", "shards_crop"],
)
def test_a_pipeline_started_at_any_batch_gives_the_batches_of_one_started_at_zero(sources, tmp_path, source, options):
    path = sources[source]
    dataset = data.prepare_dataset(path, 16, (32, 32), seed=7, cache_dir=str(tmp_path / "cache"), **options)
    steps = dataset.steps_per_epoch
    from_zero = _batches(dataset.dataset, steps + 5)
    _same_batches(_batches(dataset.at(1, 2), 3), from_zero[steps + 2 : steps + 5])
    again = data.prepare_dataset(path, 16, (32, 32), seed=7, cache_dir=str(tmp_path / "cache"), **options)
    _same_batches(_batches(again.at(0, 3), 2), from_zero[3:5])  # the seed alone fixes the run, in a new pipeline
    other = data.prepare_dataset(path, 16, (32, 32), seed=8, cache_dir=str(tmp_path / "cache"), **options)
    assert any((a[1] != b[1]).any() for a, b in zip(_batches(other.dataset, 2), from_zero[:2]))


def test_the_records_before_the_start_never_reach_the_decoder(sources, tmp_path, monkeypatch):
    """A pipeline started at batch B of epoch E decodes no record before that point: the decoder sees positions
    from ``(E * steps + B) * batch`` on only (later ones too, made ahead of use)."""
    decoded, make_load = [], data._decode_and_augment

    def recording(img_shape, options, is_path):
        load = make_load(img_shape, options, is_path)

        def counted(seq, *record):
            seq = tf.numpy_function(lambda position: (decoded.append(int(position)), position)[1], [seq], tf.int64)
            return load(tf.ensure_shape(seq, []), *record)

        return counted

    monkeypatch.setattr(data, "_decode_and_augment", recording)
    for path in sources.values():
        dataset = data.prepare_dataset(path, 8, (32, 32), seed=3, cache_dir=str(tmp_path / "cache"))
        decoded.clear()
        assert len(_batches(dataset.at(1, 5), 2)) == 2
        assert min(decoded) == (dataset.steps_per_epoch + 5) * 8, path


# ------------------------------------------------------------------------------------------ the trainer
def crash():
    """A crash after which only the checkpoints on disk are left."""
    raise RuntimeError("crash")


def _recording(trainer, seen):
    record_labels(trainer, seen)
    return trainer


SCHEDULE = [{"loss": losses.ArcfaceLoss(scale=16), "optimizer": "sgd", "epoch": 2}]


def _trainer(demo_small, save_path, callbacks=(), **options):
    keras.utils.set_random_seed(0)
    return train.Train(
        demo_small["train_dir"], save_path, basic_model=tiny_basic_model(), batch_size=8, seed=5, verbose=0,
        callbacks=list(callbacks), plot_history=False, **options,
    )  # fmt: skip


@pytest.mark.slow
def test_a_crash_after_a_timed_checkpoint_resumes_at_its_step_with_the_same_data(demo_small, tmp_path):
    whole, seen_whole = _trainer(demo_small, str(tmp_path / "whole.keras")), []
    _recording(whole, seen_whole).train([dict(stage) for stage in SCHEDULE], 0)
    total = 2 * whole.steps_per_epoch
    assert int(whole.optimizer.iterations.numpy()) == total

    path, seen_before = str(tmp_path / "crashed.keras"), []
    crashed = _recording(_trainer(demo_small, path, [AtUpdate(20, crash)], checkpoint_minutes=1e-9), seen_before)
    with pytest.raises(RuntimeError, match="crash"):
        crashed.train([dict(stage) for stage in SCHEDULE], 0)
    state = run_state.read_run_state(path)
    saved_step = state["step"]  # saved after every update; the crash came in the callback of update 20
    assert state["epochs"] == 1 and saved_step == 20 - whole.steps_per_epoch - 1 and state["seed"] == 5
    del crashed

    seen_after = []
    resumed = _recording(_trainer(demo_small, path), seen_after)
    history = resumed.train([dict(stage) for stage in SCHEDULE], 0)
    done = whole.steps_per_epoch + saved_step
    assert int(resumed.optimizer.iterations.numpy()) == total
    assert seen_before[:done] == seen_whole[:done]
    assert seen_after[: total - done] == seen_whole[done:total]
    assert len(history["loss"]) == 2 and len(json.load(open(resumed.hist_path))["loss"]) == 2
    np.testing.assert_allclose(history["loss"], whole.history.history["loss"], rtol=1e-4)


def test_preemption_saves_when_the_interval_passes_and_stops_on_a_signal():
    now, saved = [0.0], []
    guard = preemption.Preemption(lambda *where: saved.append(where), checkpoint_minutes=1, clock=lambda: now[0])
    with guard:
        assert signal.getsignal(signal.SIGTERM) == guard._on_signal
        assert guard.after_step(0, 1, {}) is False and saved == []
        now[0] = 61.0
        assert guard.after_step(0, 2, {"loss": 1.0}) is False and saved == [(0, 2, {"loss": 1.0})]
        assert guard.after_step(0, 3, {}) is False and len(saved) == 1  # the interval starts again at a save
        os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # a second signal is not caught
        assert guard.after_step(1, 4, {}) is True and saved[-1] == (1, 4, {})
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and preemption.exit_status(guard.received) == 143


def test_the_processes_of_a_run_take_each_decision_together():
    """With several processes, ``agree`` tells what any of them wants: another process's due save or signal saves or
    stops this one at the same step, and this one's own signal is passed to the others before it acts on it."""
    asked, others, saved = [], [np.zeros(3, bool)], []

    def agree(flags):  # what the other process wants, as a collective would tell: [save due, SIGTERM, SIGINT]
        asked.append(flags.tolist())
        return flags | others[0]

    guard = preemption.Preemption(lambda *at: saved.append(at[:2]), agree=agree)
    with guard:
        assert guard.after_step(0, 1, {}) is False and saved == [] and asked == [[False, False, False]]
        others[0] = np.array([True, False, False])
        assert guard.after_step(0, 2, {}) is False and saved == [(0, 2)]
        others[0] = np.array([False, False, True])
        assert guard.stop_at_epoch_end() is True and guard.received == signal.SIGINT
        others[0] = np.zeros(3, bool)
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.after_step(1, 1, {}) is True and asked[-1] == [False, True, False] and saved[-1] == (1, 1)
    assert guard.received == signal.SIGTERM and len(asked) == 4


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_releases_the_lock_exits_143_and_the_restart_goes_on_there(demo_small, tmp_path):
    """Two processes side by side: an uninterrupted run, and one that gets SIGTERM during update 20 (epoch 2 of
    2, 15 updates each); then the same command again resumes it. The steps after the resume see exactly the batches
    the uninterrupted run saw at those steps."""
    job = os.path.join(HERE, "preempt_job.py")

    def command(name, *extra):
        return [sys.executable, job, demo_small["train_dir"], str(tmp_path / f"{name}.keras"), *extra]

    whole = subprocess.Popen(command("whole"), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopped = subprocess.run(command("stopped", "--sigterm_at", "20"), env=ENV, capture_output=True, text=True)
    assert whole.wait(600) == 0, whole.stderr.read()[-3000:]
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert not os.path.exists(tmp_path / "stopped.keras.lock")
    state = run_state.read_run_state(str(tmp_path / "stopped.keras"))
    assert (state["epochs"], state["step"]) == (1, 5)
    resumed = subprocess.run(command("stopped"), env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runs = {name: json.load(open(tmp_path / f"{name}.keras.labels.json")) for name in ("whole", "stopped")}
    whole_run, stopped_run = runs["whole"], runs["stopped"]
    assert whole_run["iterations"] == stopped_run["iterations"] == 30
    assert stopped_run["runs"][0][:20] == whole_run["runs"][0][:20]
    assert stopped_run["runs"][1][:10] == whole_run["runs"][0][20:30]
    history = json.load(open(tmp_path / "stopped_hist.json"))
    assert len(history["loss"]) == 2 and None not in history["loss"]


def test_the_epoch_loop_asks_after_each_step_inside_an_epoch_and_never_saves_a_nan_step():
    from keras_insightface.training import callbacks as run_callbacks
    from keras_insightface.training.loop import EpochLoop

    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer="sgd")
    losses_by_step = iter([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, float("nan"), 8.0])
    saved, clock = [], iter(range(0, 10**6, 60)).__next__  # a minute passes at each look at the clock
    guard = preemption.Preemption(lambda *at: saved.append((at[0], at[1], dict(at[2]))), 0.5, clock=clock)
    loop = EpochLoop()
    loop.verbose = 0
    callbacks = keras.callbacks.CallbackList([run_callbacks.NanLossGuard()], model=model)
    run_steps = lambda iterator, num: {"loss": next(losses_by_step)}  # noqa: E731
    loop.fit(model, run_steps, None, callbacks, (0, 3), 3, 8, start=(1, {"loss": 5.0}), interrupt=guard)
    # epoch 0 resumed at step 1 (its first step's loss, 5.0, carried): saved after step 2 (step 3 ends the epoch);
    # epoch 1 after steps 1 and 2; epoch 2 after step 1; its step 2 is NaN: training stops, nothing saved
    assert saved == [(0, 2, {"loss": 6.0}), (1, 1, {"loss": 3.0}), (1, 2, {"loss": 7.0}), (2, 1, {"loss": 6.0})]
    assert model.stop_training and next(losses_by_step) == 8.0

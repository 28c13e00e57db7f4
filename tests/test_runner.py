"""The step runner: gradient accumulation and clipping (against one large batch, also under MirroredStrategy and
mixed precision), and that clipping bounds the applied update."""

import json
import os
import re
import subprocess
import sys
import time
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import tiny_basic_model

from keras_insightface.data import pipeline as data
from keras_insightface.nn import losses
from keras_insightface.training import runner, stages

HERE = os.path.dirname(os.path.abspath(__file__))


def _one_update(stage, step_runner, images, labels):
    """Trainable weights before and after one update of ``stage`` on one batch."""
    before = [var.numpy().copy() for var in stage.model.trainable_variables]
    batches = tf.data.Dataset.from_tensors((images, {data.LABEL_KEY: labels})).repeat()
    run_steps = step_runner.train_function(stage, classes=12)
    run_steps(iter(step_runner.distribute(batches, len(images))), 1)
    return before, [var.numpy() for var in stage.model.trainable_variables]


def test_clipping_bounds_the_applied_update():
    """Plain SGD with learning rate 1: the update is minus the gradient, clipped to a global norm of 1e-3 while
    keeping its direction."""
    rng = np.random.default_rng(0)
    images, labels = rng.normal(size=(8, 32, 32, 3)).astype("float32"), np.arange(8, dtype="int32")
    builder = stages.StageBuilder(tiny_basic_model(), classes=12)
    stage = builder.build(losses.ArcfaceLoss(scale=16), optimizer=keras.optimizers.SGD(1.0))
    start = [var.numpy().copy() for var in stage.model.trainable_variables]
    free_before, free_after = _one_update(stage, runner.StepRunner(tf.distribute.get_strategy()), images, labels)
    for var, value in zip(stage.model.trainable_variables, start):
        var.assign(value)
    clipped_stage = builder.build(losses.ArcfaceLoss(scale=16), optimizer=keras.optimizers.SGD(1.0))
    clip_runner = runner.StepRunner(tf.distribute.get_strategy(), clip_norm=1e-3)
    clip_before, clip_after = _one_update(clipped_stage, clip_runner, images, labels)
    free = np.concatenate([(aa - bb).ravel() for aa, bb in zip(free_after, free_before)])
    clipped = np.concatenate([(aa - bb).ravel() for aa, bb in zip(clip_after, clip_before)])
    assert np.linalg.norm(free) > 0.1  # the raw gradient is far above the bound
    assert np.linalg.norm(clipped) == pytest.approx(1e-3, rel=1e-4)
    expected = free * 1e-3 / np.linalg.norm(free)  # float32 weights of ~1 resolve updates to ~6e-8: compare norms
    assert np.linalg.norm(clipped - expected) < 1e-3 * np.linalg.norm(expected)


class BranchingLoss(losses.ArcfaceLoss):
    """ArcFace behind a Python ``if`` on a tensor value: only a step traced with autograph can run it."""

    def call(self, y_true, y_pred):
        if keras.ops.all(keras.ops.isfinite(y_pred)):
            return super().call(y_true, y_pred)
        return keras.ops.zeros_like(super().call(y_true, y_pred))


def test_a_loss_branching_on_tensors_trains_like_the_same_loss_without_the_branch():
    """The step is traced without autograph; a loss with a Python ``if`` on a tensor gets it (with a warning) and
    makes the same update as the plain loss."""
    rng = np.random.default_rng(1)
    images, labels = rng.normal(size=(8, 32, 32, 3)).astype("float32"), np.arange(8, dtype="int32")
    builder = stages.StageBuilder(tiny_basic_model(), classes=12)
    start, updates = None, []
    for loss in (losses.ArcfaceLoss(scale=16), BranchingLoss(scale=16)):
        stage = builder.build(loss, optimizer=keras.optimizers.SGD(0.5))
        start = start or [var.numpy().copy() for var in stage.model.trainable_variables]
        for var, value in zip(stage.model.trainable_variables, start):
            var.assign(value)  # both updates start from the same weights (backbone and head)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            before, after = _one_update(stage, runner.StepRunner(tf.distribute.get_strategy()), images, labels)
        traced_again = [str(item.message) for item in caught if "traced again with autograph" in str(item.message)]
        assert len(traced_again) == (1 if isinstance(loss, BranchingLoss) else 0)
        updates.append(np.concatenate([(aa - bb).ravel() for aa, bb in zip(after, before)]))
    assert np.linalg.norm(updates[0]) > 1e-3
    np.testing.assert_allclose(updates[1], updates[0], atol=1e-6)


@pytest.mark.slow
def test_accumulation_and_clipping_equal_one_large_batch(tmp_path):
    """k batches of B accumulated = one batch of k * B (no batch statistics in the model), on one device, on two
    mirrored replicas, with a clipped gradient, and in mixed precision: there to within twice the distance that the
    reduced precision alone puts between the large-batch run and its float32 twin (bfloat16 rounding differs from
    CPU to CPU: 0.088 on an AMD EPYC without bfloat16 instructions, where the accumulated run was 0.10 away)."""
    job = os.path.join(HERE, "accumulation_job.py")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    done = subprocess.run([sys.executable, job, str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = {row["name"]: row for row in map(json.loads, done.stdout.strip().splitlines())}
    tolerances = {
        "accumulate_one_device": 1e-5,
        "accumulate_mirrored": 1e-5,
        "clip_mirrored": 1e-7,
        "clip_and_accumulate_mirrored": 1e-7,
    }
    assert set(results) == {*tolerances, "accumulate_mixed_float16", "accumulate_mixed_bfloat16"}
    for name, row in results.items():
        assert row["start_diff"] == 0 and row["steps"] == row["ref_steps"] == 2, row
        if name in tolerances:
            assert row["diff"] < tolerances[name] and row["moved"] > 100 * row["diff"], row  # equal, training moved
        else:  # one batch's gradient lost would move the weights by about half of "moved"
            assert row["diff"] < 2 * row["rounding"] and row["moved"] > 20 * row["diff"], row
    assert results["clip_mirrored"]["moved"] < 0.011  # 2 updates of at most lr 0.1 x norm 0.05 (with momentum)


def test_images_per_second_counts_the_steps_that_ran(capsys):
    """An epoch of 10 steps stopped after 2: the printed rate is 2 steps' images over the time they took."""

    class Model:
        stop_training = False
        optimizer = keras.optimizers.SGD(0.1)

    class StopAfterTwo(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            self.model.stop_training = batch >= 1

    model = Model()
    callbacks = keras.callbacks.CallbackList([StopAfterTwo()], model=model)

    def run_steps(iterator, num_steps):
        time.sleep(0.1 * num_steps)
        return {"loss": tf.constant(1.0)}

    runner.StepRunner(tf.distribute.get_strategy(), verbose=1).fit(model, run_steps, None, callbacks, (0, 1), 10, 64)
    rate = float(re.search(r"([0-9.]+) images/s", capsys.readouterr().out).group(1))
    assert 100 < rate < 700  # 128 images in >= 0.2 s; dividing 10 steps' images would give > 3,000


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_the_progress_bar_ends_on_the_epoch_means_the_history_records(capsys, steps_per_execution):
    """Steps of falling loss and rising accuracy: the bar shows running means of the epoch, so its last line is the
    epoch's logged value (the last step's value would be 0.5 / 1.0 here)."""

    class Model:
        stop_training = False
        optimizer = keras.optimizers.SGD(0.1)

    recorded = {}

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            recorded.update(logs)

    values = iter([(6.5, 0.0), (4.5, 0.5), (2.5, 0.5), (0.5, 1.0)])

    def run_steps(iterator, num_steps):
        steps = [next(values) for _ in range(num_steps)]
        return {"loss": np.mean([loss for loss, _ in steps]), "accuracy": np.mean([acc for _, acc in steps])}

    step_runner = runner.StepRunner(tf.distribute.get_strategy(), steps_per_execution=steps_per_execution, verbose=1)
    callbacks = keras.callbacks.CallbackList([Record()], model=Model())
    step_runner.fit(callbacks.model, run_steps, None, callbacks, (0, 1), 4, 8)
    last_bar = [line for line in re.split(r"[\r\n]", capsys.readouterr().out) if "4/4" in line][-1]
    assert re.search(r"loss: (\S+)", last_bar).group(1) == "3.5000" and recorded["loss"] == pytest.approx(3.5)
    assert re.search(r"accuracy: (\S+)", last_bar).group(1) == "0.5000" and recorded["accuracy"] == pytest.approx(0.5)

"""The sharded head (``Train(sharded_head=...)``): on JAX with 8 host devices a step equals the replicated step, each
device holds 1/8 of the head and its slots, the cosines are never whole on a device, Partial FC samples on each shard
and updates only the sampled rows, a short run matches the replicated run, and a run killed on 8 devices resumes on 4
and exports on 1 as any other; on the TensorFlow backend the option stops in one line."""

import json
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
from helpers import on_tensorflow

from keras_insightface.models import zoo as models
from keras_insightface.nn import heads
from keras_insightface.training import train
from keras_insightface.training.config import TrainConfig

HERE = os.path.dirname(os.path.abspath(__file__))


def run_job(modes, devices, out_dir, demo, expect_kill=False):
    """``sharded_head_job.py`` with ``devices`` host devices on JAX; its results by mode (None when killed)."""
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PYTHONPATH=os.path.dirname(HERE),
        JAX_PLATFORMS="cpu",
    )
    job = [sys.executable, os.path.join(HERE, "sharded_head_job.py"), modes, str(out_dir)]
    done = subprocess.run(
        job + [demo["train_dir"], demo["bin_path"]], env=env, capture_output=True, text=True, timeout=600
    )
    if expect_kill:
        assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
        return None
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.split("RESULT")[-1]), done.stdout


# ---------------------------------------------------------------------------------------------- any backend
def test_the_option_takes_true_or_a_device_count():
    assert TrainConfig.from_options({}).sharded_head is False
    for bad in ("yes", 0, 1.5, None):
        with pytest.raises(ValueError, match="sharded_head"):
            TrainConfig.from_options({"sharded_head": bad})


def test_optimizer_slots_saved_with_or_without_padding_classes_fit_the_head_they_load_into():
    """A sharded run's checkpoint resumes without ``sharded_head`` and the reverse: a slot is cut to, or padded with
    zero classes to, the head's class count (the padding sits at the end of the class axis)."""
    saved = np.arange(12.0).reshape(2, 6)  # 2 x (4 real classes + 2 padding columns, zero in a real checkpoint)
    np.testing.assert_array_equal(heads.fit_to_shape(saved, (2, 4)), [[0, 1, 2, 3], [6, 7, 8, 9]])
    np.testing.assert_array_equal(heads.fit_to_shape(saved[:, :4], (2, 6))[:, 4:], np.zeros((2, 2)))
    np.testing.assert_array_equal(heads.fit_to_shape(saved, (2, 6)), saved)
    for shape in ((3, 4), (2, 6, 1)):
        with pytest.raises(ValueError, match="does not fit"):
            heads.fit_to_shape(saved, shape, "run.keras: a saved optimizer slot")


@pytest.mark.skipif(not on_tensorflow(), reason="the TensorFlow backend's refusal")
def test_on_tensorflow_the_option_stops_in_one_line_before_any_work(tmp_path):
    with pytest.raises(ValueError) as refused:
        train.Train(str(tmp_path / "no_data"), str(tmp_path / "run.keras"), basic_model=None, sharded_head=True)
    message = str(refused.value)
    assert "\n" not in message and "JAX backend (KERAS_BACKEND=jax)" in message and "sharded_head=True" in message
    assert os.listdir(tmp_path) == []  # no lock, no checkpoint folder, no cache: refused at the options


# ---------------------------------------------------------------------------------------------- 8 host devices
@pytest.fixture(scope="module")
def eight_devices(demo_small, tmp_path_factory):
    return run_job("step,partial,demo", 8, tmp_path_factory.mktemp("eight"), demo_small)[0]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["arcface", "magface_subcenter", "arcface_groups_of_4"])
def test_a_sharded_step_equals_the_replicated_step(eight_devices, case):
    """Same start, same batch: the loss, the updated kernel and its momentum agree to 1e-5 (relative); with the head
    over all 8 devices, and over groups of 4 (``sharded_head=4``: two copies, each batch split over all 8)."""
    row = eight_devices["step"][case]
    assert eight_devices["step"]["devices"] == 8
    sharded, replicated = row["loss"]
    assert np.isfinite(replicated) and abs(sharded - replicated) <= 1e-5 * abs(replicated)
    assert row["kernel_diff"] <= 1e-5 and row["slot_diff"] <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, top_k, split", [("arcface", 1, 8), ("magface_subcenter", 3, 8), ("arcface_groups_of_4", 1, 4)]
)
def test_each_device_holds_its_share_of_the_head_and_its_momentum(eight_devices, case, top_k, split):
    """An eighth on each of the 8 devices; a quarter with ``sharded_head=4``."""
    row = eight_devices["step"][case]
    total = 8192 * top_k * 32 * 4  # classes x K x embedding x float32: no padding at 8192 classes
    for per_device, whole in (row["kernel_bytes"], row["slot_bytes"]):
        assert whole == total and per_device == [total // split]  # every one of the 8 devices


@pytest.mark.slow
def test_a_head_whose_classes_do_not_divide_is_padded_with_zero_classes(eight_devices):
    """262,100 classes on 8 devices: 262,144 columns (a multiple of 128), 1/8 on each device; Glorot-normal real
    columns (std sqrt(2 / (32 + 262,100))) and all-zero padding columns (Keras initializes a head this big sharded)."""
    row = eight_devices["step"]["padded_head"]
    assert row["shape"] == [32, 262_144] and row["per_device"] == [[32 * 262_144 * 4 // 8], 32 * 262_144 * 4]
    assert row["padding_max"] == 0 and row["real_std"] == pytest.approx((2 / (32 + 262_100)) ** 0.5, rel=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("case, top_k", [("arcface", 1), ("magface_subcenter", 3)])
def test_the_step_never_holds_the_whole_batch_x_classes_cosines_on_a_device(eight_devices, case, top_k):
    """The compiled step's scratch memory per device is below one full ``64 x classes * K`` float32 matrix on 8
    devices; the replicated step's is above it (it holds several)."""
    sharded, replicated = eight_devices["step"][case]["temp"]
    full_cosines = 64 * 8192 * top_k * 4
    assert sharded < full_cosines < replicated


@pytest.mark.slow
def test_partial_fc_on_shards_keeps_the_batch_classes_and_samples_its_count_per_shard(eight_devices):
    """1024 classes on 8 shards of 128, rate 0.25: 32 sorted classes of its own slice per shard, every label among
    them, the remapped labels pointing at them."""
    row = eight_devices["partial"]
    columns, labels = np.array(row["columns"]), np.array(row["labels"])
    assert columns.shape == (8 * 32,)
    for shard, own in enumerate(np.split(columns, 8)):
        assert np.all(np.diff(own) > 0) and own.min() >= 128 * shard and own.max() < 128 * (shard + 1)
        assert set(labels[labels // 128 == shard]) <= set(own)
    np.testing.assert_array_equal(columns[row["remapped"]], labels)


@pytest.mark.slow
def test_partial_fc_on_shards_updates_only_the_sampled_rows_as_one_device_would(eight_devices):
    """Against one device: the loss over the same sampled classes, the gradient by JAX, and SGD with momentum 0.9
    applied in numpy to the sampled rows only (the momentum started random: a dense update would move every row)."""
    row = eight_devices["partial"]
    sharded, reference = row["loss"]
    assert abs(sharded - reference) <= 1e-5 * abs(reference)
    assert row["kernel_diff"] <= 1e-5 and row["slot_diff"] <= 1e-5
    sampled_rows = sorted(2 * column + k for column in row["columns"] for k in range(2))  # 2 sub-centers each
    assert row["changed_rows"] == sampled_rows and row["changed_slot_rows"] == sampled_rows


@pytest.mark.slow
def test_a_short_sharded_run_reaches_the_replicated_runs_accuracy(eight_devices):
    """Three epochs on the demo set (12 classes: padded to 128 on 8 devices) against the same run on one device,
    with center-loss and triplet outputs beside the head (their losses agree too)."""
    sharded, replicated = eight_devices["demo"]["sharded"], eight_devices["demo"]["replicated"]
    for key in ("loss", "center_embedding_loss", "triplet_embedding_loss"):
        np.testing.assert_allclose(sharded[key], replicated[key], rtol=1e-4)
    np.testing.assert_allclose(sharded["accuracy"], replicated["accuracy"], atol=1 / 112)  # one image of an epoch
    np.testing.assert_allclose(sharded["demo_eval"], replicated["demo_eval"], atol=0.01)
    assert sharded["accuracy"][-1] > 1.5 / 12 and sharded["loss"][-1] < sharded["loss"][0]  # it learns (chance: 1/12)


# ---------------------------------------------------------------------------------------------- 8 -> 4 -> 1
@pytest.mark.slow
def test_a_run_killed_on_8_devices_resumes_on_4_and_exports_on_1(demo_small, tmp_path):
    run_job("kill", 8, tmp_path, demo_small, expect_kill=True)
    result, stdout = run_job("resume", 4, tmp_path, demo_small)
    resumed = result["resume"]
    assert resumed["devices"] == 4 and "1 epochs already done" in stdout
    checkpoint, start, end = resumed["checkpoint"], resumed["start"], resumed["end"]
    np.testing.assert_array_equal(start["kernel"], checkpoint["kernel"])  # the 8-device checkpoint, on 4 devices
    assert start["iterations"] == checkpoint["iterations"] == 7 and start["slots_sum"] == checkpoint["slots_sum"] > 0
    assert end["iterations"] == 14 and len(resumed["loss"]) == 2  # the second epoch only, once
    assert end["kernel_bytes"] == [[128 * 2 * 32 * 4 // 4], 128 * 2 * 32 * 4]  # 12 classes padded to 128, 2 centers
    # one device, no sharding (this backend): the checkpoint holds the 12 x 2 real centers, and its optimizer (slots
    # saved for 128 padded classes) loads onto this head as a resume without sharded_head does; the embedding model
    # loads and exports as from any run
    full = models.load_model(str(tmp_path / "run.keras"), compile=True)
    assert full.get_layer("arcface").kernel.shape == (32, 24)
    np.testing.assert_allclose(full.get_layer("arcface").class_centers(), end["kernel"], rtol=1e-6)
    slots = [var for var in full.optimizer.variables if var.shape == (32, 24)]
    assert int(full.optimizer.iterations.value) == 14 and len(slots) == 1
    assert float(np.abs(np.asarray(slots[0].value)).sum()) == pytest.approx(end["slots_sum"], rel=1e-6)
    basic = models.extract_basic_model(full)
    images, expected = np.load(tmp_path / "probe_images.npy"), np.load(tmp_path / "probe_embeddings.npy")
    np.testing.assert_allclose(np.asarray(basic(images)), expected, rtol=1e-4, atol=1e-5)
    if on_tensorflow():
        pytest.importorskip("tf2onnx")
        from keras_insightface.tools import export

        onnx_path = export.export_model(basic, tmp_path / "basic.onnx", format="onnx")
        np.testing.assert_allclose(export.onnx_predict(onnx_path, images), expected, rtol=1e-4, atol=1e-4)
    keras.backend.clear_session()

"""Train on the JAX backend: two (host) devices with DataParallel equal one device, and a model trained on JAX
loads on TensorFlow with the same embeddings."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from helpers import free_ports, run_together, write_tagged_rec

from keras_insightface.models import zoo as models
from keras_insightface.training import run_state

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.slow  # a JAX process that trains


def test_jax_data_parallel_equals_one_device_and_the_model_loads_on_tensorflow(tmp_path):
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        PYTHONPATH=os.path.dirname(HERE),
    )
    job = [sys.executable, os.path.join(HERE, "jax_parallel_job.py"), str(tmp_path)]
    done = subprocess.run(job, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT")[-1])
    assert result["devices"] == 2
    for name in ("arcface_center", "triplet"):  # BN statistics, center-loss state and triplet mining: global batch
        row = result[name]
        assert len(row["loss_single"]) == 2 and np.isfinite(row["loss_single"]).all()
        assert row["loss_diff"] < 1e-4 and row["weight_diff"] < 1e-4, (name, row)
    assert result["interrupted_moved"] > 1e-4 and result["interrupted_diff"] == 0  # an interrupt loses no weights
    if keras.backend.backend() == "tensorflow":
        basic = models.extract_basic_model(models.load_model(result["saved"]))
        images = np.load(tmp_path / "probe_images.npy")
        np.testing.assert_allclose(basic(images), np.load(tmp_path / "jax_embeddings.npy"), atol=1e-5)


def test_two_jax_processes_read_their_own_halves_of_a_rec_train_in_step_and_stop_together(tmp_path):
    """Two processes joined by ``jax.distributed`` (loopback, gloo): each reads its own half of a .rec's images into
    the global batch, together every image once per epoch; they train in step, and when SIGTERM reaches only the
    second one during update 1 of 2, both save at that step and exit 143 with the same weights."""
    rec_dir = str(tmp_path / "rec")
    write_tagged_rec(rec_dir, [3, 2, 4, 3, 4])  # 16 tagged images: per epoch 2 global batches of 8
    port = str(free_ports(1)[0])
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
    job = os.path.join(HERE, "jax_multiprocess_job.py")
    sigterm_at = {0: [], 1: ["1"]}  # the second process sends itself SIGTERM during update 1
    commands = [[sys.executable, job, port, str(index), rec_dir, str(tmp_path), *sigterm_at[index]] for index in (0, 1)]
    stdouts = run_together(commands, env, timeout=600, status=143)
    results = [json.loads(stdout.split("RESULT")[-1]) for stdout in stdouts]
    first, second = sorted(results, key=lambda row: row["index"])
    assert first["processes"] == 2 and first["devices"] == 2 and first["chief"] and not second["chief"]
    for mine, theirs in zip(first["tags"], second["tags"]):
        assert len(mine) == len(theirs) == 8 and sorted(mine + theirs) == list(range(16))
    assert first["updates"] == second["updates"] == 1 and first["iterations"] == second["iterations"] == 1
    assert np.isfinite(first["trainable"]) and first["trainable"] == pytest.approx(second["trainable"], rel=1e-6)
    assert all("saved; the same command or script resumes it" in stdout for stdout in stdouts)
    state = run_state.read_run_state(str(tmp_path / "mp.keras"))
    assert (state["epochs"], state["step"]) == (0, 1)

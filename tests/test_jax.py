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


def test_two_jax_processes_read_their_own_halves_of_a_rec_and_train_in_step(tmp_path):
    """Two processes joined by ``jax.distributed`` (loopback, gloo): each reads its own half of a .rec's images
    into the global batch, together every image once per epoch, and both end with the same weights."""
    rec_dir = str(tmp_path / "rec")
    write_tagged_rec(rec_dir, [3, 2, 4, 3, 4])  # 16 tagged images: per epoch 2 global batches of 8
    port = str(free_ports(1)[0])
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
    job = os.path.join(HERE, "jax_multiprocess_job.py")
    commands = [[sys.executable, job, port, str(index), rec_dir, str(tmp_path)] for index in range(2)]
    results = [json.loads(stdout.split("RESULT")[-1]) for stdout in run_together(commands, env, timeout=600)]
    first, second = sorted(results, key=lambda row: row["index"])
    assert first["processes"] == 2 and first["devices"] == 2 and first["chief"] and not second["chief"]
    for mine, theirs in zip(first["tags"], second["tags"]):
        assert len(mine) == len(theirs) == 8 and sorted(mine + theirs) == list(range(16))
    assert first["loss"] == second["loss"] and np.isfinite(first["loss"]).all()
    assert first["trainable"] == pytest.approx(second["trainable"], rel=1e-6)

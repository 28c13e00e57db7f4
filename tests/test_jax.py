"""Train on the JAX backend: two (host) devices with DataParallel equal one device, and a model trained on JAX
loads on TensorFlow with the same embeddings."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import models

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

"""Multi-device training: MirroredStrategy over 2 logical CPUs equals one device; 2-worker MultiWorker on loopback.

Both run in subprocesses: logical devices and TF_CONFIG must be set before TensorFlow initializes.
"""

import json
import os
import subprocess
import sys

import pytest
from helpers import free_ports, run_together, write_tagged_rec

from keras_insightface.data import shards
from keras_insightface.training import run_state

pytestmark = pytest.mark.slow  # trains models or starts processes

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]), TF_CPP_MIN_LOG_LEVEL="2")


def _json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_mirrored_strategy_matches_one_device(tmp_path):
    done = subprocess.run(
        [sys.executable, os.path.join(HERE, "mirrored_job.py"), str(tmp_path)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = {row["name"]: row for row in _json_lines(done.stdout)}
    assert set(results) == {"softmax", "arcface", "center", "triplet", "arcface_triplet"}
    for name, row in results.items():
        assert row["loss_diff"] < 1e-4 * max(1.0, abs(row["loss_single"][0])), (name, row)
        assert row["weight_diff"] < 1e-4, (name, row)
        assert row["loss_single"][1] != row["loss_single"][0]  # the two epochs really trained


def test_two_worker_multiworker_epoch_stopped_by_sigterm_on_one_worker_resumes(demo_small, tmp_path):
    """Two workers train in step; SIGTERM reaches only the second one during update 4 of 7: both save at that same
    step and exit 143 (neither waits forever for the other's collectives). Started again, both go on at update 5
    with the same step count as an uninterrupted epoch; each reads its own half of a .rec and of a shard folder,
    and together they see every image once per epoch."""
    rec_dir, shard_dir = str(tmp_path / "tagged_rec"), str(tmp_path / "tagged_shards")
    write_tagged_rec(rec_dir, [3, 2, 4, 3, 4])  # 16 tagged images: one step of 8 images per worker and epoch
    shards.write_shards(rec_dir, shard_dir, num_shards=4, cache_dir=str(tmp_path / "cache"), progress=False)
    job = os.path.join(HERE, "multiworker_job.py")

    def commands(*extra_of_second):
        ports = [str(port) for port in free_ports(2)]
        args = [demo_small["train_dir"], str(tmp_path), rec_dir, shard_dir]
        return [[sys.executable, job, *ports, "0", *args], [sys.executable, job, *ports, "1", *args, *extra_of_second]]

    stopped = run_together(commands("--sigterm_at", "4"), ENV, timeout=400, status=143)
    assert all("saved; the same command or script resumes it" in stdout for stdout in stopped)
    assert not os.path.exists(tmp_path / "mw.keras.lock")
    state = run_state.read_run_state(str(tmp_path / "mw.keras"))
    assert (state["epochs"], state["step"]) == (0, 4)
    outputs = [_json_lines(stdout)[-1] for stdout in run_together(commands(), ENV, timeout=400)]
    chief, other = sorted(outputs, key=lambda row: row["index"])
    assert chief["chief"] and not other["chief"] and chief["workers"] == other["workers"] == 2
    assert chief["updates"] == other["updates"] == 3 and chief["iterations"] == other["iterations"] == 7
    assert chief["loss"] == pytest.approx(other["loss"]) and len(chief["loss"]) == 1
    assert chief["trainable"] == pytest.approx(other["trainable"], rel=1e-6)  # workers stay in sync
    assert os.path.exists(tmp_path / "mw.keras") and os.path.exists(tmp_path / "mw_hist.json")
    assert os.path.exists(tmp_path / "worker_1" / "mw.keras")  # the non-chief never overwrites the chief's files
    for path in (rec_dir, shard_dir):
        for first, second in zip(chief["tags"][path], other["tags"][path]):
            assert len(first) == len(second) == 8 and sorted(first + second) == list(range(16)), path


def test_distribute_option_opens_the_strategy_scope():
    import tensorflow as tf

    from keras_insightface.training import train

    with train.distribution_scope("mirrored"):
        assert isinstance(tf.distribute.get_strategy(), tf.distribute.MirroredStrategy)
    assert not isinstance(tf.distribute.get_strategy(), tf.distribute.MirroredStrategy)
    with train.distribution_scope(None):
        assert not isinstance(tf.distribute.get_strategy(), tf.distribute.MirroredStrategy)

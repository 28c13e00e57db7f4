"""A run's files under crashes and misuse: a SIGKILL at every write of an epoch end resumes with each epoch trained
once, the checkpoint's stored state wins over the side files, a killed run's temporary files are removed, and one
live run owns a save path."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np
import pytest

import myCallbacks
import run_lock
import run_state
from run_files import RunFiles

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]), TF_CPP_MIN_LOG_LEVEL="2")


def _tiny_model():
    inputs = keras.Input((3,))
    return keras.Model(inputs, keras.layers.Dense(2, name="embedding")(inputs))


# ------------------------------------------------------------------------------------------ the stored state
@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_run_state_travels_inside_the_checkpoint_and_keras_still_loads_it(tmp_path, suffix):
    path = str(tmp_path / f"model{suffix}")
    model = _tiny_model()
    state = {"epochs": 2, "history": {"loss": [3.0, 2.5]}}
    centers = np.arange(6, dtype="float32").reshape(3, 2)
    myCallbacks.save_model_atomic(model, path, (state, {"centers": centers}))
    assert run_state.read_run_state(path)[0] == state
    np.testing.assert_array_equal(run_state.read_run_state(path)[1]["centers"], centers)
    reloaded = keras.models.load_model(path)
    for saved, original in zip(reloaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(saved, original)
    plain = str(tmp_path / f"plain{suffix}")
    model.save(plain)
    assert run_state.read_run_state(plain) == (None, {})


def _checkpoint_with_state(files, epochs, history, centers):
    myCallbacks.save_model_atomic(
        _tiny_model(), files.save_path, ({"epochs": epochs, "history": history}, {"centers": centers})
    )


def test_a_history_file_behind_the_checkpoint_is_completed_from_it(tmp_path):
    """The state the killed run left: checkpoint of epoch 2, history of epoch 1, centers of epoch 1."""
    files = RunFiles(str(tmp_path / "run.keras"), None)
    stored = {"loss": [5.0, 4.0], "lr": [0.1, 0.1], "bin": [0.6, None]}
    _checkpoint_with_state(files, 2, stored, np.full((3, 2), 2.0, "float32"))
    with open(files.hist_path, "w") as ff:
        json.dump({"loss": [5.0], "lr": [0.1], "bin": [0.6]}, ff)
    np.save(files.centers_path, np.full((3, 2), 1.0, "float32"))
    history = myCallbacks.MyHistory(files.hist_path)
    assert files.reconcile(history)
    assert history.history == stored and json.load(open(files.hist_path)) == stored
    np.testing.assert_array_equal(np.load(files.centers_path), np.full((3, 2), 2.0))


def test_a_history_file_ahead_of_the_checkpoint_is_cut_to_it(tmp_path):
    """A NaN epoch is recorded in the history but not checkpointed: it is trained again, not skipped."""
    files = RunFiles(str(tmp_path / "run.keras"), None)
    _checkpoint_with_state(files, 1, {"loss": [5.0]}, np.zeros((3, 2), "float32"))
    with open(files.hist_path, "w") as ff:
        json.dump({"loss": [5.0, float("nan")], "bin": [0.6, 0.0]}, ff)
    history = myCallbacks.MyHistory(files.hist_path)
    assert files.reconcile(history)
    assert history.history == {"loss": [5.0], "bin": [0.6]}  # the file's own epoch-1 entries (with evaluation) kept


def test_a_checkpoint_without_stored_state_resumes_from_the_history_file(tmp_path):
    files = RunFiles(str(tmp_path / "old.keras"), None)
    _tiny_model().save(files.save_path)
    history = myCallbacks.MyHistory(files.hist_path)
    assert not files.reconcile(history)  # no history either: nothing to resume
    history.history = {"loss": [1.0, 0.5]}
    assert files.reconcile(history) and history.completed_epochs == 2


# ------------------------------------------------------------------------------------------ SIGKILL at every write
def _kill_run(demo_small, folder, number, when):
    command = [sys.executable, os.path.join(HERE, "kill_at_write_job.py"), demo_small["train_dir"]]
    command += [demo_small["bin_path"], str(folder / "run.keras"), "--kill", str(number), "--when", when]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode in (0, -signal.SIGKILL), done.stderr[-3000:]
    replaced = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("REPLACE ")]
    return done.returncode == 0, ["run_basic" if name.startswith("run_basic_") else name for name in replaced]


def _resume_in_process(demo_small, folder):
    import kill_at_write_job as job

    with pytest.warns(RuntimeWarning, match="taking over the lock"):  # the killed process left its lock
        trainer = job.make_trainer(demo_small["train_dir"], demo_small["bin_path"], str(folder / "run.keras"))
    leftovers = [name for name in os.listdir(folder) if ".tmp" in name]
    history = trainer.train([dict(stage) for stage in job.SCHEDULE], 0)
    return trainer, history, leftovers


@pytest.mark.slow  # 12 processes of a tiny 2-epoch run, two at a time
def test_a_sigkill_at_every_write_of_an_epoch_end_resumes_each_epoch_once(demo_small, tmp_path):
    """Each write of the second epoch end (checkpoint, centers, best basic model, history, plot, in this order) is
    interrupted by a SIGKILL just before and just after its rename; the resumed run then has 2 x 7 optimizer steps, two history
    entries per key and no temporary file."""
    points = [(number, when) for number in range(1, 7) for when in ("before", "after")]
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda point: _kill_run(demo_small, tmp_path / f"{point[0]}{point[1]}", *point), points))
    completed = [(point, replaced) for point, (done, replaced) in zip(points, runs) if done]
    assert completed, "every run was killed: more than 5 writes at an epoch end?"
    writes = completed[0][1]
    assert writes == ["run.keras", "run_centers.npy", "run_basic", "run_hist.json", "run_hist.png"]
    killed = [point for point, (done, _) in zip(points, runs) if not done]
    assert len(killed) == 2 * len(writes)  # every write, before and after
    assert all(runs[points.index(point)][1] == writes[: point[0]] for point in killed)  # at the same writes
    for number, when in killed:
        folder = tmp_path / f"{number}{when}"
        trainer, history, leftovers = _resume_in_process(demo_small, folder)
        point = f"killed {when} {writes[number - 1]}"
        assert int(trainer.optimizer.iterations.numpy()) == 2 * trainer.steps_per_epoch, point
        assert len(history["loss"]) == len(history["lr"]) == len(history["arcface_loss"]) == 2, (point, history)
        assert all(len(values) <= 2 for values in history.values()), (point, history)  # the evaluation may be missed
        assert np.isfinite(history["loss"]).all() and history["loss"] == json.load(open(trainer.hist_path))["loss"]
        assert not [name for name in os.listdir(folder) if ".tmp" in name], point
        assert when == "after" or number > 1 or leftovers == [], point  # removed at construction, before training
        del trainer


# ------------------------------------------------------------------------------------------ temporary files, lock
def test_a_killed_runs_temporary_files_are_removed_and_other_runs_files_kept(tmp_path):
    names = {
        ".run.keras.ab12cd34.tmp.keras": False,
        ".run_hist.json.x_y_z123.tmp.json": False,
        ".run_centers.npy.qwertyui.tmp.npy": False,
        ".run_basic_lfw_epoch_3_0.990000.keras.aaaaaaaa.tmp.keras": False,
        ".runner.keras.ab12cd34.tmp.keras": True,  # another run's (save path runner.keras)
        ".run.keras.lock.ab12cd34": True,  # not a temporary file of atomic writes
        "run.keras": True,
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    files = RunFiles(str(tmp_path / "run.keras"), None)
    files.claim()
    assert sorted(os.listdir(tmp_path)) == sorted([name for name, kept in names.items() if kept] + ["run.keras.lock"])
    del files
    assert "run.keras.lock" not in os.listdir(tmp_path)  # released with the run


def _hold_lock_in_another_process(lock_path):
    code = textwrap.dedent(f"""
        import sys, time, run_lock
        lock = run_lock.RunLock({lock_path!r}).acquire()
        print("held", flush=True)
        time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_on_the_same_save_path_stops_at_construction(demo_small, tmp_path):
    from helpers import tiny_basic_model

    import train

    save_path = str(tmp_path / "busy.keras")
    holder = _hold_lock_in_another_process(save_path + ".lock")
    try:
        with pytest.raises(run_lock.RunLockedError, match=r"busy\.keras is in use by another training run \(pid "):
            train.Train(demo_small["train_dir"], save_path, basic_model=tiny_basic_model())
        assert not os.path.exists(tmp_path / "busy_hist.json")
    finally:
        holder.kill()
        holder.wait()
    with pytest.warns(RuntimeWarning, match=rf"taking over the lock .*process {holder.pid} .* is gone"):
        trainer = train.Train(demo_small["train_dir"], save_path, basic_model=tiny_basic_model())
    assert json.load(open(save_path + ".lock"))["pid"] == os.getpid()
    again = train.Train(demo_small["train_dir"], save_path, basic_model=tiny_basic_model())  # same process: allowed
    del trainer, again


def test_the_lock_is_released_with_its_run_and_refuses_other_hosts(tmp_path, monkeypatch):
    path = str(tmp_path / "x.keras.lock")
    lock = run_lock.RunLock(path).acquire()
    assert json.load(open(path))["token"] == lock.token
    del lock
    assert not os.path.exists(path)
    with open(path, "w") as ff:
        json.dump({"pid": 1, "host": "elsewhere", "started": "2026-01-01T00:00:00"}, ff)
    with pytest.raises(run_lock.RunLockedError, match="on elsewhere.*if that run is gone, delete .*x.keras.lock"):
        run_lock.RunLock(path).acquire()

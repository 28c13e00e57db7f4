"""A run's files under crashes and misuse: a SIGKILL at every write of an epoch end resumes with each epoch trained
once, the checkpoint's stored state wins over the side files, a killed run's temporary files are removed, and one
live run owns a save path."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np
import pytest

from keras_insightface.training import callbacks as myCallbacks
from keras_insightface.training import run_lock, run_state
from keras_insightface.training.run_files import RunFiles

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]), TF_CPP_MIN_LOG_LEVEL="2")


def _tiny_model():
    inputs = keras.Input((3,))
    return keras.Model(inputs, keras.layers.Dense(2, name="embedding")(inputs))


# ------------------------------------------------------------------------------------------ the stored record
@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_the_record_travels_inside_the_checkpoint_and_keras_still_loads_it(tmp_path, suffix):
    import zipfile

    path = str(tmp_path / f"model{suffix}")
    model = _tiny_model()
    state = {"epochs": 2, "logs": {"loss": 2.5, "lr": 0.1}, "centers_sha256": "ab" * 32}
    myCallbacks.save_model_atomic(model, path, state)
    assert run_state.read_run_state(path) == state
    if suffix == ".keras":  # a comment, not a member: Keras loads its three members without extracting anything
        assert sorted(zipfile.ZipFile(path).namelist()) == ["config.json", "metadata.json", "model.weights.h5"]
    reloaded = keras.models.load_model(path)
    for saved, original in zip(reloaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(saved, original)
    plain = str(tmp_path / f"plain{suffix}")
    model.save(plain)
    assert run_state.read_run_state(plain) is None


def test_the_centers_checksum_covers_dtype_shape_and_values():
    import hashlib

    values = np.arange(6, dtype="float32").reshape(3, 2)
    expected = hashlib.sha256(b"<f4(3, 2)" + values.tobytes()).hexdigest()
    assert run_state.array_checksum(values) == expected
    assert run_state.array_checksum(values.reshape(2, 3)) != expected
    assert run_state.array_checksum(values.astype("float64")) != expected


def _checkpoint_with_record(files, epochs, logs, centers=None):
    record = {"epochs": epochs, "logs": logs}
    if centers is not None:
        record["centers_sha256"] = run_state.array_checksum(centers)
    myCallbacks.save_model_atomic(_tiny_model(), files.save_path, record)


def test_a_history_file_behind_the_checkpoint_is_completed_from_it(tmp_path):
    """The state a run killed after its checkpoint rename left: checkpoint of epoch 2, history of epoch 1, and the
    centers of epoch 2 already written (the previous file holds those of epoch 1)."""
    files = RunFiles(str(tmp_path / "run.keras"), None)
    centers_1, centers_2 = np.full((3, 2), 1.0, "float32"), np.full((3, 2), 2.0, "float32")
    _checkpoint_with_record(files, 2, {"loss": 4.0, "lr": 0.1}, centers_2)
    with open(files.hist_path, "w") as ff:
        json.dump({"loss": [5.0], "lr": [0.1], "bin": [0.6]}, ff)
    np.save(files.centers_path, centers_2)
    np.save(files.previous_centers_path, centers_1)
    history = myCallbacks.MyHistory(files.hist_path)
    assert files.reconcile(history)
    expected = {"loss": [5.0, 4.0], "lr": [0.1, 0.1], "bin": [0.6]}  # the evaluation of epoch 2 never ran
    assert history.history == expected and json.load(open(files.hist_path)) == expected
    np.testing.assert_array_equal(np.load(files.centers_path), centers_2)


def test_centers_written_before_a_checkpoint_that_was_not_are_rolled_back(tmp_path):
    """Killed between the centers of epoch 2 and the checkpoint: the checkpoint of epoch 1 gets its own centers."""
    files = RunFiles(str(tmp_path / "run.keras"), None)
    centers_1, centers_2 = np.full((3, 2), 1.0, "float32"), np.full((3, 2), 2.0, "float32")
    _checkpoint_with_record(files, 1, {"loss": 5.0}, centers_1)
    with open(files.hist_path, "w") as ff:
        json.dump({"loss": [5.0]}, ff)
    np.save(files.centers_path, centers_2)
    np.save(files.previous_centers_path, centers_1)
    assert files.reconcile(myCallbacks.MyHistory(files.hist_path))
    np.testing.assert_array_equal(np.load(files.centers_path), centers_1)
    os.remove(files.previous_centers_path)
    np.save(files.centers_path, centers_2)
    with pytest.warns(RuntimeWarning, match=r"centers it was saved with are not on disk; going on with those in"):
        files.reconcile(myCallbacks.MyHistory(files.hist_path))


def test_a_history_file_ahead_of_the_checkpoint_is_cut_to_it(tmp_path):
    """A NaN epoch is recorded in the history but not checkpointed: it is trained again, not skipped."""
    files = RunFiles(str(tmp_path / "run.keras"), None)
    _checkpoint_with_record(files, 1, {"loss": 5.0})
    with open(files.hist_path, "w") as ff:
        json.dump({"loss": [5.0, float("nan")], "bin": [0.6, 0.0]}, ff)
    history = myCallbacks.MyHistory(files.hist_path)
    assert files.reconcile(history)
    assert history.history == {"loss": [5.0], "bin": [0.6]}  # the file's own epoch-1 entries (with evaluation) kept


def test_a_checkpoint_without_a_record_resumes_from_the_history_file(tmp_path):
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

    temporary = lambda: [name for name in os.listdir(folder) if ".tmp" in name]  # noqa: E731
    left = temporary()
    with pytest.warns(RuntimeWarning, match="taking over the lock"):  # the killed process left its lock
        trainer = job.make_trainer(demo_small["train_dir"], demo_small["bin_path"], str(folder / "run.keras"))
    assert temporary() == []  # removed at construction, before any training
    history = trainer.train([dict(stage) for stage in job.SCHEDULE], 0)
    return trainer, history, left


@pytest.mark.slow  # 8 processes of a tiny 2-epoch run, two at a time
def test_a_sigkill_at_every_write_of_an_epoch_end_resumes_each_epoch_once(demo_small, tmp_path):
    """Each write of the second epoch end (centers: the old file moved aside, the new one written; the previous
    checkpoint kept; checkpoint; best basic model; history; plot, in this order) is interrupted by a SIGKILL just before its rename, when its temporary
    file is complete (a kill just after a rename leaves the files a kill before the next one does, less that
    temporary file); the resumed run then has 2 x 7 optimizer steps, two history entries per key and no temporary
    file. The kill before the history's rename is the classic case: a checkpoint of epoch 2, a history of epoch 1."""
    points = range(1, 9)
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda number: _kill_run(demo_small, tmp_path / str(number), number, "before"), points))
    completed = [replaced for done, replaced in runs if done]
    assert completed, "every run was killed: more than 7 writes at an epoch end?"
    writes = completed[0]
    assert writes == [
        "run_centers_previous.npy",
        "run_centers.npy",
        "run_previous.keras",
        "run.keras",
        "run_basic",
        "run_hist.json",
        "run_hist.png",
    ]
    killed = [number for number, (done, _) in zip(points, runs) if not done]
    assert killed == list(range(1, len(writes) + 1))  # every write
    assert all(runs[number - 1][1] == writes[:number] for number in killed)  # at the same writes
    for number in killed:
        folder = tmp_path / str(number)
        trainer, history, leftovers = _resume_in_process(demo_small, folder)
        point = f"killed before {writes[number - 1]}"
        assert int(trainer.optimizer.iterations.numpy()) == 2 * trainer.steps_per_epoch, point
        assert len(history["loss"]) == len(history["lr"]) == len(history["arcface_loss"]) == 2, (point, history)
        assert all(len(values) <= 2 for values in history.values()), (point, history)  # the evaluation may be missed
        assert np.isfinite(history["loss"]).all() and history["loss"] == json.load(open(trainer.hist_path))["loss"]
        # the complete temporary file of the write (before the previous checkpoint's: the new checkpoint's too)
        assert len(leftovers) == {1: 0, 3: 2}.get(number, 1), (point, leftovers)
        assert not [name for name in os.listdir(folder) if ".tmp" in name], point
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
        import sys, time
        from keras_insightface.training import run_lock
        lock = run_lock.RunLock({lock_path!r}).acquire()
        print("held", flush=True)
        time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_on_the_same_save_path_stops_at_construction(demo_small, tmp_path):
    from helpers import tiny_basic_model

    from keras_insightface.training import train

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


def test_a_lock_file_of_garbage_is_named_as_such_and_says_how_to_clear_it(tmp_path):
    path = str(tmp_path / "x.keras.lock")
    with open(path, "w") as ff:
        ff.write("garbage")
    with pytest.raises(
        run_lock.RunLockedError, match=rf"holds 7 bytes that are not a lock record, written \d+ s ago.*delete {path}"
    ):
        run_lock.RunLock(path).acquire()  # too young to be taken over: another run may be writing it
    old = time.time() - 2 * run_lock.UNWRITTEN_GRACE_S
    os.utime(path, (old, old))
    with pytest.warns(RuntimeWarning, match="taking over the lock .*: it holds 7 bytes that are not a lock record"):
        lock = run_lock.RunLock(path).acquire()
    lock.release()
    assert not os.path.exists(path)


# ------------------------------------------------------------------------------------------ damaged or wrong input
def _tiny_run(demo_small, path, epochs=0, emb=32, **options):
    """A Train of the tiny model on the demo folder; trains ``epochs`` epochs when > 0."""
    from helpers import tiny_basic_model

    from keras_insightface.nn import losses
    from keras_insightface.training import train

    basic_model = tiny_basic_model(emb=emb)
    trainer = train.Train(demo_small["train_dir"], path, basic_model=basic_model, batch_size=16, verbose=0, **options)
    if epochs:
        trainer.train([{"loss": losses.ArcfaceLoss(scale=16), "optimizer": "sgd", "epoch": epochs}], 0)
    return trainer


@pytest.mark.slow
def test_a_damaged_checkpoint_or_history_stops_in_one_line_and_is_left_as_it_is(demo_small, tmp_path, capsys):
    from keras_insightface.training import run_files

    path, previous = str(tmp_path / "run.keras"), str(tmp_path / "run_previous.keras")
    del _tiny_run(demo_small, path, epochs=2, plot_history=False).model
    assert run_state.read_run_state(path)["epochs"] == 2 and run_state.read_run_state(previous)["epochs"] == 1
    with open(path, "r+b") as ff:
        ff.truncate(os.path.getsize(path) // 2)
    damaged = open(path, "rb").read()
    with pytest.raises(run_files.DamagedRunFileError) as raised:
        _tiny_run(demo_small, path)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{path} is damaged: not a whole .keras zip archive")
    assert f"to go on from {previous} (epoch 1), move it aside (mv {path} {path}.damaged)" in message
    assert open(path, "rb").read() == damaged  # never overwritten or deleted
    os.rename(path, path + ".damaged")
    resumed = _tiny_run(demo_small, path)
    assert (
        resumed.history.completed_epochs == 1
        and f"{path} is missing: going on from {previous}" in capsys.readouterr().out
    )
    del resumed
    hist_path = str(tmp_path / "run_hist.json")
    with open(hist_path, "w") as ff:
        ff.write('{"loss": [1.0,\n')
    with pytest.raises(
        ValueError, match=rf"^{hist_path} is damaged: not a JSON history \(.*\); it is left as it is: move it aside"
    ):
        _tiny_run(demo_small, path)
    assert open(hist_path).read() == '{"loss": [1.0,\n'


@pytest.mark.slow
def test_resuming_with_another_basic_model_is_refused_unless_the_checkpoints_is_kept(demo_small, tmp_path, capsys):
    path = str(tmp_path / "run.keras")
    del _tiny_run(demo_small, path, epochs=1, plot_history=False).model
    expected = (
        rf"{path} holds a basic model of input 32x32x3, embedding 32, [\d,]+ parameters; basic_model 'tiny' has "
        r"input 32x32x3, embedding 64, [\d,]+ parameters: pass resume=False to start over"
    )
    with pytest.raises(ValueError, match=expected):
        _tiny_run(demo_small, path, emb=64)
    kept = _tiny_run(demo_small, path, emb=64, resume="checkpoint")
    assert kept.basic_model.output_shape[-1] == 32 and "going on with the checkpoint's" in capsys.readouterr().out
    del kept
    same = _tiny_run(demo_small, path, emb=32)  # the same network (new weights): resumed with the checkpoint's
    assert same.history.completed_epochs == 1


def test_paths_are_checked_before_any_work(demo_small, tmp_path):
    from helpers import tiny_basic_model

    from keras_insightface.training import train

    save = str(tmp_path / "run.keras")
    bin_path = demo_small["bin_path"]
    with pytest.raises(ValueError, match=rf"^{bin_path} is a verification \.bin file, not training data"):
        train.Train(bin_path, save)  # before "give basic_model": nothing else was looked at
    text = tmp_path / "notes.txt"
    text.write_text("x")
    with pytest.raises(ValueError, match=rf"^{text} is a file, not training data"):
        train.Train(str(text), save)
    with pytest.raises(OSError, match=r"^cannot write /proc/x\.keras: .*\(/proc\)$"):
        train.Train(demo_small["train_dir"], "/proc/x.keras", basic_model=tiny_basic_model())
    assert not os.path.exists(save + ".lock")
    one_bin = train.Train(demo_small["train_dir"], save, bin_path, basic_model=tiny_basic_model(), verbose=0)
    assert one_bin.eval_paths == [bin_path] and len(one_bin.evaluators) == 1  # one path, not its characters

"""A training run's files: where they live, who writes them, and whether an interrupted run can resume.

``save_path`` names the full model; a bare name goes to ``checkpoints/``. Next to it: ``<stem>_hist.json`` (the
history), ``<stem>_hist.png`` (its plot), ``<stem>_centers.npy`` (center-loss centers; the previous epoch's are kept as
``<stem>_centers_previous.npy``), ``<stem>_basic_<bin>_epoch_<E>_<acc>.keras`` (the best basic model) and
``<save_path>.lock`` (the run that owns them). Every file is written atomically. The checkpoint is renamed into place
after the centers and before the history, and holds a record of the epochs it completes (``run_state``): after a crash
between these writes the side files are reconciled with it. Under ``MultiWorkerMirroredStrategy`` worker 0 (or the
chief) writes these; the other workers write theirs into ``worker_<i>/`` so the chief's files are never clobbered.
"""

import os
import shutil
import warnings

import keras
import numpy as np

from keras_insightface.training import callbacks as myCallbacks
from keras_insightface.training import run_lock, run_state
from keras_insightface.utils import atomic_write, temp_file_target


def resolve_save_path(save_path):
    """``name`` -> ``checkpoints/name.keras``; a path with a folder is kept; ``.h5`` is kept if asked for."""
    if not os.path.splitext(save_path)[1]:
        save_path += ".keras"
    if not os.path.dirname(save_path):
        save_path = os.path.join("checkpoints", save_path)
    return save_path


def _cluster_role(strategy):
    """``(task_type, task_id, cluster dict)`` of a multi-worker strategy, ``(None, 0, {})`` otherwise."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return None, 0, {}
    return resolver.task_type, resolver.task_id or 0, resolver.cluster_spec().as_dict()


def worker_index(strategy):
    """This process's index among the training processes: the tf.distribute task id, or on JAX the process index
    (several hosts after ``keras.distribution.initialize()``)."""
    if strategy is None and keras.backend.backend() == "jax":
        import jax

        return jax.process_index()
    return _cluster_role(strategy)[1]


def is_chief(strategy):
    """True unless this process is a non-chief worker (worker 0, or process 0 on JAX, is the chief)."""
    task_type, task_id, cluster = _cluster_role(strategy)
    if task_type is None:
        return worker_index(strategy) == 0
    return task_type == "chief" or (task_type == "worker" and task_id == 0 and "chief" not in cluster)


class RunFiles:
    """The paths of one run (see the module docstring) and the callbacks that write them."""

    def __init__(self, save_path, strategy):
        save_path = resolve_save_path(save_path)
        self.is_chief = is_chief(strategy)
        if not self.is_chief:
            worker = f"worker_{worker_index(strategy)}"
            save_path = os.path.join(os.path.dirname(save_path), worker, os.path.basename(save_path))
        self.save_path = save_path
        self.save_dir = os.path.dirname(save_path)
        self.stem = os.path.splitext(os.path.basename(save_path))[0]
        self.hist_path = os.path.join(self.save_dir, self.stem + "_hist.json")
        self.hist_plot_path = os.path.join(self.save_dir, self.stem + "_hist.png")
        self.centers_path = os.path.join(self.save_dir, self.stem + "_centers.npy")
        self.previous_centers_path = os.path.join(self.save_dir, self.stem + "_centers_previous.npy")
        self.best_model_prefix = os.path.join(self.save_dir, self.stem)
        self.cache_dir = os.path.join(self.save_dir, ".cache")
        os.makedirs(self.save_dir, exist_ok=True)

    def claim(self):
        """Take the run's lock (one live run per save path, else ``run_lock.RunLockedError``) and delete the
        temporary files that a killed run of this save path left behind."""
        self._lock = run_lock.RunLock(self.save_path + ".lock").acquire()
        own = {self.save_path, self.hist_path, self.hist_plot_path, self.centers_path, self.previous_centers_path}
        own = {os.path.basename(path) for path in own}
        for name in os.listdir(self.save_dir):
            target = temp_file_target(name)
            if target and (target in own or target.startswith(self.stem + "_basic_")):
                os.remove(os.path.join(self.save_dir, name))

    def reconcile(self, history):
        """True when an earlier run of this ``save_path`` left a checkpoint to resume from. The checkpoint's record of
        completed epochs wins: ``history`` (and its file) and the centers file are made to agree with it, whatever
        write a crash interrupted. A checkpoint without a record falls back to the history file."""
        if not os.path.exists(self.save_path):
            return False
        state = run_state.read_run_state(self.save_path)
        if state is None:
            return history.completed_epochs > 0
        epochs = int(state["epochs"])
        if history.completed_epochs != epochs:
            print(f">>>> {self.hist_path} had {history.completed_epochs} epochs, the checkpoint {epochs}: following it")
            history.replace(_history_at(history.history, epochs, state["logs"]), epochs)
        if state.get("centers_sha256"):
            self._restore_centers(state["centers_sha256"])
        return epochs > 0

    def _restore_centers(self, checksum):
        """Make ``centers_path`` hold the centers the checkpoint was saved with (the newer or the previous file)."""
        for path in (self.centers_path, self.previous_centers_path):
            if os.path.exists(path) and run_state.array_checksum(np.load(path, allow_pickle=False)) == checksum:
                if path != self.centers_path:
                    with atomic_write(self.centers_path, suffix=".npy") as tmp_path:
                        shutil.copyfile(path, tmp_path)
                return
        kept = f"those in {self.centers_path}" if os.path.exists(self.centers_path) else "zero centers"
        message = f"{self.save_path}: the center-loss centers it was saved with are not on disk; going on with {kept}"
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def checkpoint_callbacks(self, history, center_loss=None):
        """At each epoch end: with a center loss, the centers file (the previous one kept), then the full-model
        checkpoint with its record (this epoch's logs, the centers' checksum)."""
        savers = [myCallbacks.AtomicCheckpoint(self.save_path, run_state=_state_of(history, center_loss))]
        if center_loss is not None:
            savers.insert(0, CenterSaver(center_loss, self.centers_path, self.previous_centers_path))
        return savers


def _history_at(history, epochs, last_logs):
    """``history`` completed up to ``epochs`` entries with the checkpoint's ``last_logs`` (the history file is one
    epoch behind after a kill between the two writes; epochs before that with no record are NaN); a longer history
    is returned as it is, for ``MyHistory.replace`` to cut."""
    done = len(history.get("loss", []))
    for _ in range(done, epochs - 1):
        history = myCallbacks.history_with_epoch(history, dict.fromkeys(last_logs, float("nan")))
    return myCallbacks.history_with_epoch(history, last_logs) if done < epochs else history


def _state_of(history, center_loss):
    """``state(epoch, logs) -> dict``: the record a checkpoint stores besides the model."""

    def state(epoch, logs):
        logs = {key: float(np.asarray(value)) for key, value in logs.items()}
        record = {"epochs": history.completed_epochs + 1, "logs": logs}
        if center_loss is not None:
            record["centers_sha256"] = run_state.array_checksum(keras.ops.convert_to_numpy(center_loss.centers))
        return record

    return state


class CenterSaver(keras.callbacks.Callback):
    """Save the center-loss centers to ``path`` (``.npy``) at each epoch end whose loss is finite, atomically; the
    file of the epoch before is kept as ``previous_path`` (the checkpoint of that epoch may still be the newest)."""

    def __init__(self, center_loss, path, previous_path=None):
        super().__init__()
        self.center_loss, self.path, self.previous_path = center_loss, path, previous_path

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or np.isfinite(logs.get("loss", 0.0)):
            if self.previous_path and os.path.exists(self.path):
                os.replace(self.path, self.previous_path)
            self.center_loss.save_centers(self.path)

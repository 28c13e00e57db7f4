"""A training run's files: where they live, who writes them, and whether an interrupted run can resume.

``save_path`` names the full model; a bare name goes to ``checkpoints/``. Next to it: ``<stem>_hist.json`` (the
history), ``<stem>_hist.png`` (its plot), ``<stem>_centers.npy`` (center-loss centers),
``<stem>_basic_<bin>_epoch_<E>_<acc>.keras`` (the best basic model) and ``<save_path>.lock`` (the run that owns them).
Every file is written atomically. The checkpoint also holds the run's state (completed epochs, history, centers:
``run_state``): it is the record of what is done, and the side files are reconciled with it when a run resumes.
Under ``MultiWorkerMirroredStrategy`` worker 0 (or the chief) writes these; the other workers write theirs into
``worker_<i>/`` so the chief's files are never clobbered.
"""

import os

import keras
import numpy as np

import myCallbacks
import run_lock
import run_state
from utils import atomic_write, temp_file_target


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
        self.best_model_prefix = os.path.join(self.save_dir, self.stem)
        self.cache_dir = os.path.join(self.save_dir, ".cache")
        os.makedirs(self.save_dir, exist_ok=True)

    def claim(self):
        """Take the run's lock (one live run per save path, else ``run_lock.RunLockedError``) and delete the
        temporary files that a killed run of this save path left behind."""
        self._lock = run_lock.RunLock(self.save_path + ".lock").acquire()
        own = {os.path.basename(path) for path in (self.save_path, self.hist_path, self.hist_plot_path)}
        own.add(os.path.basename(self.centers_path))
        for name in os.listdir(self.save_dir):
            target = temp_file_target(name)
            if target and (target in own or target.startswith(self.stem + "_basic_")):
                os.remove(os.path.join(self.save_dir, name))

    def reconcile(self, history):
        """True when an earlier run of this ``save_path`` left a checkpoint to resume from. The checkpoint's record of
        completed epochs wins: ``history`` (and its file) and the centers file are made to agree with it, whatever
        write a crash interrupted. A checkpoint without a stored state falls back to the history file."""
        if not os.path.exists(self.save_path):
            return False
        state, arrays = run_state.read_run_state(self.save_path)
        if state is None:
            return history.completed_epochs > 0
        epochs = int(state["epochs"])
        if history.completed_epochs != epochs:
            print(f">>>> {self.hist_path} had {history.completed_epochs} epochs, the checkpoint {epochs}: following it")
            history.replace(state["history"] if history.completed_epochs < epochs else history.history, epochs)
        if "centers" in arrays:
            with atomic_write(self.centers_path, suffix=".npy") as tmp_path:
                np.save(tmp_path, arrays["centers"])
        return epochs > 0

    def checkpoint_callbacks(self, history, center_loss=None):
        """The full-model checkpoint (holding the run's state: ``history`` with this epoch, the centers) and, with a
        center loss, the centers file, both saved at each epoch end."""
        savers = [myCallbacks.AtomicCheckpoint(self.save_path, run_state=_state_of(history, center_loss))]
        if center_loss is not None:
            savers.append(CenterSaver(center_loss, self.centers_path))
        return savers


def _state_of(history, center_loss):
    """``state(epoch, logs) -> (state, arrays)``: what the checkpoint of an epoch stores besides the model."""

    def state(epoch, logs):
        recorded = myCallbacks.history_with_epoch(history.history, logs)
        arrays = {} if center_loss is None else {"centers": keras.ops.convert_to_numpy(center_loss.centers)}
        return {"epochs": len(recorded.get("loss", [])), "history": recorded}, arrays

    return state


class CenterSaver(keras.callbacks.Callback):
    """Save the center-loss centers to ``path`` (``.npy``) at each epoch end whose loss is finite, atomically."""

    def __init__(self, center_loss, path):
        super().__init__()
        self.center_loss, self.path = center_loss, path

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or np.isfinite(logs.get("loss", 0.0)):
            self.center_loss.save_centers(self.path)

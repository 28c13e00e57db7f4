"""A training run's files: where they live, who writes them, and whether an interrupted run can resume.

``save_path`` names the full model; a bare name goes to ``checkpoints/``. Next to it: ``<stem>_hist.json`` (the
history), ``<stem>_hist.png`` (its plot), ``<stem>_centers.npy`` (center-loss centers) and ``<stem>_basic_<bin>_epoch_<E>_<acc>.keras`` (the best
basic model). Every file is written atomically. Under ``MultiWorkerMirroredStrategy`` worker 0 (or the chief)
writes these; the other workers write theirs into ``worker_<i>/`` so the chief's files are never clobbered.
"""

import os

import keras
import numpy as np

import myCallbacks


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

    def can_resume(self, history):
        """True when an earlier run of this ``save_path`` left a checkpoint and at least one epoch of history."""
        return os.path.exists(self.save_path) and history.completed_epochs > 0

    def checkpoint_callbacks(self, center_loss=None):
        """The full-model checkpoint and, with a center loss, the centers file, both saved at each epoch end."""
        savers = [myCallbacks.AtomicCheckpoint(self.save_path)]
        if center_loss is not None:
            savers.append(CenterSaver(center_loss, self.centers_path))
        return savers


class CenterSaver(keras.callbacks.Callback):
    """Save the center-loss centers to ``path`` (``.npy``) at each epoch end whose loss is finite, atomically."""

    def __init__(self, center_loss, path):
        super().__init__()
        self.center_loss, self.path = center_loss, path

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or np.isfinite(logs.get("loss", 0.0)):
            self.center_loss.save_centers(self.path)

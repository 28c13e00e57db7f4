"""A training run's files: where they live, who writes them, and whether an interrupted run can resume.

``save_path`` names the full model; a bare name goes to ``checkpoints/``. Next to it: ``<stem>_previous.keras`` (the
checkpoint before the newest, a hard link where the file system has them), ``<stem>_hist.json`` (the
history), ``<stem>_hist.png`` (its plot), ``<stem>_centers.npy`` (center-loss centers; the previous epoch's are kept as
``<stem>_centers_previous.npy``), ``<stem>_basic_<bin>_epoch_<E>_<acc>.keras`` (the best basic model) and
``<save_path>.lock`` (the run that owns them). Every file is written atomically. The checkpoint is renamed into place
after the centers and before the history, and holds a record of the epochs it completes (``run_state``): after a crash
between these writes the side files are reconciled with it. A checkpoint may also be saved in the middle of an epoch
(on SIGTERM, or every ``checkpoint_minutes``): its record then holds the step, the epoch's logs so far and the
run's data seed, and the run resumes at that step. A damaged checkpoint or history is reported in one line and left
as it is. Under ``MultiWorkerMirroredStrategy`` worker 0 (or the
chief) writes these; the other workers write theirs into ``worker_<i>/`` so the chief's files are never clobbered.
"""

import os
import shutil
import warnings

import keras
import numpy as np

from keras_insightface.models import zoo as models
from keras_insightface.training import callbacks as myCallbacks
from keras_insightface.training import run_lock, run_state
from keras_insightface.utils import atomic_write, check_writable_folder, temp_file_target


class DamagedRunFileError(ValueError):
    """A checkpoint or history of the run that cannot be read; the message says what the user can do."""


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


def process_count(strategy):
    """The training processes of the run: the workers of a multi-worker strategy, or JAX's processes."""
    if strategy is None and keras.backend.backend() == "jax":
        import jax

        return jax.process_count()
    _, _, cluster = _cluster_role(strategy)
    return max(1, sum(len(cluster.get(job, ())) for job in ("chief", "worker")))


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
        self.is_chief, self.processes = is_chief(strategy), process_count(strategy)
        if not self.is_chief:
            worker = f"worker_{worker_index(strategy)}"
            save_path = os.path.join(os.path.dirname(save_path), worker, os.path.basename(save_path))
        check_writable_folder(save_path)  # a folder that cannot be written is named now, before any work
        self.save_path = save_path
        self.save_dir = os.path.dirname(save_path)
        self.stem, extension = os.path.splitext(os.path.basename(save_path))
        self.previous_path = os.path.join(self.save_dir, self.stem + "_previous" + extension)
        self.hist_path = os.path.join(self.save_dir, self.stem + "_hist.json")
        self.hist_plot_path = os.path.join(self.save_dir, self.stem + "_hist.png")
        self.centers_path = os.path.join(self.save_dir, self.stem + "_centers.npy")
        self.previous_centers_path = os.path.join(self.save_dir, self.stem + "_centers_previous.npy")
        self.best_model_prefix = os.path.join(self.save_dir, self.stem)
        self.cache_dir = os.path.join(self.save_dir, ".cache")
        self.resume_state = None  # the record of the checkpoint a resumed run goes on from

    def claim(self):
        """Take the run's lock (one live run per save path, else ``run_lock.RunLockedError``) and delete the
        temporary files that a killed run of this save path left behind."""
        self._lock = run_lock.RunLock(self.save_path + ".lock").acquire()
        own = {self.save_path, self.previous_path, self.hist_path, self.hist_plot_path}
        own |= {self.centers_path, self.previous_centers_path}
        own = {os.path.basename(path) for path in own}
        for name in os.listdir(self.save_dir):
            target = temp_file_target(name)
            if target and (target in own or target.startswith(self.stem + "_basic_")):
                os.remove(os.path.join(self.save_dir, name))

    def release(self):
        """Give the save path back (the lock file is removed), e.g. before a stopped run ends its process."""
        self._lock.release()

    def reconcile(self, history):
        """True when an earlier run of this ``save_path`` left a checkpoint to resume from (its record is then
        ``resume_state``). The checkpoint's record of completed epochs wins: ``history`` (and its file) and the centers
        file are made to agree with it, whatever write a crash interrupted. A checkpoint without a record falls back
        to the history file. A missing checkpoint whose previous one is there (moved aside by the user) is replaced by
        it."""
        if not os.path.exists(self.save_path) and os.path.exists(self.previous_path):
            print(f">>>> {self.save_path} is missing: going on from {self.previous_path}")
            myCallbacks.link_or_copy(self.previous_path, self.save_path)
        if not os.path.exists(self.save_path):
            return False
        state = self.resume_state = self._readable_state()
        if state is None:
            return history.completed_epochs > 0
        epochs = int(state["epochs"])
        if history.completed_epochs != epochs:
            print(f">>>> {self.hist_path} had {history.completed_epochs} epochs, the checkpoint {epochs}: following it")
            history.replace(_history_at(history.history, epochs, state["logs"]), epochs)
        if state.get("centers_sha256"):
            self._restore_centers(state["centers_sha256"])
        return epochs > 0 or int(state.get("step", 0)) > 0

    def check_resumed_model(self, checkpoint_model, given_model, keep_checkpoint=False):
        """A resumed run goes on with the checkpoint's basic model: refused when the ``basic_model`` given is another
        network (input, embedding or size), unless ``keep_checkpoint``; said in one line naming both."""
        ours, theirs = models.describe_model(checkpoint_model), models.describe_model(given_model)
        if ours == theirs:
            return
        where = f"{self.save_path} holds a basic model of {ours}; basic_model '{given_model.name}' has {theirs}"
        if not keep_checkpoint:
            raise ValueError(
                f"{where}: pass resume=False to start over (another save_path keeps this run), or "
                "resume='checkpoint' to go on with the checkpoint's model"
            )
        print(f">>>> {where}: going on with the checkpoint's (resume='checkpoint')")

    def _readable_state(self):
        """The checkpoint's record; a file that is not a whole model file stops the run in one line."""
        try:
            return run_state.read_run_state(self.save_path)
        except run_state.DamagedFileError as err:
            raise DamagedRunFileError(f"{err}; {self._what_to_do()}") from None

    def _what_to_do(self):
        """What the user can do about a damaged checkpoint: the previous one, or starting over."""
        moved = f"mv {self.save_path} {self.save_path}.damaged"
        state = None
        if os.path.exists(self.previous_path):
            try:
                state = run_state.read_run_state(self.previous_path)
            except run_state.DamagedFileError:
                pass
        if state is not None:
            where = f"epoch {state['epochs']}" + (f", step {state['step']}" if state.get("step") else "")
            return f"it is left as it is: to go on from {self.previous_path} ({where}), move it aside ({moved})"
        return f"it is left as it is: move it aside ({moved}) and pass resume=False to start over"

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

    def checkpoint_callbacks(self, history, center_loss=None, seed=None):
        """At each epoch end: with a center loss, the centers file (the previous one kept), then the full-model
        checkpoint (the previous one kept) with its record (this epoch's logs, the centers' checksum, the data seed)."""
        record = _state_of(history, center_loss, seed)
        savers = [myCallbacks.AtomicCheckpoint(self.save_path, run_state=record, previous_path=self.previous_path)]
        if center_loss is not None:
            savers.insert(0, CenterSaver(center_loss, self.centers_path, self.previous_centers_path))
        return savers

    def save_mid_epoch(self, model, history, center_loss, seed, step, totals):
        """A checkpoint in the middle of an epoch, after ``step`` updates whose logs sum to ``totals``: the run
        resumes at that step (same data, same optimizer state)."""
        if center_loss is not None:
            CenterSaver(center_loss, self.centers_path, self.previous_centers_path).save()
        last_logs = {key: values[-1] for key, values in history.history.items() if values and values[-1] is not None}
        state = _state_of(history, center_loss, seed)(None, last_logs)
        state.update(epochs=history.completed_epochs, step=int(step), totals=totals)
        myCallbacks.save_model_atomic(model, self.save_path, state, previous_path=self.previous_path)
        print(f">>>> Saved {self.save_path} at epoch {history.completed_epochs + 1}, step {step}")


def _history_at(history, epochs, last_logs):
    """``history`` completed up to ``epochs`` entries with the checkpoint's ``last_logs`` (the history file is one
    epoch behind after a kill between the two writes; epochs before that with no record are NaN); a longer history
    is returned as it is, for ``MyHistory.replace`` to cut."""
    done = len(history.get("loss", []))
    for _ in range(done, epochs - 1):
        history = myCallbacks.history_with_epoch(history, dict.fromkeys(last_logs, float("nan")))
    return myCallbacks.history_with_epoch(history, last_logs) if done < epochs else history


def _state_of(history, center_loss, seed):
    """``state(epoch, logs) -> dict``: the record a checkpoint stores besides the model."""

    def state(epoch, logs):
        logs = {key: float(np.asarray(value)) for key, value in logs.items()}
        record = {"epochs": history.completed_epochs + 1, "logs": logs, "seed": seed}
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
            self.save()

    def save(self):
        if self.previous_path and os.path.exists(self.path):
            os.replace(self.path, self.previous_path)
        self.center_loss.save_centers(self.path)

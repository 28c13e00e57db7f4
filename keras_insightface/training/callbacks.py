"""Training callbacks: learning-rate schedules, history, checkpointing, gentle stop and NaN guard.

They work in any Keras 3 training loop (``model.fit`` or ``train.Train``'s own loop). Learning-rate
schedulers write the rate into ``model.optimizer.learning_rate`` and also return it, so the standalone objects
can be used for plotting, as in Keras_insightface (``CosineLrScheduler(...).on_epoch_begin(epoch)``).
"""

import math
import os
import select
import shutil
import sys
import warnings

import keras
import numpy as np

from keras_insightface.training.run_state import write_run_state
from keras_insightface.utils import atomic_write, load_json, save_json


# ---------------------------------------------------------------------------------------------------------
# Learning-rate schedules.
# ---------------------------------------------------------------------------------------------------------
def exp_scheduler(epoch, lr_base=0.001, decay_rate=0.05, lr_min=0, warmup=0):
    """``lr_base`` during ``warmup`` epochs, then ``lr_base * exp(decay_rate * (warmup - epoch))``, floored at ``lr_min``."""
    if epoch < warmup:
        return lr_base
    return max(lr_base * math.exp(decay_rate * (warmup - epoch)), lr_min)


def constant_decay(epoch, lr_base, lr_decay_steps, decay_rate):
    """``lr_base * decay_rate ** (number of listed epochs <= epoch)``."""
    return lr_base * decay_rate ** sum(1 for step in lr_decay_steps if step <= epoch)


def cosine_with_restarts(step, lr_base, first_restart_step, m_mul=0.5, t_mul=2.0, lr_min=0.0):
    """Cosine decay with restarts: period ``i`` lasts ``first_restart_step * t_mul**i`` and peaks at ``lr_base * m_mul**i``.

    With ``lr_min == lr_base * m_mul`` there is no restart: one cosine down to ``lr_min``, then constant.
    """
    if math.isclose(lr_min, lr_base * m_mul, rel_tol=1e-9):
        progress = min(step / first_restart_step, 1.0)
        return lr_min + (lr_base - lr_min) * 0.5 * (1 + math.cos(math.pi * progress))
    period, start, peak = float(first_restart_step), 0.0, lr_base
    while step >= start + period:
        start, period, peak = start + period, period * t_mul, peak * m_mul
    progress = (step - start) / period
    return lr_min + max(peak - lr_min, 0.0) * 0.5 * (1 + math.cos(math.pi * progress))


def polynomial_decay(step, lr_base, decay_steps, power=2.0, lr_min=0.0):
    """``lr_min + (lr_base - lr_min) * (1 - step / decay_steps) ** power``, ``lr_min`` from ``decay_steps`` on
    (arcface_torch's ``PolyScheduler`` after its warmup, with power 2)."""
    progress = min(max(step, 0) / decay_steps, 1.0)
    return lr_min + (lr_base - lr_min) * (1 - progress) ** power


def linear_warmup(step, warmup_steps, lr_base, lr_min=0.0):
    """Linear ramp from ``lr_min`` up to ``lr_base``: step ``warmup_steps - 1`` already runs at ``lr_base``."""
    return lr_min + (lr_base - lr_min) * (step + 1) / warmup_steps


class _LrScheduler(keras.callbacks.Callback):
    """Base: computes ``lr_at(step)`` per epoch or per batch, applies optional linear warmup and sets the optimizer."""

    def __init__(self, lr_base, warmup_steps=0, on_batch=False, steps_per_epoch=1, lr_min=0.0):
        super().__init__()
        self.lr_base, self.warmup_steps, self.on_batch = lr_base, warmup_steps, on_batch
        self.steps_per_epoch, self.lr_min = steps_per_epoch, lr_min
        self.epoch = 0

    def lr_at(self, step):
        raise NotImplementedError

    def _rate(self, step):
        if step < self.warmup_steps:
            return linear_warmup(step, self.warmup_steps, self.lr_base, self.lr_min)
        return self.lr_at(step - self.warmup_steps)

    def _apply(self, lr):
        model = getattr(self, "_model", None)
        if model is not None and getattr(model, "optimizer", None) is not None:
            model.optimizer.learning_rate.assign(lr)
        return lr

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        if self.on_batch:
            return self.on_train_batch_begin(0)
        return self._apply(self._rate(epoch))

    def on_train_batch_begin(self, batch, logs=None):
        if not self.on_batch:
            return None
        return self._apply(self._rate(self.epoch * self.steps_per_epoch + batch))


class ExponentialScheduler(_LrScheduler):
    """Per-epoch ``exp_scheduler`` (``lr_decay_steps <= 1``)."""

    def __init__(self, lr_base, decay_rate, lr_min=0.0, warmup_steps=0):
        super().__init__(lr_base, warmup_steps, lr_min=lr_min)
        self.decay_rate = decay_rate

    def lr_at(self, step):
        return exp_scheduler(step, self.lr_base, self.decay_rate, self.lr_min)


class ConstantDecayScheduler(_LrScheduler):
    """Step decay: multiply by ``decay_rate`` at each epoch listed in ``lr_decay_steps``."""

    def __init__(self, lr_base, lr_decay_steps, decay_rate=0.1, warmup_steps=0):
        super().__init__(lr_base, warmup_steps)
        self.lr_decay_steps, self.decay_rate = sorted(lr_decay_steps), decay_rate

    def _rate(self, step):  # listed epochs are absolute, warmup only replaces the first epochs
        if step < self.warmup_steps:
            return linear_warmup(step, self.warmup_steps, self.lr_base)
        return constant_decay(step, self.lr_base, self.lr_decay_steps, self.decay_rate)


class CosineLrScheduler(_LrScheduler):
    """Cosine decay with restarts on epochs, or on batches when ``first_restart_step >= 500``/``on_batch=True``."""

    def __init__(
        self,
        lr_base,
        first_restart_step,
        m_mul=0.5,
        lr_min=1e-6,
        warmup_iters=0,
        t_mul=2.0,
        on_batch=None,
        steps_per_epoch=1,
    ):
        on_batch = first_restart_step >= 500 if on_batch is None else on_batch
        super().__init__(lr_base, warmup_iters, on_batch=on_batch, steps_per_epoch=steps_per_epoch, lr_min=lr_min)
        self.first_restart_step, self.m_mul, self.t_mul = first_restart_step, m_mul, t_mul

    def lr_at(self, step):
        return cosine_with_restarts(step, self.lr_base, self.first_restart_step, self.m_mul, self.t_mul, self.lr_min)

    def on_train_batch_begin(self, batch, logs=None):
        """Per-batch rate; called standalone (``on_train_batch_begin(global_step)``) it takes a global step."""
        if not self.on_batch:
            return None
        step = batch if getattr(self, "_model", None) is None else self.epoch * self.steps_per_epoch + batch
        return self._apply(self._rate(step))


class PolynomialScheduler(_LrScheduler):
    """Linear warmup over ``warmup_steps``, then ``polynomial_decay`` over ``decay_steps``, set at every batch.

    Steps are epochs when ``decay_steps < 500`` (both then count whole epochs, the rate moves every batch by
    ``1 / steps_per_epoch`` of an epoch), else batches, as for the cosine schedule. Standalone (no model),
    ``on_train_batch_begin(global batch)`` returns the rate of that batch.
    """

    def __init__(self, lr_base, decay_steps, power=2.0, lr_min=0.0, warmup_steps=0, steps_per_epoch=1):
        batches = 1 if decay_steps >= 500 else steps_per_epoch  # batches per step of the arguments
        super().__init__(lr_base, warmup_steps * batches, on_batch=True, steps_per_epoch=steps_per_epoch, lr_min=lr_min)
        self.decay_batches, self.power = decay_steps * batches, power

    def lr_at(self, step):
        return polynomial_decay(step, self.lr_base, self.decay_batches, self.power, self.lr_min)

    def on_train_batch_begin(self, batch, logs=None):
        step = batch if getattr(self, "_model", None) is None else self.epoch * self.steps_per_epoch + batch
        return self._apply(self._rate(step))


def build_lr_scheduler(
    lr_base, lr_decay, lr_decay_steps, lr_min=0.0, lr_warmup_steps=0, steps_per_epoch=1, lr_decay_power=0
):
    """Pick the schedule from the ``Train`` arguments: ``lr_decay_power > 0`` -> polynomial decay over
    ``lr_decay_steps``; a list of epochs -> step decay; ``1 < lr_decay_steps < 500`` -> cosine with restarts on
    epochs; ``>= 500`` -> the same on batches; otherwise exponential decay (README table)."""
    if lr_decay_power > 0:
        if isinstance(lr_decay_steps, list | tuple) or lr_decay_steps <= 0:
            raise ValueError(f"lr_decay_power > 0 decays over lr_decay_steps > 0 steps, got {lr_decay_steps!r}")
        return PolynomialScheduler(lr_base, lr_decay_steps, lr_decay_power, lr_min, lr_warmup_steps, steps_per_epoch)
    if isinstance(lr_decay_steps, list | tuple):
        return ConstantDecayScheduler(lr_base, lr_decay_steps, lr_decay, warmup_steps=lr_warmup_steps)
    if 1 < lr_decay_steps < 500:
        return CosineLrScheduler(lr_base, lr_decay_steps, lr_decay, lr_min, lr_warmup_steps, on_batch=False)
    if lr_decay_steps >= 500:
        return CosineLrScheduler(
            lr_base, lr_decay_steps, lr_decay, lr_min, lr_warmup_steps, on_batch=True, steps_per_epoch=steps_per_epoch
        )
    return ExponentialScheduler(lr_base, lr_decay, lr_min, warmup_steps=lr_warmup_steps)


# ---------------------------------------------------------------------------------------------------------
# History, checkpoints, stopping.
# ---------------------------------------------------------------------------------------------------------
def _is_finite(value):
    try:
        return bool(np.all(np.isfinite(value)))
    except TypeError:
        return True


class MyHistory(keras.callbacks.Callback):
    """Per-epoch lists of every logged value, saved atomically to ``initial_file`` (``<stem>_hist.json``).

    The file is reloaded at construction and appended to, so a restarted run continues its history.
    """

    def __init__(self, initial_file=None):
        super().__init__()
        self.initial_file = initial_file
        self.history = _load_history(initial_file) if initial_file else {}

    @property
    def completed_epochs(self):
        return len(self.history.get("loss", []))

    def truncate(self, num_epochs):
        """Keep only the first ``num_epochs`` entries (used when resuming or restarting from an earlier epoch)."""
        self.history = {key: values[:num_epochs] for key, values in self.history.items()}

    def replace(self, history, num_epochs):
        """Take the first ``num_epochs`` epochs of ``history`` as the run's history, and write it."""
        self.history = history
        self.truncate(num_epochs)
        self._save()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        model = getattr(self, "_model", None)
        if "lr" not in logs and model is not None and getattr(model, "optimizer", None) is not None:
            logs["lr"] = keras.ops.convert_to_numpy(model.optimizer.learning_rate)
        self.history = history_with_epoch(self.history, logs)
        self._save()

    def _save(self):
        if self.initial_file:
            save_json(self.initial_file, self.history, indent=1)


def _load_history(path):
    """The history file's dict ({} when there is none); a damaged file stops in one line and is left as it is."""
    try:
        history = load_json(path, {})
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path} is damaged: not a JSON history ({err}); it is left as it is: move it aside "
            f"(mv {path} {path}.damaged) to go on without the logs of the earlier epochs, or pass resume=False"
        ) from None
    if not isinstance(history, dict) or not all(isinstance(values, list) for values in history.values()):
        raise ValueError(f"{path} is not a history (a dict of per-epoch lists); it is left as it is: move it aside")
    return history


def history_with_epoch(history, logs):
    """A copy of ``history`` (per-epoch lists) with one more epoch of ``logs``, as floats; a key that appears late is
    padded with None, so that every list stays aligned with the epochs."""
    filled = len(history.get("loss", []))
    recorded = {key: list(values) for key, values in history.items()}
    for key, value in logs.items():
        values = recorded.setdefault(key, [])
        values.extend([None] * (filled - len(values)))
        values.append(float(np.asarray(value)))
    return recorded


class AtomicCheckpoint(keras.callbacks.Callback):
    """Save the model to ``filepath`` at every epoch end, atomically; skipped when the epoch's loss is not finite.

    ``run_state(epoch, logs) -> dict``, when given, is a record stored inside the checkpoint (``run_state``), so that
    the one rename of the file commits the epoch's weights, optimizer and record together. ``previous_path`` keeps
    the checkpoint it replaces."""

    def __init__(self, filepath, save_model=None, run_state=None, previous_path=None):
        super().__init__()
        self.filepath, self.save_model, self.run_state = filepath, save_model, run_state
        self.previous_path = previous_path

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and not _is_finite(logs.get("loss", 0.0)):
            return
        extra = self.run_state(epoch, logs or {}) if self.run_state else None
        save_model_atomic(self.save_model or self._model, self.filepath, extra, self.previous_path)


def save_model_atomic(model, filepath, state=None, previous_path=None):
    """``model.save`` through a temporary file of the same extension, then rename (.keras or .h5); the ``state``
    record is added to the file before the rename. ``previous_path``: the file replaced is kept there first (a hard
    link, or a copy where the file system has none), so that a damaged newest file never leaves nothing to go on
    from."""
    with atomic_write(filepath) as tmp_path:
        os.remove(tmp_path)  # Keras refuses to overwrite some formats in place
        model.save(tmp_path)
        if state is not None:
            write_run_state(tmp_path, state)
        if previous_path and os.path.exists(filepath):
            link_or_copy(filepath, previous_path)


def link_or_copy(source, dest):
    """``dest`` becomes the file ``source`` is, atomically: a hard link (no copy of a large checkpoint), or a copy
    where the file system has no hard links."""
    with atomic_write(dest) as tmp_path:
        os.remove(tmp_path)
        try:
            os.link(source, tmp_path)
        except OSError:
            shutil.copyfile(source, tmp_path)


class GentlyStop(keras.callbacks.Callback):
    """Type ``n`` + Enter while training runs to stop at the end of the current epoch.

    Polls stdin without blocking at each epoch end; does nothing when stdin is not an interactive terminal.
    """

    def __init__(self, stream=None, require_tty=True):
        super().__init__()
        self.stream = stream if stream is not None else sys.stdin
        self.require_tty, self.stop_requested = require_tty, False

    def _pending_lines(self):
        """Lines typed since the last check, read from the raw descriptor (Python's buffer would hide lines)."""
        try:
            if self.stream is None or (self.require_tty and not self.stream.isatty()):
                return []
            fd, chunks = self.stream.fileno(), []
            while select.select([fd], [], [], 0)[0]:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks).decode(errors="ignore").splitlines()
        except (OSError, ValueError):  # closed or non-selectable stream: gentle stop is simply unavailable
            return []

    def on_epoch_end(self, epoch, logs=None):
        if any(line.strip().lower() == "n" for line in self._pending_lines()):
            self.stop_requested = True
        if self.stop_requested and getattr(self, "_model", None) is not None:
            print(">>>> Gently stop requested: stopping after this epoch.")
            self._model.stop_training = True


class NanLossGuard(keras.callbacks.Callback):
    """Stop cleanly (no ``sys.exit``) when the loss becomes NaN/Inf; the last good checkpoint stays on disk."""

    def __init__(self):
        super().__init__()
        self.nan_epoch = None

    def _check(self, epoch, logs):
        if logs and not _is_finite(logs.get("loss", 0.0)):
            self.nan_epoch = epoch
            print(f">>>> Loss is {logs.get('loss')} at epoch {epoch + 1}: stopping, the last good checkpoint is kept.")
            if getattr(self, "_model", None) is not None:
                self._model.stop_training = True

    def on_train_batch_end(self, batch, logs=None):
        if self.nan_epoch is None:
            self._check(getattr(self, "epoch", 0), logs)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if self.nan_epoch is None:
            self._check(epoch, logs)


class UnreadableImagesWarning(UserWarning):
    """Training images that could not be decoded were skipped."""


class UnreadableImagesReport(keras.callbacks.Callback):
    """At each epoch end, a Python warning naming the training images the input pipeline skipped as unreadable.

    ``skipped`` has a ``drain() -> (count, names)`` method (``data.SkippedImages``); None reports nothing.
    """

    def __init__(self, skipped, max_names=20):
        super().__init__()
        self.skipped, self.max_names = skipped, max_names

    def on_epoch_end(self, epoch, logs=None):
        count, names = self.skipped.drain() if self.skipped is not None else (0, [])
        if not count:
            return
        unique = sorted(set(names))
        listed = ", ".join(unique[: self.max_names]) + (
            f" (+{len(unique) - self.max_names} more)" if len(unique) > self.max_names else ""
        )
        unnamed = f"; {count - len(names)} in long runs of unreadable files are not named" if count > len(names) else ""
        message = f"epoch {epoch + 1}: skipped {count} unreadable training image(s): {listed}{unnamed}"
        warnings.warn(message, UnreadableImagesWarning, stacklevel=2)


class HistoryPlot(keras.callbacks.Callback):
    """Redraw ``plot.hist_plot_split`` of the run's history into ``path`` (a PNG) at each epoch end, atomically, so
    a person can look at the run without a notebook. ``history`` is the ``MyHistory`` that records the run (it must
    run before this callback); ``stage_epochs()`` returns the epochs of each scheduler stage (the boundaries)."""

    def __init__(self, path, history, stage_epochs=None):
        super().__init__()
        self.path, self.history, self.stage_epochs = path, history, stage_epochs

    def on_epoch_end(self, epoch, logs=None):
        import matplotlib.pyplot as plt

        from keras_insightface.evaluation import plot

        if not self.history.history.get("loss"):
            return
        epochs = self.stage_epochs() if self.stage_epochs else None
        axes, _ = plot.hist_plot_split(self.history.history, epochs=epochs, save=self.path)
        plt.close(axes[0].figure)

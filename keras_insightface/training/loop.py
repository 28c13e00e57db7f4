"""The epoch loop the step runners share: Keras callback events and logs as ``model.fit`` gives them, the progress
bar and the images/s of each epoch. A runner supplies ``run_steps(iterator, num_steps) -> mean logs of the steps``
(``runner.StepRunner`` on TensorFlow, ``runner_jax.JaxStepRunner`` on JAX). Backend-neutral: no TensorFlow here.
"""

import time

import keras

PROGRESS_KEYS = ("loss", "accuracy")  # shown as running means of the epoch: the last line is what the history records


class EpochLoop:
    """``fit``: epochs of ``run_steps`` calls of ``steps_per_execution`` steps, with callbacks. Subclasses set
    ``verbose`` and ``steps_per_execution``."""

    verbose, steps_per_execution = 1, 1

    def _epoch(self, model, run_steps, iterator, callbacks, steps_per_epoch):
        """One epoch of steps with batch callbacks; returns ``(epoch logs, steps run)``."""
        shown = list(PROGRESS_KEYS)
        progbar = keras.utils.Progbar(steps_per_epoch, verbose=self.verbose, stateful_metrics=shown)
        totals, step = {}, 0
        while step < steps_per_epoch and not model.stop_training:
            num = min(self.steps_per_execution, steps_per_epoch - step)
            callbacks.on_train_batch_begin(step)
            logs = {key: float(value) for key, value in run_steps(iterator, num).items()}
            step += num
            for key, value in logs.items():
                totals[key] = totals.get(key, 0.0) + value * num
            callbacks.on_train_batch_end(step - 1, logs)
            progbar.update(step, [(key, totals[key] / step) for key in shown if key in totals])
        return {key: value / max(step, 1) for key, value in totals.items()}, step

    def fit(self, model, run_steps, iterator, callbacks, epochs, steps_per_epoch, global_batch_size):
        """Run the epochs ``range(*epochs)`` with the Keras callback events of ``model.fit``; stops early when a
        callback sets ``model.stop_training``."""
        model.stop_training = False
        callbacks.on_train_begin()
        for epoch in range(*epochs):
            callbacks.on_epoch_begin(epoch)
            if self.verbose:
                print(f"Epoch {epoch + 1}/{epochs[1]}")
            start = time.time()
            epoch_logs, steps_run = self._epoch(model, run_steps, iterator, callbacks, steps_per_epoch)
            epoch_logs["lr"] = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
            if self.verbose:
                print(f"     {steps_run * global_batch_size / (time.time() - start):.1f} images/s")
            callbacks.on_epoch_end(epoch, epoch_logs)
            if model.stop_training:
                break
        callbacks.on_train_end()

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

    def _epoch(self, model, run_steps, iterator, callbacks, steps_per_epoch, epoch, start, interrupt):
        """Epoch ``epoch``'s steps with batch callbacks, from ``start = (step, totals of the logs so far)``; returns
        ``(epoch logs, steps run, stopped)``: ``stopped`` when ``interrupt`` stopped it before its end."""
        shown = list(PROGRESS_KEYS)
        progbar = keras.utils.Progbar(steps_per_epoch, verbose=self.verbose, stateful_metrics=shown)
        step, totals = start
        totals = dict(totals)
        while step < steps_per_epoch and not model.stop_training:
            num = min(self.steps_per_execution, steps_per_epoch - step)
            callbacks.on_train_batch_begin(step)
            logs = {key: float(value) for key, value in run_steps(iterator, num).items()}
            step += num
            for key, value in logs.items():
                totals[key] = totals.get(key, 0.0) + value * num
            callbacks.on_train_batch_end(step - 1, logs)
            progbar.update(step, [(key, totals[key] / step) for key in shown if key in totals])
            inside = step < steps_per_epoch and not model.stop_training  # a NaN step is never saved
            if interrupt is not None and inside and interrupt.after_step(epoch, step, totals):
                return {}, step, True
        return {key: value / max(step, 1) for key, value in totals.items()}, step, False

    def fit(
        self,
        model,
        run_steps,
        iterator,
        callbacks,
        epochs,
        steps_per_epoch,
        global_batch_size,
        start=None,
        interrupt=None,
    ):
        """Run the epochs ``range(*epochs)`` with the Keras callback events of ``model.fit``; stops early when a
        callback sets ``model.stop_training``, or when ``interrupt.after_step(epoch, step, totals)`` (asked after
        each call of steps inside an epoch) says so. ``start = (step, totals)``: the first epoch begins at that step,
        its logs so far summed in ``totals`` (a run resumed in the middle of an epoch). Returns True when
        ``interrupt`` stopped training."""
        model.stop_training = False
        callbacks.on_train_begin()
        start = start or (0, {})
        for epoch in range(*epochs):
            callbacks.on_epoch_begin(epoch)
            if self.verbose:
                print(f"Epoch {epoch + 1}/{epochs[1]}" + (f", from step {start[0] + 1}" if start[0] else ""))
            began, first_step = time.time(), start[0]
            epoch_logs, steps_run, stopped = self._epoch(
                model, run_steps, iterator, callbacks, steps_per_epoch, epoch, start, interrupt
            )
            start = (0, {})
            if stopped:
                callbacks.on_train_end()
                return True
            epoch_logs["lr"] = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
            if self.verbose:
                print(f"     {(steps_run - first_step) * global_batch_size / (time.time() - began):.1f} images/s")
            callbacks.on_epoch_end(epoch, epoch_logs)
            if model.stop_training or (interrupt is not None and interrupt.stop_at_epoch_end()):
                break
        callbacks.on_train_end()
        return False

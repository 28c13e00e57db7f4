"""Stopping a run cleanly when it is asked to, and saving it in the middle of an epoch.

SLURM, Kubernetes and spot VMs send SIGTERM some seconds before they kill a job; a person types Ctrl-C (SIGINT).
While a stage trains, ``Preemption`` turns either signal into a request that the epoch loop serves at the next step
boundary: the run is saved where it is (weights, optimizer, the epoch and step, the data position) and training
stops; the trainer then releases its lock and ends the process (status 143 for SIGTERM). A second signal acts at
once, as if the first had not been caught. ``checkpoint_minutes`` also saves the run every that many minutes,
which covers the kills no signal announces. A run that restarts from such a checkpoint goes on at the saved step.

The processes of a multi-worker run must stop their collective steps together: there each step boundary asks all of
them (``agree``: a collective of three flags) whether any has received a signal or is due for a timed save, and all
save and stop at that same step. Signals are taken over in the main thread only.
"""

import signal
import threading
import time

import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    """The epoch loop's ``interrupt``: ``after_step(epoch, step, totals)`` saves through ``save(epoch, step,
    totals)`` when a signal came or the checkpoint interval passed, and returns True when training must stop now.
    ``agree(flags) -> flags``: element-wise, whether any process of a multi-worker run set each flag (None: one
    process). Use it as a context manager around the training of a stage (it installs and restores the signal
    handlers)."""

    def __init__(self, save, checkpoint_minutes=None, clock=time.monotonic, agree=None):
        self.save, self.clock, self.agree = save, clock, agree
        self.interval = None if checkpoint_minutes is None else 60.0 * checkpoint_minutes
        self.catch_signals = threading.current_thread() is threading.main_thread()  # Python's rule for handlers
        self.pending, self.received, self._previous, self._last_save = None, None, {}, clock()

    def __enter__(self):
        if self.catch_signals:
            self._previous = {number: signal.signal(number, self._on_signal) for number in SIGNALS}
        self._last_save = self.clock()
        return self

    def __exit__(self, *exc_info):
        self._restore()
        return False

    def _restore(self):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _on_signal(self, number, frame):
        self.pending = signal.Signals(number)
        self._restore()  # a second signal is not caught
        print(f"\n>>>> {self.pending.name}: saving at the next step, then stopping ({self.pending.name} again: now)")

    def _decide(self, due):
        """``(save now, the signal that stops the run or None)``; with several processes, what any of them wants
        (SIGTERM before SIGINT), so that all take the same decision at the same step."""
        pending = self.pending
        if self.agree is None:
            return due, pending
        wanted = self.agree(np.array([due] + [pending == number for number in SIGNALS]))
        stop = next((signal.Signals(number) for number, anyone in zip(SIGNALS, wanted[1:]) if anyone), None)
        return bool(wanted[0]), stop

    def after_step(self, epoch, step, totals):
        """Called by the epoch loop after each call of steps that ended inside an epoch; True: stop training now."""
        due = self.interval is not None and self.clock() - self._last_save >= self.interval
        due, self.received = self._decide(due)
        if due or self.received is not None:
            self.save(epoch, step, totals)
            self._last_save = self.clock()
        return self.received is not None

    def stop_at_epoch_end(self):
        """Called by the epoch loop at each epoch end (the epoch's checkpoint is written): True: stop training."""
        _, self.received = self._decide(False)
        return self.received is not None


def exit_status(received):
    """The exit status of a process ended by signal ``received``: 128 + its number (143 for SIGTERM)."""
    return 128 + int(received)

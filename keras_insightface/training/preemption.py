"""Stopping a run cleanly when it is asked to, and saving it in the middle of an epoch.

SLURM, Kubernetes and spot VMs send SIGTERM some seconds before they kill a job; a person types Ctrl-C (SIGINT).
While a stage trains, ``Preemption`` turns either signal into a request that the epoch loop serves at the next step
boundary: the run is saved where it is (weights, optimizer, the epoch and step, the data position) and training
stops; the trainer then releases its lock and ends the process (status 143 for SIGTERM). A second signal acts at
once, as if the first had not been caught. ``checkpoint_minutes`` also saves the run every that many minutes,
which covers the kills no signal announces. A run that restarts from such a checkpoint goes on at the saved step.

Signals are taken over only in the main thread of a single-process run: the processes of a multi-worker run stop
their collective steps together or not at all, so there a signal keeps its usual effect and the run resumes from its
last checkpoint (an epoch end, or the last ``checkpoint_minutes`` save).
"""

import signal
import threading
import time

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    """The epoch loop's ``interrupt``: ``after_step(epoch, step, totals)`` saves through ``save(epoch, step,
    totals)`` when a signal came or the checkpoint interval passed, and returns True when training must stop now.
    Use it as a context manager around the training of a stage (it installs and restores the signal handlers)."""

    def __init__(self, save, checkpoint_minutes=None, catch_signals=True, clock=time.monotonic):
        self.save, self.clock = save, clock
        self.interval = None if checkpoint_minutes is None else 60.0 * checkpoint_minutes
        self.catch_signals = catch_signals and threading.current_thread() is threading.main_thread()
        self.received, self._previous, self._last_save = None, {}, clock()

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
        self.received = signal.Signals(number)
        self._restore()  # a second signal is not caught
        print(f"\n>>>> {self.received.name}: saving at the next step, then stopping ({self.received.name} again: now)")

    @property
    def stop_requested(self):
        return self.received is not None

    def after_step(self, epoch, step, totals):
        """Called by the epoch loop after each call of steps that ended inside an epoch; True: stop training now."""
        due = self.interval is not None and self.clock() - self._last_save >= self.interval
        if self.received is not None or due:
            self.save(epoch, step, totals)
            self._last_save = self.clock()
        return self.received is not None


def exit_status(received):
    """The exit status of a process ended by signal ``received``: 128 + its number (143 for SIGTERM)."""
    return 128 + int(received)

"""One training run per save path: a lock file next to the checkpoint that names its owner (pid, host, start time).

A second ``Train`` with the same ``save_path`` stops at construction, instead of overwriting the first run's
checkpoint and history, or resuming from them while they are being written. The lock of a process that is gone
(killed, or a reused pid) is taken over with a warning; the lock of another host cannot be checked, so the error
says how to remove it. The same process may take its own lock again (a new ``Train`` after an earlier one).
"""

import datetime
import json
import os
import socket
import time
import uuid
import warnings
import weakref

UNWRITTEN_GRACE_S = 10  # a lock file still empty after this long was left by a process killed while creating it


class RunLockedError(OSError):
    """The save path is in use by another live training run."""


def _process_start(pid):
    """A value that changes when ``pid`` is reused (its start time in clock ticks, Linux); None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as ff:
            return int(ff.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _is_alive(pid, start):
    if not isinstance(pid, int) or pid <= 0:  # not a process id (never signal 0 or -1: process groups)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return start is None or _process_start(pid) in (None, start)


def _read_owner(path):
    """The owner record of a lock file; None when it is unreadable (being written, or left half-written)."""
    try:
        with open(path) as ff:
            return json.load(ff)
    except (OSError, ValueError):
        return None


def _describe_unreadable(path):
    """What a lock file that holds no lock record holds: nothing, or how many bytes of something else."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return "nothing"
    return "nothing" if size == 0 else f"{size} bytes that are not a lock record"


def _release(path, token):
    """Remove the lock file if it is still ours."""
    owner = _read_owner(path)
    if owner is not None and owner.get("token") == token:
        os.remove(path)


class RunLock:
    """The lock file ``path``; ``acquire()`` takes it or raises ``RunLockedError``. It is released when this object
    is garbage collected or the process exits normally (a killed process leaves it, to be taken over)."""

    def __init__(self, path):
        self.path, self.token = os.fspath(path), uuid.uuid4().hex

    def _record(self):
        started = datetime.datetime.now().isoformat(timespec="seconds")
        host, pid = socket.gethostname(), os.getpid()
        return {"pid": pid, "host": host, "started": started, "start_ticks": _process_start(pid), "token": self.token}

    def acquire(self):
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale(_read_owner(self.path))
                continue
            with os.fdopen(fd, "w") as ff:
                json.dump(self._record(), ff)
            self._finalizer = weakref.finalize(self, _release, self.path, self.token)
            return self
        raise RunLockedError(f"could not take the lock {self.path}: other processes keep taking it")

    def release(self):
        """Remove the lock file now (if it is still ours)."""
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()

    def _take_over_if_stale(self, owner):
        """Remove a lock whose owner is gone (with a warning) or is this process; raise if its owner is alive."""
        if owner is None:
            content = _describe_unreadable(self.path)
            age = time.time() - _mtime(self.path)
            if age < UNWRITTEN_GRACE_S:
                raise RunLockedError(
                    f"{self.path} holds {content}, written {age:.0f} s ago: another training run may be taking it; "
                    f"if none is, delete {self.path} (or wait {UNWRITTEN_GRACE_S} s: it is then taken over)"
                )
            reason = f"it holds {content}, not a lock record"
        elif owner.get("host") != socket.gethostname():
            raise RunLockedError(self._in_use(owner, "; if that run is gone, delete " + self.path))
        elif owner.get("pid") == os.getpid():
            reason = None  # an earlier Train of this process
        elif _is_alive(owner.get("pid"), owner.get("start_ticks")):
            raise RunLockedError(self._in_use(owner, ""))
        else:
            reason = f"process {owner.get('pid')} (since {owner.get('started')}) is gone"
        if reason:
            warnings.warn(f"taking over the lock {self.path}: {reason}", RuntimeWarning, stacklevel=4)
        self._remove(owner)

    def _remove(self, owner):
        """Remove the lock file of ``owner``; if another process replaced it meanwhile, give that one back."""
        aside = f"{self.path}.stale.{os.getpid()}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:  # another process removed it first
            return
        if _read_owner(aside) == owner:
            os.remove(aside)
        else:
            os.replace(aside, self.path)

    def _in_use(self, owner, hint):
        save_path = self.path[: -len(".lock")] if self.path.endswith(".lock") else self.path
        return (
            f"{save_path} is in use by another training run (pid {owner.get('pid')} on {owner.get('host')}, "
            f"since {owner.get('started')}): wait for it, or choose another save_path{hint}"
        )


def _mtime(path):
    try:
        return os.path.getmtime(path)
    except FileNotFoundError:
        return 0.0

"""Small helpers shared by every module: atomic file writes, JSON persistence and the CLI error policy.

Every checkpoint, history, cache and converted file goes through ``atomic_write`` so that a kill at any
moment leaves either the old file or the new one, never a half-written one. Every command-line tool runs its
``main`` through ``run_main``: bad input is reported in one line, not a traceback.
"""

import contextlib
import json
import os
import re
import sys
import tempfile
import threading

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path, suffix=None):
    """Yield a temporary path next to ``path``; on success rename it over ``path``, on error delete it.

    ``suffix`` keeps the extension of the temporary name (Keras and numpy pick formats by extension).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(path)[1] if suffix is None else suffix
    fd, tmp_path = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp" + suffix, dir=folder)
    os.close(fd)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the final file the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


# ``.<target name>.<8 random characters of mkstemp>.tmp[.<extension>]``: the temporary files of ``atomic_write``
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp(\.[^.]+)?$")


def temp_file_target(name):
    """The name of the file the ``atomic_write`` temporary file ``name`` was to become; None for other names."""
    match = _TEMP_NAME.match(name)
    return match and match["target"]


def check_writable_folder(path):
    """Fail now, not after a long computation, when the folder that is to hold the file ``path`` cannot be created
    or written to (a missing parent that is a file, a read-only file system, no permission)."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_check.", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise OSError(f"cannot write {path}: {err.strerror or err} ({folder})") from None


def save_json(path, obj, **kwargs):
    """Write ``obj`` as JSON atomically."""
    with atomic_write(path) as tmp_path, open(tmp_path, "w") as ff:
        json.dump(obj, ff, **kwargs)


def save_bytes(path, payload):
    """Write ``payload`` bytes atomically."""
    with atomic_write(path) as tmp_path, open(tmp_path, "wb") as ff:
        ff.write(payload)


def load_json(path, default=None):
    """Read JSON from ``path``, or return ``default`` if the file does not exist."""
    if not os.path.exists(path):
        return default
    with open(path) as ff:
        return json.load(ff)


@contextlib.contextmanager
def filtered_stderr(drop):
    """Run the block with the process's standard error (file descriptor 2, where C libraries write too) passing
    through a filter that drops the lines the regular expression ``drop`` matches and passes everything else on as
    it comes (progress bars included): for the messages of native libraries that no setting silences."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    forwarder = threading.Thread(target=_forward_lines, args=(read_end, saved, drop), daemon=True)
    forwarder.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer closes: the forwarder reads to its end
        forwarder.join()
        os.close(saved)


def _forward_lines(read_end, out, drop):
    """Copy the pipe ``read_end`` to the descriptor ``out`` piece by piece (a piece ends at \n or \r), less the
    pieces ``drop`` matches."""
    pending = b""
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while chunk := pipe.read(1 << 16):
            *complete, pending = re.split(rb"(?<=[\r\n])", pending + chunk)
            for piece in complete:
                if not drop.match(piece.decode(errors="replace")):
                    os.write(out, piece)
    if pending and not drop.match(pending.decode(errors="replace")):
        os.write(out, pending)


# Errors that mean "the input is wrong" (missing / corrupt / truncated file, bad argument value, optional package
# not installed), as opposed to a bug in the program, whose traceback must stay visible.
EXPECTED_ERRORS = (OSError, ValueError, ImportError)


def run_main(main, argv=None, prog=None):
    """Run a command-line ``main(argv)``: an expected error prints ``<prog>: error: <message>`` as one line on
    stderr and exits with status 2; any other exception keeps its traceback. Returns ``main``'s exit status.
    ``prog`` defaults to the script's file name."""
    prog = prog or os.path.basename(sys.argv[0])
    try:
        status = main(argv)
    except EXPECTED_ERRORS as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return status if isinstance(status, int) else 0

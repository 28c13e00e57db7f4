"""A small record stored inside each checkpoint file, so that renaming the checkpoint into place commits an epoch:
how many epochs are done, the last epoch's logs and the checksum of the center-loss centers of that epoch. The side
files (``<stem>_hist.json``, ``<stem>_centers.npy``) are for people and plots; after a crash between two writes of
an epoch end they are brought back in line with the checkpoint (``run_files.RunFiles.reconcile``).

The record is the comment of a ``.keras`` zip (Keras' loader ignores it; another archive member would make Keras
extract the whole archive to a temporary folder at every load) or an attribute of a ``.h5`` file's root.
"""

import hashlib
import json
import zipfile

import numpy as np

STATE_NAME = "insightface_run_state"
MAX_ZIP_COMMENT = 65535


class DamagedFileError(ValueError):
    """A model file that is not whole (truncated, overwritten, not a model file)."""


def write_run_state(path, state):
    """Store ``state`` (a small JSON-ready dict) in the freshly saved model file ``path`` (``.keras`` or ``.h5``)."""
    text = json.dumps({STATE_NAME: state})
    if path.endswith(".keras"):
        if len(text) > MAX_ZIP_COMMENT:
            raise ValueError(f"run state of {len(text)} bytes does not fit a zip comment: {text[:200]}...")
        with zipfile.ZipFile(path, "a") as archive:
            archive.comment = text.encode()
        return
    import h5py

    with h5py.File(path, "a") as saved:
        saved.attrs[STATE_NAME] = text


def read_run_state(path):
    """The state stored in the model file ``path``; None for a file saved without one (by an older version, or a
    model that is not a run's checkpoint). ``DamagedFileError`` when the file is not a whole model file."""
    try:
        text = _stored_text(path)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        kind = ".keras zip archive" if path.endswith(".keras") else "HDF5 model file"
        raise DamagedFileError(f"{path} is damaged: not a whole {kind} ({err})") from None
    try:
        return json.loads(text)[STATE_NAME]
    except (ValueError, KeyError, TypeError):
        return None


def _stored_text(path):
    if path.endswith(".keras"):
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # reads every member once: a file damaged inside, not only a cut one
            if damaged is not None:
                raise zipfile.BadZipFile(f"member {damaged} fails its CRC check")
            return archive.comment.decode(errors="replace")
    import h5py

    with h5py.File(path, "r") as saved:
        return saved.attrs.get(STATE_NAME, "")


def array_checksum(values):
    """SHA-256 of an array's dtype, shape and bytes: which file holds the centers a checkpoint was saved with."""
    values = np.ascontiguousarray(values)
    digest = hashlib.sha256(f"{values.dtype.str}{values.shape}".encode())
    digest.update(values.tobytes())
    return digest.hexdigest()

"""A training run's state stored inside its checkpoint file, so that renaming the checkpoint into place commits an
epoch: the number of completed epochs, the history up to that epoch and the center-loss centers travel with the
weights and the optimizer. The side files (``<stem>_hist.json``, ``<stem>_centers.npy``) are for people and plots;
after a crash between two writes they are made to agree with the checkpoint again (``run_files.RunFiles``).

A ``.keras`` checkpoint (a zip) gets two more members, which Keras' loader ignores; a ``.h5`` checkpoint an
attribute and a group.
"""

import io
import json
import zipfile

import numpy as np

STATE_NAME = "insightface_run_state"


def write_run_state(path, state, arrays=None):
    """Add ``state`` (a JSON-ready dict) and ``arrays`` (name -> numpy array) to the model file ``path`` (``.keras``
    or ``.h5``), which must not hold a run state yet (it is the fresh temporary file of a checkpoint)."""
    arrays = arrays or {}
    if path.endswith(".keras"):
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        with zipfile.ZipFile(path, "a") as archive:
            archive.writestr(STATE_NAME + ".json", json.dumps(state))
            archive.writestr(STATE_NAME + ".npz", buffer.getvalue())
        return
    import h5py

    with h5py.File(path, "a") as saved:
        saved.attrs[STATE_NAME] = json.dumps(state)
        group = saved.create_group(STATE_NAME)
        for name, value in arrays.items():
            group.create_dataset(name, data=value)


def read_run_state(path):
    """``(state, arrays)`` stored in the model file ``path``; ``(None, {})`` for a file saved without one (by an
    older version, or not a checkpoint of a run)."""
    if path.endswith(".keras"):
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if STATE_NAME + ".json" not in names:
                return None, {}
            state = json.loads(archive.read(STATE_NAME + ".json"))
            with np.load(io.BytesIO(archive.read(STATE_NAME + ".npz")), allow_pickle=False) as stored:
                return state, {name: stored[name] for name in stored.files}
    import h5py

    with h5py.File(path, "r") as saved:
        if STATE_NAME not in saved.attrs:
            return None, {}
        group = saved.get(STATE_NAME, {})
        return json.loads(saved.attrs[STATE_NAME]), {name: group[name][()] for name in group}

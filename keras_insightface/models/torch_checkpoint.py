"""PyTorch checkpoints (``torch.save`` of a state dict: arcface_torch's ``backbone.pth`` / ``model.pt``) read
without PyTorch, as numpy arrays.

Since PyTorch 1.6 such a file is a zip archive: ``<archive>/data.pkl`` pickles the state dict, each tensor as a call
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` whose storage is a persistent id
``("storage", torch.<Type>Storage, key, location, numel)``; the storage's raw bytes are ``<archive>/data/<key>``, in
the byte order of ``<archive>/byteorder`` (little endian when absent). The pickle is read with an allow-list: only
the tensor-rebuild functions, the storage types and ``OrderedDict`` resolve, each to a stand-in of ours, so a
checkpoint whose pickle would run code is refused before anything runs.
"""

import collections
import os
import pickle
import zipfile

import numpy as np

# storage type -> numpy dtype of its elements (bfloat16 is read as its upper 16 bits of a float32)
STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
# keys under which training checkpoints keep the backbone's state dict
STATE_DICT_KEYS = ("state_dict_backbone", "state_dict", "model", "backbone")
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # pickled magic number of torch.save before 1.6


class _Storage:
    """A storage type stand-in: the persistent id names the element type with it."""

    def __init__(self, name):
        self.name = name


def _rebuild_tensor(storage, offset, size, stride, *_):
    """An array of ``size`` from ``storage`` (a flat array) at ``offset`` with element ``stride``, bounds checked."""
    size, stride = tuple(int(dim) for dim in size), tuple(int(step) for step in stride)
    if len(size) != len(stride) or min(size + stride + (offset,), default=0) < 0:
        raise pickle.UnpicklingError(f"tensor of size {size} and stride {stride} is malformed")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = offset + sum((dim - 1) * step for dim, step in zip(size, stride))
    if last >= storage.size:
        raise pickle.UnpicklingError(f"tensor of size {size} reaches element {last} of a storage of {storage.size}")
    strides = tuple(step * storage.itemsize for step in stride)
    return np.lib.stride_tricks.as_strided(storage[offset:], size, strides, writeable=False).copy()


def _rebuild_parameter(data, *_):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _Storage(name) for name in STORAGE_DTYPES},
}


class _CheckpointUnpickler(pickle.Unpickler):
    """Resolves only ``_ALLOWED`` names; storages come from the archive through ``read_storage(key, type, numel)``."""

    def __init__(self, file_obj, read_storage):
        super().__init__(file_obj)
        self.read_storage = read_storage

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load '{module}.{name}': a state dict holds only tensors and containers"
            )
        return _ALLOWED[(module, name)]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Storage)):
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:80]}")
        return self.read_storage(str(pid[2]), pid[1].name, int(pid[4]))


def _storage_reader(archive, prefix):
    """``read(key, storage type, numel)`` -> flat array of ``<prefix>data/<key>``, each storage read once."""
    big_endian = prefix + "byteorder" in archive.namelist() and archive.read(prefix + "byteorder").strip() == b"big"
    cache = {}

    def read(key, storage_type, numel):
        if key not in cache:
            dtype = STORAGE_DTYPES[storage_type]
            raw_dtype = np.dtype(np.uint16 if dtype == "bfloat16" else dtype).newbyteorder(">" if big_endian else "<")
            try:
                raw = archive.read(f"{prefix}data/{key}")
            except KeyError as err:
                raise pickle.UnpicklingError(f"storage {key} is missing from the archive") from err
            values = np.frombuffer(raw, raw_dtype, count=min(numel, len(raw) // raw_dtype.itemsize))
            if values.size != numel:
                raise pickle.UnpicklingError(f"storage {key} holds {values.size} of its {numel} elements")
            if dtype == "bfloat16":
                values = (values.astype(np.uint32) << 16).view(np.float32)
            cache[key] = values.astype(values.dtype.newbyteorder("="), copy=False)
        return cache[key]

    return read


def _archive_prefix(archive, path):
    """The folder of ``data.pkl`` inside the zip (``archive/`` in recent PyTorch versions, the file's stem before)."""
    pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        if any(name.endswith("/constants.pkl") for name in archive.namelist()):
            raise ValueError(f"{path}: a TorchScript module, not a state dict; save model.state_dict() instead")
        raise ValueError(f"{path}: not a PyTorch checkpoint, no <archive>/data.pkl in the zip")
    return pickles[0][: -len("data.pkl")]


def _state_dict(content, path):
    """The ``{name: array}`` state dict in ``content``: itself, or one kept under a ``STATE_DICT_KEYS`` key."""
    if isinstance(content, dict):
        if content and all(isinstance(value, np.ndarray) for value in content.values()):
            return dict(content)
        for key in STATE_DICT_KEYS:
            if isinstance(content.get(key), dict):
                return _state_dict(content[key], path)
        raise ValueError(f"{path}: holds no state dict of tensors (keys: {', '.join(map(str, list(content)[:8]))})")
    raise ValueError(f"{path}: holds a {type(content).__name__}, not a state dict")


def load_state_dict(path):
    """``{name: numpy array}`` of a PyTorch checkpoint holding a state dict (directly or under
    ``state_dict_backbone`` / ``state_dict`` / ``model`` / ``backbone``); a ``module.`` prefix (DataParallel) is
    dropped. Refuses, in one line, pickles that reference anything but tensors and containers."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as ff:
            legacy = ff.read(len(_LEGACY_MAGIC)) == _LEGACY_MAGIC
        if legacy:
            raise ValueError(
                f"{path}: a legacy (PyTorch < 1.6) checkpoint; load it with PyTorch and torch.save it again"
            )
        raise ValueError(f"{path}: not a PyTorch checkpoint (not a zip archive)")
    with zipfile.ZipFile(path) as archive:
        prefix = _archive_prefix(archive, path)
        with archive.open(prefix + "data.pkl") as ff:
            try:
                content = _CheckpointUnpickler(ff, _storage_reader(archive, prefix)).load()
            except pickle.UnpicklingError as err:
                raise ValueError(f"{path}: {err}") from err
            except (EOFError, TypeError, AttributeError, IndexError, KeyError) as err:
                raise ValueError(f"{path}: unreadable checkpoint pickle ({err!r})") from err
    state_dict = _state_dict(content, path)
    return {name.removeprefix("module."): value for name, value in state_dict.items()}

"""MXNet RecordIO (``train.rec`` + ``train.idx``) in pure Python, no MXNet: the record framing, the image record
header, random access by key, and the *training index* of a record file (every image's byte range and class) that
the input pipeline and the shard converter read images with.

Layout (dmlc-core, as MXNet writes it): each record is ``uint32 magic 0xced7230a``, ``uint32 lrec``
(``cflag = lrec >> 29``, ``length = lrec & (2**29 - 1)``) and ``length`` payload bytes padded to 4. The dmlc
writer splits a payload at every 4-byte-aligned occurrence of the magic word (cflag 1 = first, 2 = middle,
3 = last part) and drops that word, so joining the parts puts the magic word back between them. A payload is
a ``'<IfQQ'`` header (flag, label, id, id2), ``flag`` float32 labels when ``flag > 0``, then the image bytes.
The ``.idx`` is text, one ``key<TAB>offset`` line per record. insightface training sets put a header in record 0
(``flag >= 2``, labels ``[first_identity_record, end]``): images are records ``1 .. first - 1`` and records
``first .. end - 1`` hold each identity's image-key range ``[start, stop)``, which gives every image's class
without reading the images.
"""

import dataclasses
import functools
import os
import struct
import warnings
import weakref
from collections import namedtuple

import numpy as np

from keras_insightface.data.formats import DEFAULT_CACHE_DIR, read_npz_cache, write_npz_cache
from keras_insightface.utils import atomic_write

RECORDIO_MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", RECORDIO_MAGIC)
LENGTH_MASK = (1 << 29) - 1
IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(IR_FORMAT)  # 24
HEADER_BYTES = 8 + IR_SIZE + 8  # frame header, image header and two labels: what the class of a record needs
BLOCK_BYTES = 64 << 20  # sequential passes read this much per call
MAX_GAP = 1 << 20  # records further apart than this are read with separate calls
FAST_READ_LIMIT = 1 << 20  # a record's first read is at most this long; longer records are read frame by frame
_FRAME = struct.Struct("<II")
_UINT32 = struct.Struct("<I")

IRHeader = namedtuple("IRHeader", ["flag", "label", "id", "id2"])


class RecordIOError(ValueError):
    """A RecordIO file is malformed or truncated; the message names the file, record key and byte offset."""


# ---------------------------------------------------------------------------------------------------------
# Record payloads: the '<IfQQ' image-record header.
# ---------------------------------------------------------------------------------------------------------
def pack_record(label, image_bytes, record_id=0, id2=0):
    """Build a record payload: header, then float32 labels if ``label`` is a sequence (multi-label), then image."""
    if np.ndim(label) == 0:
        return struct.pack(IR_FORMAT, 0, float(label), record_id, id2) + bytes(image_bytes)
    labels = np.asarray(label, dtype=np.float32).reshape(-1)
    return struct.pack(IR_FORMAT, labels.size, 0.0, record_id, id2) + labels.tobytes() + bytes(image_bytes)


def unpack_record(payload):
    """Split a payload into ``(IRHeader, image_bytes)``; a multi-label header's ``label`` is a float32 array."""
    if len(payload) < IR_SIZE:
        raise RecordIOError(f"record payload of {len(payload)} bytes is shorter than the {IR_SIZE}-byte header")
    header = IRHeader(*struct.unpack(IR_FORMAT, payload[:IR_SIZE]))
    body = payload[IR_SIZE:]
    if header.flag > 0:
        if len(body) < 4 * header.flag:
            raise RecordIOError(f"record payload announces {header.flag} labels but holds only {len(body)} bytes")
        header = header._replace(label=np.frombuffer(body, np.float32, header.flag).copy())
        body = body[4 * header.flag :]
    return header, body


def identity_header_range(payload):
    """``(first, end)`` of an insightface header record (no image, labels ``[first image-range key, end]``), or None
    for an image record, including an image with two labels."""
    header, image = unpack_record(payload)
    if header.flag < 2 or image:
        return None
    first, end = int(header.label[0]), int(header.label[1])
    return (first, end) if 1 <= first <= end else None


def record_class(header):
    """Class id of an image record: the scalar label, or the first label of a multi-label header."""
    return int(header.label if np.ndim(header.label) == 0 else header.label[0])


def image_bytes_of(payload):
    """The image of a record payload (what follows the header and its labels); ``b""`` when the payload is too short
    to hold one, which the decoder then reports as an unreadable image."""
    if len(payload) < IR_SIZE:
        return b""
    return bytes(payload[IR_SIZE + 4 * _UINT32.unpack_from(payload, 0)[0] :])


# ---------------------------------------------------------------------------------------------------------
# RecordIO framing: reader and writer.
# ---------------------------------------------------------------------------------------------------------
def frame_record(payload):
    """Frame ``payload`` as dmlc does: split at each 4-byte-aligned magic word into cflag 1/2/3 parts, pad to 4."""
    payload = bytes(payload)
    if len(payload) > LENGTH_MASK:
        raise ValueError(f"RecordIO records must be smaller than 2**29 bytes, got {len(payload)}")
    cuts = [pos for pos in range(0, len(payload) - 3, 4) if payload[pos : pos + 4] == MAGIC_BYTES]
    starts, ends = [0] + [pos + 4 for pos in cuts], cuts + [len(payload)]
    frames = []
    for index, (start, end) in enumerate(zip(starts, ends)):
        if len(starts) == 1:
            cflag = 0
        else:
            cflag = 1 if index == 0 else (3 if index == len(starts) - 1 else 2)
        part = payload[start:end]
        frames.append(struct.pack("<II", RECORDIO_MAGIC, (cflag << 29) | len(part)) + part + b"\0" * (-len(part) % 4))
    return b"".join(frames)


def write_recordio(rec_path, idx_path, records):
    """Write ``(key, payload)`` pairs to ``rec_path`` and the ``key\\toffset`` index to ``idx_path``, atomically."""
    with atomic_write(rec_path) as tmp_rec, atomic_write(idx_path) as tmp_idx:
        with open(tmp_rec, "wb") as rec_file, open(tmp_idx, "w") as idx_file:
            for key, payload in records:
                idx_file.write(f"{int(key)}\t{rec_file.tell()}\n")
                rec_file.write(frame_record(payload))
    return rec_path, idx_path


def read_idx(idx_path):
    """Parse a ``.idx`` file into ``{key: offset}`` (file order kept)."""
    keys, offsets = read_idx_arrays(idx_path)
    return dict(zip(keys.tolist(), offsets.tolist()))


def read_idx_arrays(idx_path):
    """``(keys, offsets)`` int64 arrays of a ``.idx`` file, in file order; parsed in C, a few MB at a time."""
    chunks, rest = [], b""
    with open(idx_path, "rb") as ff:
        while True:
            block = ff.read(BLOCK_BYTES)
            text = rest + block
            cut = len(text) if not block else text.rfind(b"\n") + 1
            text, rest = text[:cut], text[cut:]
            chunks.append(_parse_numbers(text, idx_path))
            if not block:
                break
    values = np.concatenate(chunks)
    if values.size % 2:
        raise RecordIOError(f"{idx_path}: not a RecordIO index, expected 'key<TAB>offset' on every line")
    return values[0::2].copy(), values[1::2].copy()


def _parse_numbers(text, idx_path):
    if not text.strip():
        return np.zeros(0, np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # older NumPy only warns about text it cannot parse
        try:
            return np.fromstring(text, dtype=np.int64, sep=" ")
        except (ValueError, DeprecationWarning) as err:
            raise RecordIOError(f"{idx_path}: not a RecordIO index, expected 'key<TAB>offset' lines ({err})") from err


def _read_frames(ff, offset, where, file_size):
    """Payload of the record starting at byte ``offset`` of the open file ``ff`` (parts joined, padding removed);
    errors start with ``where``."""
    ff.seek(offset)
    parts = []
    while True:
        frame_start = ff.tell()
        head = ff.read(8)
        if len(head) < 8:
            raise RecordIOError(
                f"{where}: truncated file, {len(head)} of 8 header bytes at offset {frame_start} (file size {file_size})"
            )
        magic, lrec = _FRAME.unpack(head)
        if magic != RECORDIO_MAGIC:
            raise RecordIOError(f"{where}: bad magic 0x{magic:08x} at offset {frame_start}, not a RecordIO record")
        cflag, length = lrec >> 29, lrec & LENGTH_MASK
        padded = length + (-length % 4)
        body = ff.read(padded)
        if len(body) < padded:
            raise RecordIOError(
                f"{where}: truncated file, record needs {padded} bytes after offset {frame_start + 8} "
                f"but only {len(body)} remain (file size {file_size})"
            )
        if (cflag in (0, 1)) != (not parts):
            raise RecordIOError(f"{where}: unexpected continuation flag {cflag} at offset {frame_start}")
        parts.append(body[:length])
        if cflag in (0, 3):
            return MAGIC_BYTES.join(parts)


class RecordIOReader:
    """Random access to an indexed RecordIO file: ``reader.read(key)`` returns the joined payload bytes."""

    def __init__(self, rec_path, idx_path):
        for path in (rec_path, idx_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"RecordIO file not found: {path}")
        self.rec_path = rec_path
        self.index = read_idx(idx_path)
        self.file_size = os.path.getsize(rec_path)
        self._file = open(rec_path, "rb")  # noqa: SIM115  (closed by close() / the context manager)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._file.close()

    @property
    def keys(self):
        return list(self.index)

    def read(self, key):
        """Payload of record ``key`` (split parts joined, padding removed)."""
        if key not in self.index:
            raise KeyError(f"{self.rec_path}: record {key} is not in the index")
        return self.read_at(self.index[key], key)

    def read_at(self, offset, key=None):
        """Payload of the record starting at byte ``offset``; errors name the record and the offset."""
        return _read_frames(self._file, offset, f"{self.rec_path}: record {key} at offset {offset}", self.file_size)


def rebuild_idx(rec_path, idx_path=None, progress=True):
    """Write the ``.idx`` of ``rec_path`` (a ``.rec`` or a folder with ``train.rec``; default: next to it) from one
    sequential pass over the records: keys are 0, 1, 2 ... in file order, as MXNet and insightface number them. A
    record cut short by the end of the file is an error (nothing is written). Returns the index path."""
    from tqdm import tqdm

    rec_path = rec_path_of(rec_path)
    idx_path = idx_path or idx_path_of(rec_path)
    file_size = os.path.getsize(rec_path)
    starts, position, carry = [], 0, b""
    with open(rec_path, "rb") as ff, tqdm(total=file_size, unit="B", unit_scale=True, disable=not progress) as bar:
        while True:
            block = ff.read(BLOCK_BYTES)
            if not block:
                break
            bar.update(len(block))
            buffer, base = carry + block, position - len(carry)
            consumed = _frame_starts(buffer, base, starts, rec_path)
            carry, position = buffer[consumed:], position + len(block)
    if carry:
        raise RecordIOError(
            f"{rec_path}: truncated file, the last record starting at offset {position - len(carry)} is incomplete "
            f"(file size {file_size}); {len(starts)} complete records before it"
        )
    with atomic_write(idx_path) as tmp_path, open(tmp_path, "w") as out:
        out.writelines(f"{key}\t{offset}\n" for key, offset in enumerate(starts))
    return idx_path


def _frame_starts(buffer, base, starts, rec_path):
    """Append to ``starts`` the file offset of every record that begins in ``buffer`` (which starts at file offset
    ``base``) and whose frame is complete in it; returns how many bytes of ``buffer`` were consumed."""
    pos, end = 0, len(buffer)
    while pos + 8 <= end:
        magic, lrec = _FRAME.unpack_from(buffer, pos)
        if magic != RECORDIO_MAGIC:
            raise RecordIOError(f"{rec_path}: bad magic 0x{magic:08x} at offset {base + pos}, not a RecordIO record")
        length = lrec & LENGTH_MASK
        frame_end = pos + 8 + length + (-length % 4)
        if frame_end > end:
            break
        if lrec >> 29 in (0, 1):  # a whole record, or the first part of a split one
            starts.append(base + pos)
        pos = frame_end
    return pos


# ---------------------------------------------------------------------------------------------------------
# The training index: every image's key, byte range and class.
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RecordIndex:
    """The images of a record file, in key order: ``keys``, ``offsets``, ``spans`` (bytes from a record's offset to
    the next record, which covers its frames) and ``labels`` (int64 class ids), all numpy arrays."""

    rec_path: str
    keys: np.ndarray
    offsets: np.ndarray
    spans: np.ndarray
    labels: np.ndarray

    @property
    def num_images(self):
        return len(self.keys)

    @property
    def classes(self):
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def name(self, position):
        """How a skipped image is named in warnings: the record file and the record key."""
        return f"{self.rec_path} record {int(self.keys[position])}"


def rec_path_of(data_path):
    """The record file of ``data_path``: ``train.rec`` in a folder, else the path itself."""
    data_path = os.fspath(data_path)
    return os.path.join(data_path, "train.rec") if os.path.isdir(data_path) else data_path


def idx_path_of(rec_path):
    """Where the index of a record file lives: next to it, with the ``.idx`` extension."""
    return os.path.splitext(rec_path)[0] + ".idx"


def find_recordio(data_path):
    """``(rec_path, idx_path)`` of a folder holding ``train.rec`` or of a ``.rec`` path. A missing ``.idx`` is an
    error that says how to rebuild it."""
    rec_path = rec_path_of(data_path)
    if not os.path.isfile(rec_path):
        raise FileNotFoundError(f"RecordIO file not found: {rec_path}")
    idx_path = idx_path_of(rec_path)
    if not os.path.isfile(idx_path):
        raise FileNotFoundError(
            f"{idx_path} not found: the index of {rec_path} is missing; rebuild it with one sequential pass: "
            f"python prepare_data.py --rebuild_idx {rec_path}"
        )
    return rec_path, idx_path


def is_recordio(data_path):
    """True for a ``.rec`` path or a folder holding ``train.rec``."""
    data_path = os.fspath(data_path)
    return data_path.endswith(".rec") or os.path.isfile(os.path.join(data_path, "train.rec"))


def file_fingerprint(*paths):
    """A cheap signature of files: their absolute paths, sizes and modification times."""
    stats = [(os.path.abspath(path), os.stat(path)) for path in paths]
    return "|".join(f"{path}:{stat.st_size}:{stat.st_mtime_ns}" for path, stat in stats)


def load_index(data_path, cache_dir=None, progress=True):
    """The :class:`RecordIndex` of a ``.rec`` (or a folder with ``train.rec``), cached in ``cache_dir`` and rebuilt
    when the ``.rec`` or ``.idx`` changes. Classes come from the identity records when record 0 announces them,
    else from one sequential pass over the image headers (with a progress bar)."""
    rec_path, idx_path = find_recordio(data_path)
    fingerprint = file_fingerprint(rec_path, idx_path)
    stem = os.path.basename(os.path.dirname(os.path.abspath(rec_path))) + "_" + os.path.basename(rec_path)
    cache_file = os.path.join(cache_dir or DEFAULT_CACHE_DIR, stem.replace(".", "_") + "_index.npz")
    fields = ("keys", "offsets", "spans", "labels")
    cached = read_npz_cache(cache_file, fingerprint, fields)
    if cached is not None:
        return RecordIndex(rec_path, **cached)
    index = build_index(rec_path, idx_path, progress)
    _check_labels(index)
    write_npz_cache(cache_file, {field: getattr(index, field) for field in fields}, fingerprint)
    return index


def build_index(rec_path, idx_path, progress=True):
    """Read the ``.idx`` and the classes of every image (see :func:`load_index`); checks that the index fits the
    file (an ``.idx`` pointing past the end, a truncated last record)."""
    keys, offsets = read_idx_arrays(idx_path)
    if len(keys) == 0:
        raise RecordIOError(f"{idx_path}: the index lists no records")
    file_size = os.path.getsize(rec_path)
    records = _Records(rec_path, keys, offsets, _spans(offsets, file_size), file_size)
    _check_extent(records, idx_path)
    positions, labels = _labels_from_identity_records(records)
    if len(positions) == 0:
        raise RecordIOError(f"{rec_path}: no image records (the index lists {len(keys)} records)")
    if labels is None:
        labels = _scan_labels(records, positions, progress)
    order = np.argsort(keys[positions], kind="stable")
    positions, labels = positions[order], labels[order]
    return RecordIndex(rec_path, keys[positions], offsets[positions], records.spans[positions], labels)


def _check_extent(records, idx_path):
    """Every offset lies in the file and the last record is complete: a truncated ``.rec`` or an ``.idx`` of
    another file is an error naming the first record concerned."""
    offsets, file_size = records.offsets, records.file_size
    outside = np.flatnonzero((offsets < 0) | (offsets + 8 > file_size))
    if len(outside):
        first = outside[np.argmin(offsets[outside])]
        raise RecordIOError(
            f"{idx_path}: record {records.keys[first]} at offset {offsets[first]} points past the end of "
            f"{records.rec_path} ({file_size} bytes; {len(outside)} records outside it): the .rec is truncated or "
            "the .idx belongs to another file"
        )
    records.payload(int(np.argmax(offsets)))


def _spans(offsets, file_size):
    """Bytes from each offset to the next larger offset (or to the end of the file)."""
    ordered = np.sort(offsets)  # (np.unique hashes: 10x slower on millions of offsets)
    following = np.append(ordered, file_size)[np.searchsorted(ordered, offsets, side="right")]
    return following - offsets


@dataclasses.dataclass
class _Records:
    """Every record of an ``.idx`` with its byte span, for the index builder."""

    rec_path: str
    keys: np.ndarray
    offsets: np.ndarray
    spans: np.ndarray
    file_size: int

    @functools.cached_property
    def key_order(self):
        return np.argsort(self.keys, kind="stable")

    def positions_of(self, wanted):
        """Positions in ``keys`` of the keys ``wanted`` (-1 for keys the index does not list)."""
        found = np.minimum(np.searchsorted(self.keys, wanted, sorter=self.key_order), len(self.keys) - 1)
        found = self.key_order[found]
        return np.where(self.keys[found] == wanted, found, -1)

    def payload(self, position):
        key, offset = int(self.keys[position]), int(self.offsets[position])
        with open(self.rec_path, "rb") as ff:
            return _read_frames(ff, offset, f"{self.rec_path}: record {key} at offset {offset}", self.file_size)


def _header_fields(records, positions, progress=False):
    """``(classes float64, labels of a 2-label header as an (n, 2) array, flags)`` of the records at ``positions``,
    read from their first ``HEADER_BYTES`` in large sequential blocks and decoded with numpy. Records whose header
    is split across frames are read whole."""
    from tqdm import tqdm

    order = np.argsort(records.offsets[positions], kind="stable")
    heads = np.zeros((len(positions), HEADER_BYTES), np.uint8)
    total = int(records.spans[positions].sum())
    with (
        open(records.rec_path, "rb") as ff,
        tqdm(total=total, unit="B", unit_scale=True, desc="Reading labels", disable=not progress) as bar,
    ):
        for start, stop in _read_groups(records.offsets[positions[order]], records.spans[positions[order]]):
            chosen = order[start:stop]
            first = int(records.offsets[positions[chosen[0]]])
            ff.seek(first)
            block = ff.read(int(records.offsets[positions[chosen[-1]]]) + HEADER_BYTES - first)
            heads[chosen] = _bytes_at(block, records.offsets[positions[chosen]] - first, HEADER_BYTES)
            bar.update(int(records.spans[positions[chosen]].sum()))
    return _decode_heads(records, positions, heads)


def _bytes_at(block, offsets, width):
    """The ``width`` bytes of ``block`` at each offset, as the rows of a uint8 matrix (zeros past its end), without
    copying the block."""
    data = np.frombuffer(block, np.uint8)
    where = offsets[:, None] + np.arange(width)
    return np.where(where < len(data), data[np.minimum(where, len(data) - 1)], 0).astype(np.uint8)


def _decode_heads(records, positions, heads):
    """The fields of ``_header_fields`` from the raw first bytes of each record (see the module docstring)."""
    words = heads.view("<u4")
    magic, lrec, flags = words[:, 0], words[:, 1], words[:, 2].astype(np.int64)
    floats = heads.view("<f4")
    bad = np.flatnonzero(magic != RECORDIO_MAGIC)
    if len(bad):
        key, offset = records.keys[positions[bad[0]]], records.offsets[positions[bad[0]]]
        raise RecordIOError(
            f"{records.rec_path}: record {key} at offset {offset}: bad magic 0x{magic[bad[0]]:08x}, not a RecordIO "
            "record (does the .idx belong to this .rec?)"
        )
    pairs = floats[:, 8:10].astype(np.float64)
    classes = np.where(flags > 0, floats[:, 8], floats[:, 3]).astype(np.float64)  # first extra label, or the label
    needed = IR_SIZE + 4 * np.minimum(flags, 2)
    split = np.flatnonzero(((lrec >> 29) != 0) & ((lrec & LENGTH_MASK) < needed))
    for row in split:  # the magic word inside the header: read the joined payload
        header, _ = unpack_record(records.payload(positions[row]))
        labels = np.atleast_1d(header.label).astype(np.float64)
        classes[row], flags[row] = labels[0], header.flag
        pairs[row, : min(2, len(labels))] = labels[:2]
    too_short = np.flatnonzero(((lrec >> 29) == 0) & ((lrec & LENGTH_MASK) < needed))
    classes[too_short] = np.nan  # reported by the label check with the record's key
    return classes, pairs, flags


def _read_groups(offsets, spans, block_bytes=BLOCK_BYTES):
    """``(start, stop)`` ranges of the sorted ``offsets`` to read with one call each: at most about ``block_bytes``
    per call, and a new call where the next record is more than ``MAX_GAP`` bytes away."""
    ends = offsets + spans
    breaks = np.flatnonzero(offsets[1:] - ends[:-1] > MAX_GAP) + 1
    start = 0
    while start < len(offsets):
        stop = max(start + 1, int(np.searchsorted(ends, offsets[start] + block_bytes, side="right")))
        after = breaks[np.searchsorted(breaks, start, side="right") :]
        stop = min(stop, int(after[0])) if len(after) else stop
        yield start, stop
        start = stop


FLOAT32_EXACT = 2**24  # record labels are float32: every integer below this is exact, not every one above


def _labels_from_identity_records(records):
    """``(image positions, classes or None)``: with an insightface header in record 0, the image records and their
    classes from the identity ranges (None when those are missing or inconsistent, or a sample of image headers
    disagrees: the caller then reads every image header); without one, every record and None."""
    everything = np.arange(len(records.keys))
    zero = records.positions_of(np.array([0]))[0]
    if zero < 0:
        return everything, None
    bounds = identity_header_range(records.payload(zero))
    if bounds is None or bounds[1] > len(records.keys) + _float32_step(bounds[1]):
        return everything, None
    first, end = bounds
    first, end = _first_identity_record(records, first), min(end, len(records.keys))
    positions = records.positions_of(np.arange(1, first))
    if (positions < 0).any():
        warnings.warn(
            f"{records.rec_path}: record 0 announces {first - 1} images but the .idx lists "
            f"{int((positions >= 0).sum())} of them; training on those",
            stacklevel=3,
        )
    positions = positions[positions >= 0]
    by_key = _classes_from_ranges(records, first, end)
    if by_key is None:
        return positions, None
    labels = by_key[records.keys[positions]]
    inexact = labels < 0  # keys from 2**24 on: their ranges' float32 bounds may be off by a few records
    if inexact.any():
        labels[inexact] = _scan_labels(records, positions[inexact], progress=False)
    return positions, labels if _sample_agrees(records, positions, labels) else None


def _float32_step(value):
    """The distance between neighbouring float32 numbers at ``value``: 1 up to 2**24, 2 up to 2**25, 4 ..."""
    return max(1, int(np.spacing(np.float32(value))))


def _first_identity_record(records, announced):
    """The key of the first identity record. Record 0 stores it as a float32, exact up to 2**24 only (WebFace42M's
    42,474,558 reads as 42,474,560), so the records around ``announced`` are looked at: an identity record holds
    two labels and no image, the records before it are images."""
    window = _float32_step(announced)
    if window == 1:
        return announced
    for key in range(max(1, announced - window), announced + window + 1):
        position = records.positions_of(np.array([key]))[0]
        header, image = unpack_record(records.payload(position)) if position >= 0 else (None, b"")
        if header is not None and header.flag >= 2 and not image:
            return key
    return announced


def _classes_from_ranges(records, first, end):
    """Class of every image key ``< first`` from the identity records ``first .. end - 1`` (class ``c`` is record
    ``first + c``, holding labels ``[start, stop)``), or None when they are missing or do not tile the keys. The
    bounds are float32: keys from ``FLOAT32_EXACT`` on get -1 (their classes are read from their own headers)."""
    identities = records.positions_of(np.arange(first, end))
    if len(identities) == 0 or (identities < 0).any():
        return None
    _, pairs, flags = _header_fields(records, identities)
    starts, stops = pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)
    exact = min(first, FLOAT32_EXACT)
    if first > exact:  # the last bound may round past the first identity record
        stops = np.minimum(stops, first)
    if (flags < 2).any() or (starts < 1).any() or (stops < starts).any() or (stops > first).any():
        return None
    counts = stops - starts
    image_keys = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(starts, counts)
    classes = np.repeat(np.arange(len(starts)), counts)
    classes, image_keys = classes[image_keys < exact], image_keys[image_keys < exact]
    if (np.bincount(image_keys, minlength=exact)[1:] != 1).any():
        return None  # overlapping ranges, or images in no range
    by_key = np.full(first, -1, np.int64)
    by_key[image_keys] = classes
    return by_key


def _sample_agrees(records, positions, labels, samples=32):
    """True when the headers of a few images spread over the file carry the classes their identity ranges give."""
    chosen = np.unique(np.linspace(0, len(positions) - 1, min(samples, len(positions))).astype(np.int64))
    classes, _, _ = _header_fields(records, positions[chosen])
    if np.array_equal(classes, labels[chosen]):
        return True
    warnings.warn(
        f"{records.rec_path}: image headers disagree with the identity records of record 0; reading every image "
        "header for the classes",
        stacklevel=4,
    )
    return False


def _scan_labels(records, positions, progress):
    """Classes of the images at ``positions`` read from their headers: one sequential pass (done once, cached)."""
    classes, _, _ = _header_fields(records, positions, progress)
    bad = np.flatnonzero(~np.isfinite(classes) | (classes < 0) | (classes != np.floor(classes)))
    if len(bad):
        key, offset = records.keys[positions[bad[0]]], records.offsets[positions[bad[0]]]
        raise RecordIOError(
            f"{records.rec_path}: record {key} at offset {offset} has label {classes[bad[0]]}, not a class id "
            f"({len(bad)} such records)"
        )
    return classes.astype(np.int64)


def _check_labels(index):
    """Warn about class ids without images and a class count that differs from the ``property`` file."""
    counts = np.bincount(index.labels)
    if (counts == 0).any():
        warnings.warn(
            f"{index.rec_path}: {int((counts == 0).sum())} of the class ids 0..{len(counts) - 1} have no images",
            stacklevel=3,
        )
    property_path = os.path.join(os.path.dirname(index.rec_path), "property")
    if os.path.isfile(property_path):
        with open(property_path) as ff:
            announced = ff.read().split(",")[0].strip()
        if announced.isdigit() and int(announced) != index.classes:
            warnings.warn(
                f"{property_path} announces {announced} classes, the records hold {index.classes}", stacklevel=3
            )


# ---------------------------------------------------------------------------------------------------------
# Reading images: random access for training, large sequential blocks for conversion.
# ---------------------------------------------------------------------------------------------------------
def _whole_payload(buffer, start, end):
    """The payload of a record framed whole (cflag 0) at ``buffer[start:end]``, or None if it is not one there."""
    if end - start < 8:
        return None
    magic, lrec = _FRAME.unpack_from(buffer, start)
    length = lrec & LENGTH_MASK
    if magic != RECORDIO_MAGIC or lrec >> 29 or start + 8 + length > end:
        return None
    return buffer[start + 8 : start + 8 + length]


class RecordFile:
    """Reads the images of a :class:`RecordIndex` by position, one ``pread`` per record (thread-safe; the file stays
    open while this object lives). A record that cannot be read gives ``b""``, which the decoder reports."""

    def __init__(self, index):
        self.index = index
        self._fd = os.open(index.rec_path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)

    def read(self, positions):
        """``(images, labels)`` of the records at ``positions``: an object array of bytes and an int64 array."""
        positions = np.asarray(positions, np.int64)
        images = np.empty(len(positions), object)
        offsets, spans = self.index.offsets[positions], np.minimum(self.index.spans[positions], FAST_READ_LIMIT)
        for row, (offset, span) in enumerate(zip(offsets.tolist(), spans.tolist())):
            buffer = os.pread(self._fd, span, offset)
            payload = _whole_payload(memoryview(buffer), 0, len(buffer))  # sliced without a copy
            images[row] = image_bytes_of(
                payload if payload is not None else _joined_payload(self.index, positions[row])
            )
        return images, self.index.labels[positions]


def _joined_payload(index, position):
    """The payload of a record split into parts (or longer than a first read), or ``b""`` if it is broken."""
    offset = int(index.offsets[position])
    try:
        with open(index.rec_path, "rb") as ff:
            return _read_frames(ff, offset, index.name(position), os.fstat(ff.fileno()).st_size)
    except RecordIOError:
        return b""


def iter_image_blocks(index, positions, block_bytes=BLOCK_BYTES):
    """The images at ``positions`` (in file order), a block at a time: ``(positions, buffer, starts, ends)`` where
    image ``i`` of the block is ``buffer[starts[i]:ends[i]]``. One read per block of about ``block_bytes``, made
    by a thread while the previous block is used, into one of two buffers that the blocks take turns in (a block is
    valid until the next one is asked for). The record headers are decoded with numpy. A record split into parts is
    read on its own and appended to the buffer; a broken one gives an empty image, which the decoder reports."""
    from concurrent.futures import ThreadPoolExecutor

    positions = np.asarray(positions)
    positions = positions[np.argsort(index.offsets[positions], kind="stable")]
    groups = list(_read_groups(index.offsets[positions], index.spans[positions], block_bytes))
    buffers = [bytearray(), bytearray()]

    def read(number):
        start, stop = groups[number]
        first, last = int(index.offsets[positions[start]]), positions[stop - 1]
        size = int(index.offsets[last] + index.spans[last]) - first
        if len(buffers[number % 2]) < size:
            buffers[number % 2] = bytearray(size)
        block = memoryview(buffers[number % 2])[:size]
        ff.seek(first)
        return first, block[: ff.readinto(block)]

    with open(index.rec_path, "rb") as ff, ThreadPoolExecutor(1) as reader:
        pending = reader.submit(read, 0) if groups else None
        for number, (start, stop) in enumerate(groups):
            first, block = pending.result()
            if number + 1 < len(groups):
                pending = reader.submit(read, number + 1)
            chosen = positions[start:stop]
            yield (chosen, *_with_parted_records(index, chosen, block, index.offsets[chosen] - first))


def _with_parted_records(index, chosen, block, offsets):
    """``(buffer, starts, ends)`` of the images of records ``chosen`` at ``offsets`` in ``block``; the images of
    records split into parts (read on their own) are appended."""
    starts, ends = _image_ranges(block, offsets, index.spans[chosen])
    parted = np.flatnonzero(starts < 0)
    if not len(parted):
        return block, starts, ends
    extras = [image_bytes_of(_joined_payload(index, position)) for position in chosen[parted].tolist()]
    lengths = [len(image) for image in extras]
    ends[parted] = len(block) + np.cumsum(lengths)
    starts[parted] = ends[parted] - lengths
    return b"".join([block, *extras]), starts, ends


def _image_ranges(block, offsets, spans):
    """``(starts, ends)`` of the image in each record framed whole at ``block[offsets[i]:offsets[i] + spans[i]]``;
    -1 for records that are not (split into parts, or not a record there). A payload too short to hold its
    header and labels has an empty image."""
    magic, lrec, flags = _bytes_at(block, offsets, 12).view("<u4").astype(np.int64).T
    ends = offsets + 8 + (lrec & LENGTH_MASK)
    whole = (magic == RECORDIO_MAGIC) & (lrec >> 29 == 0) & (ends <= np.minimum(offsets + spans, len(block)))
    starts = np.minimum(offsets + 8 + IR_SIZE + 4 * flags, ends)
    return np.where(whole, starts, -1), np.where(whole, ends, -1)

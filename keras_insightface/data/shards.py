"""TFRecord shards of a training set: the encoded images copied (no decoding) from a RecordIO file or a class
folder into ``train-KKKKK-of-NNNNN.tfrecord`` files plus a ``shards.json`` index (images, classes, shard sizes).

Each record is a ``tf.train.Example`` with ``image`` (the encoded bytes), ``label`` (int64 class) and ``key`` (where
the image came from, relative to the source: ``train.rec record 17`` or ``0/12.jpg``), so a corrupt image is named
at training time. Shards are written :data:`SHARD_GROUP` at a time from a contiguous stretch of the source, its
images dealt round-robin among them: the source is read sequentially and every shard still holds many identities.
Each shard appears under its final name only when complete, and the index is written last, so an interrupted
conversion resumes with the next unfinished group and a folder with an index is complete. Local shard files are
written with plain file calls; other paths go through ``tf.io.gfile`` (``gs://`` / ``s3://`` where TensorFlow's file
systems are installed). The records are framed a block of images at a time (:mod:`tfrecord`).
"""

import dataclasses
import json
import os
import time

import numpy as np

from keras_insightface.data import recordio, tfrecord
from keras_insightface.data.formats import folder_fingerprint, list_images

SHARD_INDEX = "shards.json"
SHARD_FORMAT = "keras_insightface.shards.v1"
SHARD_GROUP = 16  # shards written at a time (one sequential stretch of the source); a kill loses at most these
TARGET_SHARD_BYTES = 256 << 20
PARALLEL_MIN_BYTES = 1 << 30  # smaller sources convert in one process: a new one first starts and loads the index
FOLDER_BLOCK_FILES = 2048  # files of a class folder framed together
PLAN_FILE = ".shards_plan.json"  # what an unfinished conversion is writing: a resumed run must match it


def shard_name(shard, num_shards):
    return f"train-{shard:05d}-of-{num_shards:05d}.tfrecord"


def feature_spec():
    """The ``tf.io.parse_example`` spec of a shard record."""
    import tensorflow as tf

    return {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "key": tf.io.FixedLenFeature([], tf.string),
    }


# ---------------------------------------------------------------------------------------------------------
# The index.
# ---------------------------------------------------------------------------------------------------------
def index_path_of(data_path):
    data_path = os.fspath(data_path)
    return data_path if data_path.endswith(".json") else _join(data_path, SHARD_INDEX)


def is_shard_folder(data_path):
    """True for a folder holding ``shards.json`` (or the path of that file), or an unfinished conversion."""
    import tensorflow as tf

    path = index_path_of(data_path)
    unfinished = _join(os.path.dirname(path), PLAN_FILE)
    return os.path.basename(path) == SHARD_INDEX and (tf.io.gfile.exists(path) or tf.io.gfile.exists(unfinished))


def read_index(data_path):
    """The index of a shard folder: a dict with ``images``, ``classes``, ``source``, ``files`` (full paths) and
    ``sizes`` (images per shard, a numpy array). Missing shard files are an error."""
    import tensorflow as tf

    path = index_path_of(data_path)
    if not tf.io.gfile.exists(path):
        unfinished = tf.io.gfile.exists(_join(os.path.dirname(path), PLAN_FILE))
        hint = ": the conversion is unfinished, run the same prepare_data.py --to-shards command again" * unfinished
        raise FileNotFoundError(f"shard index not found: {path}{hint}")
    with tf.io.gfile.GFile(path) as ff:
        content = json.load(ff)
    if content.get("format") != SHARD_FORMAT:
        raise ValueError(f"{path}: not a shard index (format {content.get('format')!r}, expected {SHARD_FORMAT!r})")
    folder = os.path.dirname(path)
    files = [_join(folder, shard["file"]) for shard in content["shards"]]
    missing = [name for name in files if not tf.io.gfile.exists(name)]
    if missing:
        raise FileNotFoundError(f"{path}: {len(missing)} shard files are missing, first {missing[0]}")
    for name, shard in zip(files, content["shards"]):
        size = tf.io.gfile.stat(name).length
        if size != shard["bytes"]:
            raise ValueError(f"{name}: {size} bytes, the index says {shard['bytes']}: the shard is damaged")
    sizes = np.array([shard["images"] for shard in content["shards"]], np.int64)
    return dict(content, files=files, sizes=sizes)


def _join(folder, name):
    return f"{folder.rstrip('/')}/{name}" if "://" in folder else os.path.join(folder, name)


def _write_text(path, text):
    """Write ``text`` to ``path`` through ``tf.io.gfile``: a temporary file renamed over it (atomic on local disks;
    on object stores the object appears only when complete)."""
    import tensorflow as tf

    partial = path + ".partial"
    with tf.io.gfile.GFile(partial, "w") as ff:
        ff.write(text)
    tf.io.gfile.rename(partial, path, overwrite=True)


# ---------------------------------------------------------------------------------------------------------
# Sources: the images of a record file or a class folder, in an order that reads the source sequentially.
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Items:
    """A source to copy: ``labels`` in reading order; ``read(start, stop)`` yields that stretch a block at a time as
    ``(buffer, starts, ends, keys)``: image ``i`` is ``buffer[starts[i]:ends[i]]``, ``keys`` a numpy bytes array;
    ``nbytes`` is about the size of all images."""

    folder: str
    fingerprint: str
    labels: np.ndarray
    nbytes: int
    read: object


def _recordio_items(source, cache_dir):
    index = recordio.load_index(source, cache_dir)
    order = np.argsort(index.offsets, kind="stable")  # file order: one sequential pass
    prefix = os.path.basename(index.rec_path).encode() + b" record "

    def read(start, stop):
        for positions, buffer, starts, ends in recordio.iter_image_blocks(index, order[start:stop]):
            yield buffer, starts, ends, np.char.add(prefix, index.keys[positions].astype(np.bytes_))

    fingerprint = recordio.file_fingerprint(*recordio.find_recordio(source))
    folder = os.path.dirname(os.path.abspath(index.rec_path))
    return _Items(folder, fingerprint, index.labels[order], int(index.spans.sum()), read)


def _read_file(path):
    with open(path, "rb") as ff:
        return ff.read()


def _folder_items(source, cache_dir, workers=8):
    from concurrent.futures import ThreadPoolExecutor

    listing = list_images(source, cache_dir)  # cached: worker processes do not scan the folder again
    names, labels = listing["image_names"], listing["image_classes"]
    sample = names[:: max(1, len(names) // 1000)]
    nbytes = int(np.mean([os.path.getsize(name) for name in sample]) * len(names))

    def read(start, stop):
        chunk = FOLDER_BLOCK_FILES
        with ThreadPoolExecutor(workers) as pool:  # reads the next chunk of files while this one is written
            pending = pool.map(_read_file, names[start : min(start + chunk, stop)])
            for first in range(start, stop, chunk):
                contents = list(pending)
                pending = pool.map(_read_file, names[first + chunk : min(first + 2 * chunk, stop)])
                yield _folder_block(source, names[first : first + len(contents)], contents)

    return _Items(os.path.abspath(source), folder_fingerprint(source), labels, nbytes, read)


def _folder_block(source, names, contents):
    """A block of class-folder images: ``(buffer, starts, ends, keys)``, the keys relative to the folder."""
    lengths = np.array([len(content) for content in contents], np.int64)
    keys = np.array([os.path.relpath(name, source).encode("utf-8", "surrogateescape") for name in names])
    return b"".join(contents), np.cumsum(lengths) - lengths, np.cumsum(lengths), keys


def _open_items(source, cache_dir):
    if recordio.is_recordio(source):
        return _recordio_items(source, cache_dir)
    if not os.path.isdir(source):
        raise FileNotFoundError(f"not a RecordIO file or class folder: {source}")
    return _folder_items(source, cache_dir)


# ---------------------------------------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------------------------------------
def default_shard_count(nbytes, num_images):
    """About :data:`TARGET_SHARD_BYTES` per shard, rounded up to a multiple of 16 so that 1, 2, 4, 8 or 16 workers
    each read whole shards; never more shards than images."""
    count = -(-max(1, nbytes) // TARGET_SHARD_BYTES)
    return int(min(num_images, -(-count // 16) * 16))


def shard_assignment(num_images, num_shards, group):
    """The shard of each image (in source order): shards get ``num_images // num_shards`` images or one more; each
    group of ``group`` shards takes the next stretch of the source, dealt round-robin among them."""
    sizes = num_images // num_shards + (np.arange(num_shards) < num_images % num_shards)
    assignment, start = np.empty(num_images, np.int64), 0
    for first in range(0, num_shards, group):
        members = min(group, num_shards - first)
        count = int(sizes[first : first + members].sum())
        assignment[start : start + count] = first + np.arange(count) % members
        start += count
    return assignment


def write_shards(source, dest_dir, num_shards=0, cache_dir=None, progress=True, workers=1):
    """Copy the images of ``source`` (a ``.rec``, a folder with ``train.rec``, or a class folder) into TFRecord
    shards in ``dest_dir`` (see the module docstring); ``num_shards`` 0 picks :func:`default_shard_count`.
    ``workers > 1`` converts that many groups at a time in separate processes (each reads its own stretches of the
    source sequentially; sources of at least ``PARALLEL_MIN_BYTES``): one process keeps about 1.2 cores busy.

    Resumable: re-running the same command keeps the complete shards; a folder being filled from another source
    or with another shard count is refused. Returns a summary dict (``images``, ``classes``, ``shards``, ``new``
    images written by this call, ``seconds``, ``mb_per_s`` of image bytes written)."""
    import tensorflow as tf

    items = _open_items(os.fspath(source), cache_dir)
    num_images = len(items.labels)
    num_shards = min(int(num_shards) or default_shard_count(items.nbytes, num_images), num_images)
    plan = {"source": items.folder, "fingerprint": items.fingerprint, "images": num_images, "shards": num_shards}
    plan.update(classes=int(items.labels.max()) + 1, group=SHARD_GROUP, format=SHARD_FORMAT)
    summary = {"dest_dir": dest_dir, "images": num_images, "classes": plan["classes"], "shards": num_shards, "new": 0}
    tf.io.gfile.makedirs(dest_dir)
    if not _claim(dest_dir, plan):
        return summary  # already complete
    assignment = shard_assignment(num_images, num_shards, SHARD_GROUP)
    names = [_join(dest_dir, shard_name(shard, num_shards)) for shard in range(num_shards)]
    jobs = _group_jobs(assignment, names)
    with _Progress(num_images, num_images - sum(job.stop - job.start for job in jobs), progress) as bar:
        if workers > 1 and len(jobs) > 1 and items.nbytes >= PARALLEL_MIN_BYTES:
            _write_groups_in_processes(os.fspath(source), cache_dir, jobs, workers, bar)
        else:
            for job in jobs:
                _write_group(items, job, bar)
    _write_index(dest_dir, plan, names, assignment)
    seconds = time.perf_counter() - bar.began
    summary.update(new=bar.written, seconds=round(seconds, 2), mb_per_s=round(bar.bytes / 1e6 / seconds, 1))
    return summary


def _claim(dest_dir, plan):
    """Check that ``dest_dir`` is empty or holds (part of) this very conversion, and record the plan there.
    Returns False when the conversion is already complete."""
    import tensorflow as tf

    index_path, plan_path = _join(dest_dir, SHARD_INDEX), _join(dest_dir, PLAN_FILE)
    for path, what in ((index_path, "holds the shards"), (plan_path, "holds an unfinished conversion")):
        if tf.io.gfile.exists(path):
            with tf.io.gfile.GFile(path) as ff:
                found = json.load(ff)
            found = found.get("plan", found)
            if found != plan:
                changed = sorted(key for key in plan if found.get(key) != plan[key])
                raise ValueError(
                    f"{dest_dir} {what} of another conversion (differs in {', '.join(changed)}): use another "
                    "output folder, or delete it to start over"
                )
            if path == index_path:
                return False
    _write_text(plan_path, json.dumps(plan))
    return True


@dataclasses.dataclass
class _GroupJob:
    """One group of shards to write: the source stretch ``[start, stop)``, the shard of each of its images, and the
    shards still missing (``{shard: final path}``)."""

    start: int
    stop: int
    shards: np.ndarray
    targets: dict


def _group_jobs(assignment, names):
    """The groups with shards still to write (a complete shard file is kept)."""
    import tensorflow as tf

    groups, jobs = assignment // SHARD_GROUP, []  # non-decreasing: each group holds one stretch of the source
    for group in range(-(-len(names) // SHARD_GROUP)):
        start, stop = int(np.searchsorted(groups, group)), int(np.searchsorted(groups, group, side="right"))
        members = range(group * SHARD_GROUP, min((group + 1) * SHARD_GROUP, len(names)))
        targets = {shard: names[shard] for shard in members if not tf.io.gfile.exists(names[shard])}
        if targets:
            jobs.append(_GroupJob(start, stop, assignment[start:stop], targets))
    return jobs


class _Progress:
    """The conversion's progress bar: images/s as its rate, MB/s of image bytes written next to it."""

    def __init__(self, total, initial, enabled):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="img", desc="Writing shards", disable=not enabled)
        self.began, self.written, self.bytes = time.perf_counter(), 0, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()

    def add(self, images, written, nbytes):
        self.written, self.bytes = self.written + written, self.bytes + nbytes
        self.bar.set_postfix_str(f"{self.bytes / 1e6 / (time.perf_counter() - self.began):.0f} MB/s", refresh=False)
        self.bar.update(images)


def _write_group(items, job, progress):
    """Write the missing shards of one group from its source stretch: each to ``<path>.partial``, renamed to its
    final name once closed; ``progress.add`` counts the images read and written and the bytes as it goes. A thread
    writes each block's records while the next block is framed."""
    from concurrent.futures import ThreadPoolExecutor

    targets = np.array(sorted(job.targets))
    outputs = [_open_output(job.targets[shard] + ".partial") for shard in targets.tolist()]
    done, framer, written = 0, tfrecord.ExampleFramer(), None
    try:
        with ThreadPoolExecutor(1) as writer:
            for block in items.read(job.start, job.stop):
                stretch = slice(done, done + len(block[1]))
                labels = items.labels[job.start :][stretch]
                framed, firsts, stops, count, nbytes = _frame_block(framer, block, job.shards[stretch], labels, targets)
                if written is not None:
                    written.result()  # the framer's other buffer is free again
                written = writer.submit(_write_shares, outputs, framed, firsts, stops)
                progress.add(stretch.stop - stretch.start, count, nbytes)
                done = stretch.stop
            if written is not None:
                written.result()
    finally:
        for output in outputs:
            output.close()
    for path in job.targets.values():
        _rename(path + ".partial", path)


def _frame_block(framer, block, shard_of, labels, targets):
    """The images of a block ``(buffer, starts, ends, keys)`` that go to the shards ``targets``, framed shard after
    shard: ``(bytes, where each target's records start and stop in them, images framed, their bytes)``."""
    buffer, starts, ends, keys = block
    chosen = np.flatnonzero(np.isin(shard_of, targets))
    chosen = chosen[np.argsort(shard_of[chosen], kind="stable")]
    framed, record_ends = framer.frame(buffer, starts[chosen], ends[chosen], labels[chosen], keys[chosen])
    record_ends = np.append(0, record_ends)
    firsts = record_ends[np.searchsorted(shard_of[chosen], targets, side="left")]
    stops = record_ends[np.searchsorted(shard_of[chosen], targets, side="right")]
    return framed, firsts, stops, len(chosen), int((ends - starts)[chosen].sum())


def _write_shares(outputs, framed, firsts, stops):
    """Append ``framed[firsts[i]:stops[i]]`` to ``outputs[i]``."""
    for output, first, stop in zip(outputs, firsts.tolist(), stops.tolist()):
        output.write(framed[first:stop])


def _rename(source, dest):
    """Rename a written shard into place; local files without importing TensorFlow (conversion processes)."""
    if "://" not in dest:
        os.replace(source, dest)
    else:
        import tensorflow as tf

        tf.io.gfile.rename(source, dest, overwrite=True)


class _GFileOutput:
    """A ``tf.io.gfile`` file that takes numpy bytes (for ``gs://`` / ``s3://`` paths)."""

    def __init__(self, path):
        import tensorflow as tf

        self.file = tf.io.gfile.GFile(path, "wb")

    def write(self, data):
        self.file.write(data.tobytes())

    def close(self):
        self.file.close()


class _LocalOutput:
    """A shard file on a local disk. What is written is handed to the disk at once: ``POSIX_FADV_DONTNEED`` starts
    its writeback, so the disk writes while the next block is framed (instead of after the conversion, at the next
    ``sync``), and the shards do not push the rest of the page cache out."""

    def __init__(self, path):
        self.fd, self.position = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 0

    def write(self, data):
        data = memoryview(data)
        written = 0
        while written < len(data):
            written += os.write(self.fd, data[written:])
        if hasattr(os, "posix_fadvise"):  # not on macOS or Windows
            os.posix_fadvise(self.fd, self.position, written, os.POSIX_FADV_DONTNEED)
        self.position += written

    def close(self):
        os.close(self.fd)


def _open_output(path):
    """A binary file to append framed records to: a local file, else a ``tf.io.gfile``."""
    return _GFileOutput(path) if "://" in path else _LocalOutput(path)


_WORKER_ITEMS = {}  # the source, opened once in each conversion process


def _open_worker_items(source, cache_dir):
    _WORKER_ITEMS["items"] = _open_items(source, cache_dir)


def _write_group_in_worker(job):
    """``(images written, bytes)`` of one group written in this conversion process."""
    with _Progress(0, 0, enabled=False) as progress:
        _write_group(_WORKER_ITEMS["items"], job, progress)
    return progress.written, progress.bytes


def _write_groups_in_processes(source, cache_dir, jobs, workers, progress):
    """Write the groups ``jobs`` in ``workers`` fresh processes (spawned: TensorFlow does not survive a fork)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        min(workers, len(jobs)), mp_context=context, initializer=_open_worker_items, initargs=(source, cache_dir)
    ) as pool:
        futures = {pool.submit(_write_group_in_worker, job): job for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            progress.add(job.stop - job.start, *future.result())


def _write_index(dest_dir, plan, names, assignment):
    """The commit point: ``shards.json`` with each shard's file name, image count and size."""
    import tensorflow as tf

    sizes = np.bincount(assignment, minlength=len(names))
    shards = [
        {"file": os.path.basename(name), "images": int(size), "bytes": int(tf.io.gfile.stat(name).length)}
        for name, size in zip(names, sizes)
    ]
    index = {"format": SHARD_FORMAT, "images": plan["images"], "classes": plan["classes"], "source": plan["source"]}
    _write_text(_join(dest_dir, SHARD_INDEX), json.dumps(dict(index, shards=shards, plan=plan), indent=1))
    plan_path = _join(dest_dir, PLAN_FILE)
    if tf.io.gfile.exists(plan_path):
        tf.io.gfile.remove(plan_path)

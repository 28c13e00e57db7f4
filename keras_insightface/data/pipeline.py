"""Training input: class folders, image-list npz, distillation TFRecords, MXNet RecordIO files and TFRecord shard
folders to a ``tf.data`` pipeline.

``prepare_dataset`` yields ``(images, targets)`` batches forever: images float32 ``(B, H, W, 3)``, normalized;
``targets`` a dict keyed by the ``*_KEY`` names below, labels sparse int32 end to end. Decoding runs in parallel;
an image that cannot be decoded is skipped and named: ``TrainDataset.skipped`` collects the skipped files, which
the trainer reports as a Python warning at each epoch end. File formats live in ``formats`` (re-exported here,
since older scripts import them from ``data``), RecordIO in ``recordio``, shard folders in ``shards`` and
augmentation in ``augment``. Every source feeds the same decode / augment / batch stages.
"""

import dataclasses
import functools
import os
import threading
import warnings

import numpy as np

from keras_insightface.data import recordio, shards
from keras_insightface.data.formats import (  # noqa: F401 (public names scripts import from data)
    DEFAULT_CACHE_DIR,
    IMAGE_EXTENSIONS,
    IMAGE_MEAN,
    INSIGHTFACE_SCALE,
    SEEDS_SCALE,
    encode_jpeg,
    hash_strings,
    list_images,
    load_bin,
    normalize_image,
    read_distill_tfrecord,
    restricted_pickle_load,
    scan_class_folder,
    write_bin,
)

# Keys of the targets dict that comes with each image batch.
LABEL_KEY = "label"  # sparse int32 class of each image, (B,)
EMBEDDING_KEY = "embedding"  # teacher embedding, (B, D): distillation data only
MIXUP_LABEL_KEY = "label_b"  # with mixup: the label of the image each one was mixed with, (B,)
MIXUP_WEIGHT_KEY = "mix"  # with mixup: the weight of LABEL_KEY in the mix (that of MIXUP_LABEL_KEY is 1 - it), (B,)

SKIP_MEMORY = 16  # a run of up to this many unreadable images in a row is reported by name, longer runs by count
READ_BATCH = 64  # records read (RecordIO) or parsed (shards) per call


@dataclasses.dataclass
class PipelineOptions:
    """How training images are sampled and augmented; ``train.Train`` takes the same names as arguments."""

    random_status: int = 0  # augmentation level (see ``augment``)
    random_crop: tuple = (100, 100, 3)  # crop size of random_status >= 3
    random_cutout_mask_area: float = 0.0  # probability of a simulated face mask
    mixup_alpha: float = 0.0  # > 0: batch mixup with Beta(alpha, alpha) weights
    image_per_class: int = 0  # > 0: triplet batches of P identities x K = image_per_class images
    cache_dir: str | None = None  # where the image-list cache of a folder (and the index of a .rec) lives
    shuffle_buffer: int = 20_000  # shard folders: images mixed in the shuffle buffer (encoded, ~7 KB each at 112 px)
    verify_images: bool = False  # decode every image once before training and drop unreadable ones
    seed: int | None = None  # shuffling seed


class SkippedImages:
    """Thread-safe record of the unreadable images a pipeline skipped; ``drain()`` returns and clears it."""

    def __init__(self, names_of):
        self._names_of, self._lock = names_of, threading.Lock()
        self._count, self._names = 0, []

    def record(self, keys, count):
        """Called from inside the pipeline with the keys of skipped images (possibly fewer than ``count``)."""
        with self._lock:
            self._count += int(count)
            self._names.extend(self._names_of(np.asarray(keys)))
        return np.int64(0)

    def drain(self):
        """``(number of images skipped, their file names)`` since the last call."""
        with self._lock:
            count, names = self._count, self._names
            self._count, self._names = 0, []
        return count, names


class TrainDataset:
    """What the trainer needs from the input: the batched dataset, its size and the label space.

    ``at(epoch, step)`` yields ``(images, targets)`` (see the module docstring) from batch ``step`` of ``epoch`` on,
    forever; ``dataset`` is where it starts. An epoch is ``steps_per_epoch`` batches. ``dataset`` is a
    ``tf.data.Dataset`` (a user's: ``at`` skips ``step`` of its batches after they are made) or a function of the batch
    number that builds the pipeline from there (``prepare_dataset``'s: it starts anywhere without reading or decoding
    the images before that point, and gives every batch the same images, in the same order and augmented the same way,
    as a run started at 0 gives there). ``skipped`` is the :class:`SkippedImages` record of the pipeline (None when the
    dataset was built by the user).
    """

    def __init__(self, dataset, steps_per_epoch, classes, num_images, embedding_dim=0, skipped=None):
        self._dataset_at = dataset if callable(dataset) else None
        self._dataset = None if callable(dataset) else dataset
        self.steps_per_epoch, self.classes = steps_per_epoch, classes
        self.num_images, self.embedding_dim, self.skipped = num_images, embedding_dim, skipped

    @property
    def dataset(self):
        if self._dataset is None:
            self._dataset = self._dataset_at(0)
        return self._dataset

    def at(self, epoch, step=0):
        """The batches from batch ``step`` of epoch ``epoch`` (both counted from 0) on."""
        if self._dataset_at is None:
            return self.dataset.skip(int(step)) if step else self.dataset
        return self._dataset_at(int(epoch) * self.steps_per_epoch + int(step))

    @classmethod
    def from_dataset(cls, dataset, classes, steps_per_epoch):
        """Wrap a user's batched ``tf.data.Dataset`` of ``(images, labels)`` (or ``(images, {"label": ...})``).

        Images must already be normalized; labels sparse integers. The dataset is repeated.
        """
        import tensorflow as tf

        def as_targets(images, targets):
            if not isinstance(targets, dict):
                targets = {LABEL_KEY: tf.cast(tf.reshape(targets, [-1]), tf.int32)}
            return images, targets

        spec = dataset.element_spec
        if not isinstance(spec, tuple) or len(spec) != 2:
            raise ValueError(f"expected a dataset of (images, labels) batches, got element_spec {spec}")
        embedding_spec = spec[1].get(EMBEDDING_KEY) if isinstance(spec[1], dict) else None
        embedding_dim = 0 if embedding_spec is None else int(embedding_spec.shape[-1])
        dataset = dataset.map(as_targets).repeat()
        num_images = int(steps_per_epoch) * int(spec[0].shape[0] or 0)
        return cls(dataset, int(steps_per_epoch), int(classes), num_images, embedding_dim)


# ---------------------------------------------------------------------------------------------------------
# Decoding and checking images.
# ---------------------------------------------------------------------------------------------------------
def decode_image(path_or_bytes, img_shape=(112, 112), is_path=True):
    """Read (if a path) and decode a JPEG/PNG/BMP to float32 0..255 RGB, resized to ``img_shape`` if needed."""
    import tensorflow as tf

    content = tf.io.read_file(path_or_bytes) if is_path else path_or_bytes
    image = tf.io.decode_image(content, channels=3, expand_animations=False)
    image = tf.cast(image, tf.float32)
    image.set_shape([None, None, 3])
    size_ok = tf.reduce_all(tf.shape(image)[:2] == tf.constant(img_shape, tf.int32))
    return tf.cond(size_ok, lambda: image, lambda: tf.image.resize(image, img_shape))


def undecodable_indices(sources, is_path=True, description=None):
    """Indices of the images (file paths or encoded bytes) that TensorFlow cannot read and decode, found by decoding
    every one of them in parallel with the decoder training uses. ``description`` shows a progress bar."""
    import tensorflow as tf
    from tqdm import tqdm

    sources = np.asarray(sources, dtype=object if not is_path else None)
    if len(sources) == 0:
        return np.zeros(0, np.int64)

    def decodes(index, source):
        content = tf.io.read_file(source) if is_path else source
        image = tf.io.decode_image(content, channels=3, expand_animations=False)
        return index, tf.shape(image)[0]  # an output that needs the decoded image, so decoding is not pruned

    ds = tf.data.Dataset.from_tensor_slices(tf.constant(list(sources), tf.string)).enumerate()
    ds = ds.map(decodes, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False).ignore_errors().batch(1024)
    seen = np.zeros(len(sources), bool)
    with tqdm(total=len(sources), desc=description, disable=description is None, leave=False) as progress:
        for indices, _ in ds.as_numpy_iterator():
            seen[indices] = True
            progress.update(len(indices))
    return np.flatnonzero(~seen)


def find_corrupt_images(image_names):
    """The files among ``image_names`` that cannot be read and fully decoded (truncated files included)."""
    image_names = np.asarray(image_names)
    return image_names[undecodable_indices(image_names, description="Verifying images")].tolist()


def pre_process_folder(data_path, cache_dir=None, verify_images=False):
    """Image list of ``data_path`` (folder or npz) as a dict with ``image_names``, ``image_classes``[, ``embeddings``].

    A folder's list is cached and rebuilt when the folder changes. With ``verify_images`` every image is decoded
    once (in parallel; the result is cached with the list) and unreadable ones are dropped and reported.
    """
    return list_images(data_path, cache_dir, verifier=find_corrupt_images if verify_images else None)


# ---------------------------------------------------------------------------------------------------------
# Sources: an endless stream of (key, image, label[, embedding]) before decoding, epoch after epoch.
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Source:
    """The records of a training set: ``records_at(position)`` is the endless stream of this worker's records from its
    ``position``-th on (a record's position counts from the run's start, across epochs), each record starting with a
    ``key`` from which ``names_of(keys)`` gets back file names (for reporting unreadable files). The image is a file
    path when ``is_path``, else the encoded bytes. An epoch is ``steps_per_epoch`` batches of this worker's share."""

    records_at: object
    names_of: object
    num_images: int
    classes: int
    embedding_dim: int
    steps_per_epoch: int
    is_path: bool = True


# The random streams of a run, each drawn from the run's seed (see ``stream_seed``).
EPOCH_ORDER, CLASS_ORDER, CLASS_PICKS, AUGMENT, MIXUP, SHARD_ORDER, SHARD_MIX = range(7)
NO_END = 2**62  # epochs of an endless stream


def stream_seed(seed, stream, *values):
    """The seed of a stateless random op: the run's ``seed``, which random ``stream`` (``EPOCH_ORDER`` ...) and where
    in it (an epoch, a record position). Every draw of the pipeline is a function of these alone, so any position of
    a run can be rebuilt without replaying what came before it."""
    import tensorflow as tf

    key = tf.stack([tf.constant(seed, tf.int64), tf.constant(stream, tf.int64)])
    for value in values:
        key = tf.random.experimental.stateless_fold_in(key, tf.cast(value, tf.int64))
    return key


def _epoch_steps(num_images, shard, batch_size):
    """Batches per epoch of one worker: its share of the images (``num_images // num_shards``, the smallest share)
    in whole batches; the same on every worker, so collective steps stay in step."""
    return max(1, num_images // (1 if shard is None else shard[0]) // batch_size)


def _epochs_from(position, per_epoch, epoch_items):
    """The endless stream of items of whole epochs, started at item ``position``: ``epoch_items(epoch)`` is the
    dataset of one epoch's items (``per_epoch`` of them); the part of the first epoch before ``position`` is skipped
    without being read further than its items (indices or records, never decoded images)."""
    import tensorflow as tf

    first, offset = divmod(int(position), per_epoch)
    head = epoch_items(tf.constant(first, tf.int64)).skip(offset)
    return head.concatenate(tf.data.Dataset.range(first + 1, NO_END).flat_map(epoch_items))


def _epoch_indices(num_images, options, shard, per_epoch, position):
    """Endless image indices from ``position`` on: each epoch a new permutation of this worker's share (every
    ``num_shards``-th image), cut to ``per_epoch`` images, so that an image is seen at most once per epoch (exactly
    once when the share divides into whole batches). The permutation is drawn in one op from the epoch's seed."""
    import tensorflow as tf

    workers, worker = shard or (1, 0)

    def epoch_items(epoch):
        share = tf.range(worker, num_images, workers, dtype=tf.int64)
        order = tf.random.experimental.stateless_shuffle(share, seed=stream_seed(options.seed, EPOCH_ORDER, epoch))
        return tf.data.Dataset.from_tensor_slices(order[:per_epoch])

    return _epochs_from(position, per_epoch, epoch_items)


def _sampled_indices(image_classes, options, shard, batch_size):
    """``(index stream from a position, steps per epoch)`` of an indexed source: P x K triplet order, or shuffled
    epochs."""
    steps = _epoch_steps(len(image_classes), shard, batch_size)
    if options.image_per_class > 0:
        return functools.partial(_triplet_indices, image_classes, options.image_per_class, options.seed, shard), steps
    return functools.partial(_epoch_indices, len(image_classes), options, shard, steps * batch_size), steps


def _tfrecord_source(data_path, options, shard, batch_size):
    """Distillation TFRecord records, keyed by their image name: each epoch mixes the file's records in windows of
    ``shuffle_buffer`` (a stateless permutation of each window, from the epoch's seed)."""
    records, header = read_distill_tfrecord(data_path)
    records = records if shard is None else records.shard(*shard)
    records = records.map(lambda name, label, embedding: (name, name, label, embedding))
    steps = _epoch_steps(header["total"], shard, batch_size)
    window = max(1, min(options.shuffle_buffer, header["total"]))

    def epoch_items(epoch):
        return _mixed(records, window, options.seed, epoch).take(steps * batch_size)

    def names_of(keys):
        return [key.decode("utf-8", "surrogateescape") for key in keys]

    records_at = functools.partial(_epochs_from, per_epoch=steps * batch_size, epoch_items=epoch_items)
    return _Source(records_at, names_of, header["total"], header["classes"], header["emb_shape"], steps)


def _mixed(records, window, seed, epoch):
    """``records`` mixed in consecutive windows of ``window`` records, each window in a stateless random order drawn
    from ``seed``, ``epoch`` and the window's number (a shuffle buffer that any position of a run can rebuild)."""
    import tensorflow as tf

    def permuted(number, batch):
        size = tf.shape(tf.nest.flatten(batch)[0])[0]
        order = tf.random.experimental.stateless_shuffle(
            tf.range(size), seed=stream_seed(seed, SHARD_MIX, epoch, number)
        )
        return tf.data.Dataset.from_tensor_slices(tf.nest.map_structure(lambda column: tf.gather(column, order), batch))

    return records.batch(window).enumerate().flat_map(permuted)


def _triplet_indices(image_classes, image_per_class, seed, shard, position):
    """Endless image indices laid out as P classes x K images from ``position`` on: each pass over the classes in a
    new order, each class's K images a new draw, all from the run's seed.

    ``shard=(num_shards, index)`` keeps every ``num_shards``-th class, so P x K groups stay whole.
    """
    import tensorflow as tf

    order = np.argsort(image_classes, kind="stable")
    classes, starts, counts = np.unique(image_classes[order], return_index=True, return_counts=True)
    order, starts, counts = tf.constant(order), tf.constant(starts), tf.constant(counts)
    workers, worker = shard or (1, 0)
    class_ids = tf.range(worker, len(classes), workers, dtype=tf.int64)

    def sample(class_pass, class_index):
        count = counts[class_index]
        repeats = (image_per_class + count - 1) // count  # classes smaller than K repeat images
        draw = stream_seed(seed, CLASS_PICKS, class_pass, class_index)
        picks = tf.random.experimental.stateless_shuffle(tf.tile(tf.range(count), [repeats]), seed=draw)
        return tf.data.Dataset.from_tensor_slices(tf.gather(order, starts[class_index] + picks[:image_per_class]))

    def pass_items(class_pass):
        shuffled = tf.random.experimental.stateless_shuffle(class_ids, seed=stream_seed(seed, CLASS_ORDER, class_pass))
        return tf.data.Dataset.from_tensor_slices(shuffled).flat_map(lambda index: sample(class_pass, index))

    return _epochs_from(position, len(class_ids) * image_per_class, pass_items)


def _image_list_source(data_path, options, shard, batch_size):
    """A class folder or image-list npz, keyed by image index: triplet P x K order, or shuffled epochs."""
    import tensorflow as tf

    content = pre_process_folder(data_path, cache_dir=options.cache_dir, verify_images=options.verify_images)
    image_names, image_classes = content["image_names"], content["image_classes"].astype(np.int64)
    embeddings = content.get("embeddings")
    indices_at, steps = _sampled_indices(image_classes, options, shard, batch_size)
    columns = (image_names, image_classes) if embeddings is None else (image_names, image_classes, embeddings)
    columns = tuple(tf.constant(column) for column in columns)

    def records_at(position):
        return indices_at(position).map(lambda index: (index, *(tf.gather(column, index) for column in columns)))

    embedding_dim = 0 if embeddings is None else embeddings.shape[-1]
    classes = int(image_classes.max()) + 1
    names_of = lambda keys: image_names[keys].tolist()  # noqa: E731
    return _Source(records_at, names_of, len(image_names), classes, embedding_dim, steps)


def _warn_unverified(options, data_path):
    if options.verify_images:
        warnings.warn(
            f"verify_images checks the files of class folders, not {data_path}: its unreadable images are skipped "
            "and named at the end of each epoch",
            stacklevel=4,
        )


def _recordio_source(data_path, options, shard, batch_size):
    """An MXNet RecordIO file, keyed by image position: the same index streams as an image list; the records are
    read ``READ_BATCH`` at a time by one Python call from ``tf.data`` (one ``pread`` each, which releases the GIL),
    not one call per image. No image is written anywhere."""
    import tensorflow as tf

    _warn_unverified(options, data_path)
    index = recordio.load_index(data_path, options.cache_dir)
    reader = recordio.RecordFile(index)
    indices_at, steps = _sampled_indices(index.labels, options, shard, batch_size)

    def read(positions):
        images, labels = tf.numpy_function(reader.read, [positions], [tf.string, tf.int64], stateful=False)
        return positions, tf.ensure_shape(images, [None]), tf.ensure_shape(labels, [None])

    def records_at(position):
        return indices_at(position).batch(READ_BATCH).map(read, num_parallel_calls=tf.data.AUTOTUNE).unbatch()

    names_of = lambda keys: [index.name(key) for key in keys]  # noqa: E731
    return _Source(records_at, names_of, index.num_images, index.classes, 0, steps, is_path=False)


def _worker_shard_files(index, shard, per_epoch):
    """``(files, split by record)``: the shard files this worker reads. When the shard count divides among the
    workers and every worker's files hold ``per_epoch`` images (the converter balances shard sizes), worker ``w``
    reads files ``w, w + W, ...``; otherwise every worker reads every file and keeps every ``W``-th record."""
    workers, worker = shard or (1, 0)
    files, sizes = index["files"], index["sizes"]
    if len(files) % workers == 0 and min(sizes[ii::workers].sum() for ii in range(workers)) >= per_epoch:
        return files[worker::workers], False
    warnings.warn(
        f"{len(files)} shards do not divide evenly among {workers} workers: each worker reads every shard and keeps "
        f"every {workers}-th image; write a multiple of {workers} shards to read 1/{workers} each",
        stacklevel=3,
    )
    return files, True


def _shard_source(data_path, options, shard, batch_size):
    """A folder of TFRecord shards (``shards``): this worker's shards in a new order each epoch, read in parallel
    interleave, mixed in a shuffle buffer of ``options.shuffle_buffer`` images and cut to whole batches per epoch.
    Keyed by the source name each record carries."""
    import tensorflow as tf

    if options.image_per_class > 0:
        raise ValueError(
            "image_per_class (P x K batches) needs random access by class, which shards do not give: train "
            "triplet stages from the .rec or the class folder the shards were written from"
        )
    _warn_unverified(options, data_path)
    index = shards.read_index(data_path)
    steps = _epoch_steps(index["images"], shard, batch_size)
    files, split_records = _worker_shard_files(index, shard, steps * batch_size)
    window = max(1, min(options.shuffle_buffer, index["images"]))

    def epoch_items(epoch):
        names = tf.constant(files)
        if not split_records:
            order = stream_seed(options.seed, SHARD_ORDER, epoch)
            names = tf.gather(names, tf.random.experimental.stateless_shuffle(tf.range(len(files)), seed=order))
        records = tf.data.Dataset.from_tensor_slices(names).interleave(
            tf.data.TFRecordDataset, cycle_length=min(len(files), 16), num_parallel_calls=tf.data.AUTOTUNE
        )
        records = records.shard(*shard) if split_records else records
        return _mixed(records.map(lambda serialized: (serialized,)), window, options.seed, epoch).take(
            steps * batch_size
        )

    def parse(serialized):
        example = tf.io.parse_example(serialized, shards.feature_spec())
        return example["key"], example["image"], example["label"]

    def records_at(position):
        serialized = _epochs_from(position, steps * batch_size, epoch_items)
        return serialized.batch(READ_BATCH).map(parse, num_parallel_calls=tf.data.AUTOTUNE).unbatch()

    folder = index["source"]
    names_of = lambda keys: [os.path.join(folder, key.decode("utf-8", "surrogateescape")) for key in keys]  # noqa: E731
    return _Source(records_at, names_of, index["images"], index["classes"], 0, steps, is_path=False)


# ---------------------------------------------------------------------------------------------------------
# Skipped-image accounting: a sequence number and the keys of the last records travel with each record.
# ---------------------------------------------------------------------------------------------------------
def _with_recent_keys(records, start):
    """Add to each record its sequence number (its position in the run, from ``start``) and the keys of the
    ``SKIP_MEMORY`` records before it: when the decoder drops some records, the next surviving one knows how many
    were lost and which."""
    import tensorflow as tf

    key_spec = records.element_spec[0]
    empty = tf.fill([SKIP_MEMORY], tf.constant("" if key_spec.dtype == tf.string else -1, key_spec.dtype))

    def remember(state, record):
        seq, recent = state
        return (seq + 1, tf.concat([recent[1:], [record[0]]], 0)), (seq, recent, *record[1:])

    return records.scan((tf.constant(start, tf.int64), empty), remember)


def _report_gaps(batches, skipped, start):
    """Drop the bookkeeping of batches ``(images, targets, seq, recent)``, recording the records missing
    between consecutive sequence numbers (the first expected is ``start``) in ``skipped``."""
    import tensorflow as tf

    def report(gaps, recent):
        named = tf.range(SKIP_MEMORY, dtype=tf.int64)[None] >= SKIP_MEMORY - tf.minimum(gaps, SKIP_MEMORY)[:, None]
        return tf.py_function(skipped.record, [tf.boolean_mask(recent, named), tf.reduce_sum(gaps)], tf.int64)

    def check(previous, batch):
        images, targets, seq, recent = batch
        gaps = seq - tf.concat([[previous], seq[:-1]], 0) - 1
        reported = tf.cond(tf.reduce_any(gaps > 0), lambda: report(gaps, recent), lambda: tf.constant(0, tf.int64))
        with tf.control_dependencies([reported]):
            return tf.identity(seq[-1]), (images, targets)

    return batches.scan(tf.constant(start - 1, tf.int64), check)


# ---------------------------------------------------------------------------------------------------------
# The pipeline.
# ---------------------------------------------------------------------------------------------------------
def _decode_and_augment(img_shape, options, is_path):
    """The per-record map: decode (a file path, or the encoded bytes), augment and normalize the image; build the
    targets dict."""
    import tensorflow as tf

    from keras_insightface.data import augment

    def load(seq, recent, image, label, embedding=None):
        image = decode_image(image, img_shape, is_path=is_path)
        image_seed, mask_seed = augment.split_seed(stream_seed(options.seed, AUGMENT, seq), 2)
        image = augment.random_process_image(image, image_seed, img_shape, options.random_status, options.random_crop)
        if options.random_cutout_mask_area > 0:
            image = augment.random_cutout_mask(image, options.random_cutout_mask_area, mask_seed)
        targets = {LABEL_KEY: tf.cast(label, tf.int32)}
        if embedding is not None:
            targets[EMBEDDING_KEY] = tf.cast(embedding, tf.float32)
        return normalize_image(image), targets, seq, recent

    return load


def _regroup_by_label(images, image_per_class):
    """Triplet batches: group decoded images K by K per label, so a skipped image cannot shift the P x K layout."""
    import tensorflow as tf

    return images.group_by_window(
        key_func=lambda image, targets: tf.cast(targets[LABEL_KEY], tf.int64),
        reduce_func=lambda key, window: window.batch(image_per_class),
        window_size=image_per_class,
    ).unbatch()


def _with_mixup(batch_number, images, targets, options):
    from keras_insightface.data import augment

    seed = stream_seed(options.seed, MIXUP, batch_number)
    mixed, partner_labels, weights = augment.mixup(images, targets[LABEL_KEY], options.mixup_alpha, seed)
    return mixed, dict(targets, **{MIXUP_LABEL_KEY: partner_labels, MIXUP_WEIGHT_KEY: weights})


def _open_source(data_path, options, shard, batch_size):
    if data_path.endswith((".tfrecord", ".tfrecords")):
        return _tfrecord_source(data_path, options, shard, batch_size)
    if recordio.is_recordio(data_path):
        return _recordio_source(data_path, options, shard, batch_size)
    if shards.is_shard_folder(data_path):
        return _shard_source(data_path, options, shard, batch_size)
    return _image_list_source(data_path, options, shard, batch_size)


def check_data_path(data_path):
    """Refuse, before any work, a training data path that is missing or a file of a kind training does not read."""
    if isinstance(data_path, TrainDataset):
        return
    path = os.fspath(data_path)
    takes = "a class folder, a RecordIO folder or .rec, a shard folder, an image-list .npz or a distillation .tfrecord"
    if not os.path.exists(path):
        raise FileNotFoundError(f"training data not found: {path} (data_path takes {takes})")
    if path.endswith(".bin") and os.path.isfile(path):
        raise ValueError(
            f"{path} is a verification .bin file, not training data: give it in eval_paths; data_path takes {takes}"
        )
    if os.path.isfile(path) and not path.endswith((".rec", ".npz", ".tfrecord", ".tfrecords")):
        raise ValueError(f"{path} is a file, not training data: data_path takes {takes}")


def prepare_dataset(data_path, batch_size=128, img_shape=(112, 112), shard=None, options=None, **option_values):
    """Build the training :class:`TrainDataset` from a class folder, an image-list npz, a distill TFRecord, an MXNet
    RecordIO file (a ``.rec`` or a folder holding ``train.rec`` + ``train.idx``) or a folder of TFRecord shards
    (``shards.json``).

    ``options`` (a :class:`PipelineOptions`) and keyword arguments of the same names set sampling and
    augmentation; ``image_per_class > 0`` makes triplet batches (P identities x K images). Every random choice (the
    order of each epoch, augmentation) is drawn from ``seed``, a random one when None. Unreadable images are
    skipped and recorded in ``TrainDataset.skipped``. ``shard=(num_shards, index)`` keeps one worker's share of the
    images (of the identities for triplet batches) before anything is read or decoded; ``classes`` and
    ``num_images`` still describe the whole dataset, ``steps_per_epoch`` is the shard's (the same on every worker).
    """
    options = dataclasses.replace(options or PipelineOptions(), **option_values)
    if options.seed is None:
        options.seed = draw_seed()
    img_shape = tuple(int(ii) for ii in img_shape[:2])
    per_class = options.image_per_class
    if per_class > 0:
        batch_size = max(per_class, batch_size // per_class * per_class)
    source = _open_source(os.fspath(data_path), options, shard, batch_size)
    skipped = SkippedImages(source.names_of)
    dataset_at = functools.partial(_batches_at, source, skipped, batch_size, img_shape, options)
    return TrainDataset(
        dataset_at, source.steps_per_epoch, source.classes, source.num_images, source.embedding_dim, skipped
    )


def draw_seed():
    """A random seed for a run that was given none (it is stored with the run, so that a resume can use it)."""
    return int(np.random.SeedSequence().generate_state(1)[0] >> 1)


def _batches_at(source, skipped, batch_size, img_shape, options, batch):
    """The pipeline from batch number ``batch`` of the run on: records from that position, decoded, augmented,
    batched; skipped images recorded."""
    import tensorflow as tf

    start = batch * batch_size
    ds = _with_recent_keys(source.records_at(start), start)
    load = _decode_and_augment(img_shape, options, source.is_path)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = _report_gaps(ds.ignore_errors().batch(batch_size, drop_remainder=True), skipped, start)
    if options.image_per_class > 0:
        ds = _regroup_by_label(ds.unbatch(), options.image_per_class).batch(batch_size, drop_remainder=True)
    if options.mixup_alpha > 0:
        mix = lambda number, batch: _with_mixup(number, *batch, options)  # noqa: E731
        ds = ds.enumerate(start=batch).map(mix, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)

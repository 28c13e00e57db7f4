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

    ``dataset`` yields ``(images, targets)`` (see the module docstring) and repeats forever; an epoch is
    ``steps_per_epoch`` batches. ``skipped`` is the :class:`SkippedImages` record of the pipeline (None when the
    dataset was built by the user).
    """

    def __init__(self, dataset, steps_per_epoch, classes, num_images, embedding_dim=0, skipped=None):
        self.dataset, self.steps_per_epoch, self.classes = dataset, steps_per_epoch, classes
        self.num_images, self.embedding_dim, self.skipped = num_images, embedding_dim, skipped

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
    """The records of a training set: ``records`` repeats forever, shuffled; each record starts with a ``key``
    from which ``names_of(keys)`` gets back file names (for reporting unreadable files). The image is a file path
    when ``is_path``, else the encoded bytes. An epoch is ``steps_per_epoch`` batches of this worker's share."""

    records: object
    names_of: object
    num_images: int
    classes: int
    embedding_dim: int
    steps_per_epoch: int
    is_path: bool = True


def _epoch_steps(num_images, shard, batch_size):
    """Batches per epoch of one worker: its share of the images (``num_images // num_shards``, the smallest share)
    in whole batches; the same on every worker, so collective steps stay in step."""
    return max(1, num_images // (1 if shard is None else shard[0]) // batch_size)


def _epoch_indices(num_images, options, shard, per_epoch):
    """Endless image indices: each epoch a new permutation of this worker's share (every ``num_shards``-th image),
    cut to ``per_epoch`` images, so that an image is seen at most once per epoch (exactly once when the share
    divides into whole batches). The permutation is drawn in one op, without a shuffle buffer to fill."""
    import tensorflow as tf

    workers, worker = shard or (1, 0)

    def permutation(seed):
        share = tf.range(worker, num_images, workers, dtype=tf.int64)
        return tf.random.experimental.stateless_shuffle(share, seed=tf.stack([seed, 0]))[:per_epoch]

    return tf.data.Dataset.random(seed=options.seed).map(permutation).unbatch()


def _sampled_indices(image_classes, options, shard, batch_size):
    """``(index stream, steps per epoch)`` of an indexed source: P x K triplet order, or shuffled epochs."""
    steps = _epoch_steps(len(image_classes), shard, batch_size)
    if options.image_per_class > 0:
        return _triplet_indices(image_classes, options.image_per_class, options.seed, shard), steps
    return _epoch_indices(len(image_classes), options, shard, steps * batch_size), steps


def _tfrecord_source(data_path, options, shard, batch_size):
    """Distillation TFRecord records, keyed by their image name."""
    records, header = read_distill_tfrecord(data_path)
    records = records if shard is None else records.shard(*shard)
    records = records.map(lambda name, label, embedding: (name, name, label, embedding))
    steps = _epoch_steps(header["total"], shard, batch_size)
    records = records.shuffle(min(header["total"], 100_000), seed=options.seed, reshuffle_each_iteration=True)
    records = records.take(steps * batch_size).repeat()

    def names_of(keys):
        return [key.decode("utf-8", "surrogateescape") for key in keys]

    return _Source(records, names_of, header["total"], header["classes"], header["emb_shape"], steps)


def _triplet_indices(image_classes, image_per_class, seed=None, shard=None):
    """Endless image indices laid out as P classes x K images, classes reshuffled each epoch.

    ``shard=(num_shards, index)`` keeps every ``num_shards``-th class, so P x K groups stay whole.
    """
    import tensorflow as tf

    order = np.argsort(image_classes, kind="stable")
    classes, starts, counts = np.unique(image_classes[order], return_index=True, return_counts=True)
    order, starts, counts = tf.constant(order), tf.constant(starts), tf.constant(counts)
    class_ids = tf.data.Dataset.range(len(classes))
    if shard is not None:
        class_ids = class_ids.shard(*shard)

    def sample(class_index):
        count = counts[class_index]
        repeats = (image_per_class + count - 1) // count  # classes smaller than K repeat images
        picks = tf.random.shuffle(tf.tile(tf.range(count), [repeats]))[:image_per_class]
        return tf.gather(order, starts[class_index] + picks)

    ds = class_ids.shuffle(len(classes), seed=seed, reshuffle_each_iteration=True).repeat()
    return ds.map(sample).unbatch()


def _image_list_source(data_path, options, shard, batch_size):
    """A class folder or image-list npz, keyed by image index: triplet P x K order, or shuffled epochs."""
    import tensorflow as tf

    content = pre_process_folder(data_path, cache_dir=options.cache_dir, verify_images=options.verify_images)
    image_names, image_classes = content["image_names"], content["image_classes"].astype(np.int64)
    embeddings = content.get("embeddings")
    indices, steps = _sampled_indices(image_classes, options, shard, batch_size)
    columns = (image_names, image_classes) if embeddings is None else (image_names, image_classes, embeddings)
    columns = tuple(tf.constant(column) for column in columns)
    records = indices.map(lambda index: (index, *(tf.gather(column, index) for column in columns)))
    embedding_dim = 0 if embeddings is None else embeddings.shape[-1]
    classes = int(image_classes.max()) + 1
    return _Source(records, lambda keys: image_names[keys].tolist(), len(image_names), classes, embedding_dim, steps)


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
    indices, steps = _sampled_indices(index.labels, options, shard, batch_size)

    def read(positions):
        images, labels = tf.numpy_function(reader.read, [positions], [tf.string, tf.int64], stateful=False)
        return positions, tf.ensure_shape(images, [None]), tf.ensure_shape(labels, [None])

    records = indices.batch(READ_BATCH).map(read, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    names_of = lambda keys: [index.name(key) for key in keys]  # noqa: E731
    return _Source(records, names_of, index.num_images, index.classes, 0, steps, is_path=False)


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
    files_ds = tf.data.Dataset.from_tensor_slices(files)
    if not split_records:
        files_ds = files_ds.shuffle(len(files), seed=options.seed, reshuffle_each_iteration=True)
    records = files_ds.interleave(
        tf.data.TFRecordDataset, cycle_length=min(len(files), 16), num_parallel_calls=tf.data.AUTOTUNE
    )
    records = records.shard(*shard) if split_records else records
    buffer = max(1, min(options.shuffle_buffer, index["images"]))
    records = records.shuffle(buffer, seed=options.seed, reshuffle_each_iteration=True).take(steps * batch_size)

    def parse(serialized):
        example = tf.io.parse_example(serialized, shards.feature_spec())
        return example["key"], example["image"], example["label"]

    records = records.batch(READ_BATCH).map(parse, num_parallel_calls=tf.data.AUTOTUNE).unbatch().repeat()
    folder = index["source"]
    names_of = lambda keys: [os.path.join(folder, key.decode("utf-8", "surrogateescape")) for key in keys]  # noqa: E731
    return _Source(records, names_of, index["images"], index["classes"], 0, steps, is_path=False)


# ---------------------------------------------------------------------------------------------------------
# Skipped-image accounting: a sequence number and the keys of the last records travel with each record.
# ---------------------------------------------------------------------------------------------------------
def _with_recent_keys(records):
    """Add to each record its sequence number and the keys of the ``SKIP_MEMORY`` records before it: when the
    decoder drops some records, the next surviving one knows how many were lost and which."""
    import tensorflow as tf

    key_spec = records.element_spec[0]
    empty = tf.fill([SKIP_MEMORY], tf.constant("" if key_spec.dtype == tf.string else -1, key_spec.dtype))

    def remember(state, record):
        seq, recent = state
        return (seq + 1, tf.concat([recent[1:], [record[0]]], 0)), (seq, recent, *record[1:])

    return records.scan((tf.constant(0, tf.int64), empty), remember)


def _report_gaps(batches, skipped):
    """Drop the bookkeeping of batches ``(images, targets, seq, recent)``, recording the records missing
    between consecutive sequence numbers in ``skipped``."""
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

    return batches.scan(tf.constant(-1, tf.int64), check)


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
        image = augment.random_process_image(image, img_shape, options.random_status, options.random_crop)
        if options.random_cutout_mask_area > 0:
            image = augment.random_cutout_mask(image, options.random_cutout_mask_area)
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


def _with_mixup(images, targets, alpha):
    from keras_insightface.data import augment

    mixed, partner_labels, weights = augment.mixup(images, targets[LABEL_KEY], alpha)
    return mixed, dict(targets, **{MIXUP_LABEL_KEY: partner_labels, MIXUP_WEIGHT_KEY: weights})


def _open_source(data_path, options, shard, batch_size):
    if data_path.endswith((".tfrecord", ".tfrecords")):
        return _tfrecord_source(data_path, options, shard, batch_size)
    if recordio.is_recordio(data_path):
        return _recordio_source(data_path, options, shard, batch_size)
    if shards.is_shard_folder(data_path):
        return _shard_source(data_path, options, shard, batch_size)
    return _image_list_source(data_path, options, shard, batch_size)


def prepare_dataset(data_path, batch_size=128, img_shape=(112, 112), shard=None, options=None, **option_values):
    """Build the training :class:`TrainDataset` from a class folder, an image-list npz, a distill TFRecord, an MXNet
    RecordIO file (a ``.rec`` or a folder holding ``train.rec`` + ``train.idx``) or a folder of TFRecord shards
    (``shards.json``).

    ``options`` (a :class:`PipelineOptions`) and keyword arguments of the same names set sampling and
    augmentation; ``image_per_class > 0`` makes triplet batches (P identities x K images). Unreadable images are
    skipped and recorded in ``TrainDataset.skipped``. ``shard=(num_shards, index)`` keeps one worker's share of the
    images (of the identities for triplet batches) before anything is read or decoded; ``classes`` and
    ``num_images`` still describe the whole dataset, ``steps_per_epoch`` is the shard's (the same on every worker).
    """
    import tensorflow as tf

    options = dataclasses.replace(options or PipelineOptions(), **option_values)
    img_shape = tuple(int(ii) for ii in img_shape[:2])
    per_class = options.image_per_class
    if per_class > 0:
        batch_size = max(per_class, batch_size // per_class * per_class)
    source = _open_source(os.fspath(data_path), options, shard, batch_size)
    skipped = SkippedImages(source.names_of)
    ds = _with_recent_keys(source.records)
    load = _decode_and_augment(img_shape, options, source.is_path)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = _report_gaps(ds.ignore_errors().batch(batch_size, drop_remainder=True), skipped)
    if per_class > 0:
        ds = _regroup_by_label(ds.unbatch(), per_class).batch(batch_size, drop_remainder=True)
    if options.mixup_alpha > 0:
        mix = lambda images, targets: _with_mixup(images, targets, options.mixup_alpha)  # noqa: E731
        ds = ds.map(mix, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return TrainDataset(ds, source.steps_per_epoch, source.classes, source.num_images, source.embedding_dim, skipped)

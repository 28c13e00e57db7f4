"""Training input: class folders, image-list npz and distillation TFRecords to a ``tf.data`` pipeline.

``prepare_dataset`` yields ``(images, targets)`` batches forever: images float32 ``(B, H, W, 3)``, normalized;
``targets`` a dict keyed by the ``*_KEY`` names below, labels sparse int32 end to end. Decoding runs in parallel;
an image that cannot be decoded is skipped and named: ``TrainDataset.skipped`` collects the skipped files, which
the trainer reports as a Python warning at each epoch end. File formats live in ``formats`` (re-exported here,
since older scripts import them from ``data``) and augmentation in ``augment``.
"""

import dataclasses
import os
import threading

import numpy as np

from formats import (  # noqa: F401 (public names scripts import from data)
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


@dataclasses.dataclass
class PipelineOptions:
    """How training images are sampled and augmented; ``train.Train`` takes the same names as arguments."""

    random_status: int = 0  # augmentation level (see ``augment``)
    random_crop: tuple = (100, 100, 3)  # crop size of random_status >= 3
    random_cutout_mask_area: float = 0.0  # probability of a simulated face mask
    mixup_alpha: float = 0.0  # > 0: batch mixup with Beta(alpha, alpha) weights
    image_per_class: int = 0  # > 0: triplet batches of P identities x K = image_per_class images
    cache_dir: str | None = None  # where the image-list cache of a folder lives
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
# Sources: a shuffled, endless stream of (key, name, label[, embedding]) before decoding.
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Source:
    """The records of a training set: ``records`` repeats forever, shuffled; each record starts with a ``key``
    from which ``names_of(keys)`` gets back file names (for reporting unreadable files)."""

    records: object
    names_of: object
    num_images: int
    classes: int
    embedding_dim: int


def _tfrecord_source(data_path, options, shard):
    """Distillation TFRecord records, keyed by their image name."""
    records, header = read_distill_tfrecord(data_path)
    records = records if shard is None else records.shard(*shard)
    records = records.map(lambda name, label, embedding: (name, name, label, embedding))
    records = records.shuffle(min(header["total"], 100_000), seed=options.seed, reshuffle_each_iteration=True)

    def names_of(keys):
        return [key.decode("utf-8", "surrogateescape") for key in keys]

    return _Source(records.repeat(), names_of, header["total"], header["classes"], header["emb_shape"])


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


def _image_list_source(data_path, options, shard):
    """A class folder or image-list npz, keyed by image index: triplet P x K order, or a plain shuffle."""
    import tensorflow as tf

    content = pre_process_folder(data_path, cache_dir=options.cache_dir, verify_images=options.verify_images)
    image_names, image_classes = content["image_names"], content["image_classes"].astype(np.int64)
    embeddings = content.get("embeddings")
    num_images = len(image_names)
    if options.image_per_class > 0:
        indices = _triplet_indices(image_classes, options.image_per_class, options.seed, shard)
    else:
        indices = tf.data.Dataset.range(num_images)
        indices = indices if shard is None else indices.shard(*shard)
        indices = indices.shuffle(num_images, seed=options.seed, reshuffle_each_iteration=True).repeat()
    columns = (image_names, image_classes) if embeddings is None else (image_names, image_classes, embeddings)
    columns = tuple(tf.constant(column) for column in columns)
    records = indices.map(lambda index: (index, *(tf.gather(column, index) for column in columns)))
    embedding_dim = 0 if embeddings is None else embeddings.shape[-1]
    return _Source(
        records, lambda keys: image_names[keys].tolist(), num_images, int(image_classes.max()) + 1, embedding_dim
    )


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
def _decode_and_augment(img_shape, options):
    """The per-record map: decode, augment and normalize the image; build the targets dict."""
    import tensorflow as tf

    import augment

    def load(seq, recent, name, label, embedding=None):
        image = decode_image(name, img_shape)
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
    import augment

    mixed, partner_labels, weights = augment.mixup(images, targets[LABEL_KEY], alpha)
    return mixed, dict(targets, **{MIXUP_LABEL_KEY: partner_labels, MIXUP_WEIGHT_KEY: weights})


def _open_source(data_path, options, shard):
    if data_path.endswith((".tfrecord", ".tfrecords")):
        return _tfrecord_source(data_path, options, shard)
    return _image_list_source(data_path, options, shard)


def prepare_dataset(data_path, batch_size=128, img_shape=(112, 112), shard=None, options=None, **option_values):
    """Build the training :class:`TrainDataset` from a class folder, an image-list npz or a distill TFRecord.

    ``options`` (a :class:`PipelineOptions`) and keyword arguments of the same names set sampling and
    augmentation; ``image_per_class > 0`` makes triplet batches (P identities x K images). Unreadable images are
    skipped and recorded in ``TrainDataset.skipped``. ``shard=(num_shards, index)`` keeps one worker's share of the
    images (of the identities for triplet batches) before anything is decoded; ``classes`` and ``num_images`` still
    describe the whole dataset, ``steps_per_epoch`` is the shard's.
    """
    import tensorflow as tf

    options = dataclasses.replace(options or PipelineOptions(), **option_values)
    img_shape = tuple(int(ii) for ii in img_shape[:2])
    source = _open_source(os.fspath(data_path), options, shard)
    skipped = SkippedImages(source.names_of)
    per_class = options.image_per_class
    if per_class > 0:
        batch_size = max(per_class, batch_size // per_class * per_class)
    ds = _with_recent_keys(source.records)
    ds = ds.map(_decode_and_augment(img_shape, options), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = _report_gaps(ds.ignore_errors().batch(batch_size, drop_remainder=True), skipped)
    if per_class > 0:
        ds = _regroup_by_label(ds.unbatch(), per_class).batch(batch_size, drop_remainder=True)
    if options.mixup_alpha > 0:
        mix = lambda images, targets: _with_mixup(images, targets, options.mixup_alpha)  # noqa: E731
        ds = ds.map(mix, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    steps_per_epoch = max(1, source.num_images // (batch_size * (1 if shard is None else shard[0])))
    return TrainDataset(ds, steps_per_epoch, source.classes, source.num_images, source.embedding_dim, skipped)

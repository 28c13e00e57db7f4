"""Training straight from MXNet RecordIO and from TFRecord shards: the index (labels from the identity records or one
header pass, cached), epochs that see every image once, P x K batches, per-worker shares, the shard converter
(format, resume) and bad input (truncated .rec, .idx past the end, corrupt image, missing .idx)."""

import contextlib
import json
import os
import struct

import numpy as np
import pytest
from helpers import (
    RECORDIO_MAGIC,
    image_payload,
    record_frames,
    tagged_image,
    tagged_rec_image,
    tags_of,
    write_tagged_rec,
)

from keras_insightface import utils
from keras_insightface.cli import prepare as prepare_cli
from keras_insightface.data import pipeline as data
from keras_insightface.data import recordio, shards, tfrecord

CLASS_SIZES = [3, 2, 4, 3, 4]  # 16 images, tags 0..15 in key order
LABELS = np.repeat(np.arange(5), CLASS_SIZES)
OPTIONS = dict(img_shape=(8, 8), random_status=-1)


@pytest.fixture()
def rec_dir(tmp_path):
    """An insightface-style record folder (identity header in record 0), written by the test from the layout."""
    write_tagged_rec(str(tmp_path / "faces"), CLASS_SIZES)
    return str(tmp_path / "faces")


def _epochs(dataset, epochs):
    """``[(tags, labels)]`` of each of ``epochs`` epochs of a ``TrainDataset``."""
    iterator, seen = iter(dataset.dataset), []
    for _ in range(epochs):
        tags, labels = [], []
        for _ in range(dataset.steps_per_epoch):
            images, targets = next(iterator)
            tags += tags_of(images.numpy())
            labels += targets["label"].numpy().tolist()
        seen.append((tags, labels))
    return seen


def _offsets(folder):
    with open(os.path.join(folder, "train.idx")) as ff:
        return [int(line.split()[1]) for line in ff]


# ---------------------------------------------------------------------------------------------------------
# The format: the test's writer and the library's agree byte for byte.
# ---------------------------------------------------------------------------------------------------------
def test_library_writer_matches_the_published_layout():
    image = tagged_image(1, image_format="JPEG", comment=b"\0\0" + struct.pack("<I", RECORDIO_MAGIC) * 2)
    for label in (3, [3, 0.5], [9.0, 12.0]):
        mine = image_payload(label, image) if np.ndim(label) == 0 else image_payload(label[0], image, label[1:])
        assert recordio.pack_record(label, image) == mine
        assert recordio.frame_record(mine) == record_frames(mine)
    framed = record_frames(image_payload(3, image, (0.5,)))
    flags = []
    position = 0
    while position < len(framed):  # parsed with struct here: three frames with continuation flags 1, 2, 3
        magic, lrec = struct.unpack_from("<II", framed, position)
        assert magic == RECORDIO_MAGIC
        flags.append(lrec >> 29)
        position += 8 + (lrec & (2**29 - 1)) + (-(lrec & (2**29 - 1)) % 4)
    assert flags == [1, 2, 3]


# ---------------------------------------------------------------------------------------------------------
# The index.
# ---------------------------------------------------------------------------------------------------------
def test_index_from_identity_records_without_reading_every_header(rec_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(recordio, "_scan_labels", lambda *args: pytest.fail("read every image header"))
    index = recordio.load_index(rec_dir, cache_dir=str(tmp_path / "cache"))
    assert index.keys.tolist() == list(range(1, 17)) and index.labels.tolist() == LABELS.tolist()
    assert index.classes == 5 and index.num_images == 16
    offsets = _offsets(rec_dir)
    assert index.offsets.tolist() == offsets[1:17]
    assert index.spans.tolist() == np.diff(offsets)[1:17].tolist()  # each record up to the next one


def test_index_without_header_record_reads_headers_once_and_caches(tmp_path, monkeypatch):
    folder = str(tmp_path / "plain")
    write_tagged_rec(folder, CLASS_SIZES, identity_header=False)
    cache = str(tmp_path / "cache")
    index = recordio.load_index(os.path.join(folder, "train.rec"), cache_dir=cache, progress=False)
    assert index.keys.tolist() == list(range(16)) and index.labels.tolist() == LABELS.tolist()  # 2-label headers too
    monkeypatch.setattr(recordio, "build_index", lambda *args: pytest.fail("index built again"))
    assert recordio.load_index(folder, cache_dir=cache).labels.tolist() == LABELS.tolist()  # from the cache
    monkeypatch.undo()
    os.utime(os.path.join(folder, "train.rec"), ns=(1, 1))  # the file "changed": the cache is stale
    calls = []
    monkeypatch.setattr(recordio, "build_index", lambda *args: calls.append(1) or index)
    recordio.load_index(folder, cache_dir=cache)
    assert calls == [1]


def test_identity_ranges_that_disagree_with_the_headers_fall_back_to_the_headers(tmp_path):
    folder = str(tmp_path / "odd")
    write_tagged_rec(folder, CLASS_SIZES)
    with open(os.path.join(folder, "train.rec"), "r+b") as ff:  # image 5 (record 6) says class 4, not 1
        offset = _offsets(folder)[6]
        ff.seek(offset + 8 + 4)
        ff.write(struct.pack("<f", 4.0))
    with pytest.warns(UserWarning, match="disagree"):
        index = recordio.load_index(folder, cache_dir=str(tmp_path / "cache"), progress=False)
    expected = LABELS.copy()
    expected[5] = 4
    assert index.labels.tolist() == expected.tolist()


def test_float32_bounds_of_a_huge_set_are_worked_around(tmp_path, monkeypatch):
    """Record 0 and the identity records hold keys as float32, exact below 2**24 only: WebFace42M's first identity
    record 42,474,558 reads as 42,474,560, and Glint360K's last ranges are rounded to even keys. Emulated at a small
    scale (exact below key 9, steps of 2 above, rounded half to even as float32 rounds): the first identity record
    is found among the records around the announced one, keys below 9 take their classes from the ranges and keys
    from 9 on from their own headers, which are the only ones read."""
    monkeypatch.setattr(recordio, "FLOAT32_EXACT", 9)
    monkeypatch.setattr(recordio, "_float32_step", lambda value: 1 if value < 9 else 2)
    rounded = lambda key: key if key < 9 else 2 * round(key / 2)  # noqa: E731
    first, stops = len(LABELS) + 1, np.cumsum(CLASS_SIZES) + 1  # first identity record 17, reading as 16
    payloads = [image_payload(rounded(first), b"", (rounded(first + len(CLASS_SIZES)),))]
    payloads += [image_payload(label, tagged_image(tag)) for tag, label in enumerate(LABELS.tolist())]
    payloads += [image_payload(rounded(stop - size), b"", (rounded(stop),)) for size, stop in zip(CLASS_SIZES, stops)]
    folder, frames = tmp_path / "huge", [record_frames(payload) for payload in payloads]
    folder.mkdir()
    (folder / "train.rec").write_bytes(b"".join(frames))
    offsets = np.cumsum([0] + [len(frame) for frame in frames[:-1]])
    (folder / "train.idx").write_text("".join(f"{key}\t{offset}\n" for key, offset in enumerate(offsets)))
    scanned = []
    scan = recordio._scan_labels
    monkeypatch.setattr(recordio, "_scan_labels", lambda records, positions, progress: scanned.extend(
        records.keys[positions].tolist()) or scan(records, positions, progress))  # fmt: skip
    index = recordio.load_index(str(folder), cache_dir=str(tmp_path / "cache"), progress=False)
    assert index.keys.tolist() == list(range(1, 17)) and index.labels.tolist() == LABELS.tolist()
    assert scanned == list(range(9, 17))


# ---------------------------------------------------------------------------------------------------------
# The pipeline.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("as_file", [False, True])
def test_every_image_once_per_epoch_from_a_rec(rec_dir, tmp_path, as_file):
    path = os.path.join(rec_dir, "train.rec") if as_file else rec_dir
    ds = data.prepare_dataset(path, batch_size=4, cache_dir=str(tmp_path / "cache"), **OPTIONS)
    assert (ds.steps_per_epoch, ds.classes, ds.num_images) == (4, 5, 16)
    for tags, labels in _epochs(ds, 2):
        assert sorted(tags) == list(range(16))  # the split JPEG record (tag 1) too
        assert labels == LABELS[tags].tolist()
    assert ds.skipped.drain() == (0, [])


def test_triplet_batches_from_a_rec(rec_dir, tmp_path):
    ds = data.prepare_dataset(rec_dir, batch_size=6, image_per_class=3, cache_dir=str(tmp_path / "c"), **OPTIONS)
    for tags, labels in _epochs(ds, 3):
        groups = np.array(labels).reshape(-1, 3)
        assert (groups == groups[:, :1]).all()
        assert labels == LABELS[tags].tolist()


def test_corrupt_image_in_a_record_is_skipped_and_named(tmp_path):
    folder = str(tmp_path / "bad")
    write_tagged_rec(folder, CLASS_SIZES, overrides={6: b"\xff\xd8\xff not a jpeg", 9: b""})
    ds = data.prepare_dataset(folder, batch_size=2, cache_dir=str(tmp_path / "c"), seed=0, **OPTIONS)
    tags = sum((tags for tags, _ in _epochs(ds, 3)), [])
    assert set(tags) == set(range(16)) - {6, 9}
    count, names = ds.skipped.drain()
    rec_path = os.path.join(folder, "train.rec")
    assert count >= 2 and set(names) == {f"{rec_path} record 7", f"{rec_path} record 10"}


def test_a_broken_frame_reads_as_an_unreadable_image(rec_dir, tmp_path):
    index = recordio.load_index(rec_dir, cache_dir=str(tmp_path / "c"))
    with open(index.rec_path, "r+b") as ff:
        ff.seek(int(index.offsets[3]))
        ff.write(b"XXXX")  # bad magic
    images, labels = recordio.RecordFile(index).read(np.array([2, 3, 4]))
    assert images[1] == b"" and images[0] and images[2] and labels.tolist() == LABELS[2:5].tolist()


@pytest.mark.parametrize("block_bytes", [1, 200, 1 << 20])  # a block per record, a few records, all
def test_image_blocks_hold_every_image_in_file_order(rec_dir, tmp_path, block_bytes):
    """The converter's reader: whole, split (tag 1) and 2-label records, a broken frame (empty image), positions
    asked for in any order; each block is copied out before the next one reuses a buffer."""
    index = recordio.load_index(rec_dir, cache_dir=str(tmp_path / "c"))
    with open(index.rec_path, "r+b") as ff:
        ff.seek(int(index.offsets[3]))
        ff.write(b"XXXX")  # bad magic
    seen = []
    for positions, buffer, starts, ends in recordio.iter_image_blocks(index, np.arange(16)[::-1], block_bytes):
        seen += [(position, bytes(buffer[start:end])) for position, start, end in zip(positions, starts, ends)]
    assert [position for position, _ in seen] == list(range(16))
    assert [image for _, image in seen] == [b"" if tag == 3 else tagged_rec_image(tag) for tag in range(16)]


def test_two_worker_shares_of_a_rec(rec_dir, tmp_path):
    shares = [
        data.prepare_dataset(rec_dir, batch_size=4, shard=(2, ii), cache_dir=str(tmp_path / "c"), **OPTIONS)
        for ii in range(2)
    ]
    assert [ds.steps_per_epoch for ds in shares] == [2, 2]
    seen = [_epochs(ds, 2) for ds in shares]
    for epoch in range(2):
        first, second = seen[0][epoch][0], seen[1][epoch][0]
        assert sorted(first + second) == list(range(16)) and not set(first) & set(second)
    assert set(seen[0][0][0]) == set(range(0, 16, 2))  # worker 0 reads its records only: every other image


# ---------------------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------------------
def test_truncated_rec_and_idx_past_the_end_are_clear_errors(rec_dir, tmp_path):
    rec_path, offsets = os.path.join(rec_dir, "train.rec"), _offsets(rec_dir)
    size = os.path.getsize(rec_path)
    with open(rec_path, "r+b") as ff:
        ff.truncate(size - 4)  # inside the last record
    with pytest.raises(recordio.RecordIOError, match=rf"record 21 at offset {offsets[21]}: truncated file"):
        recordio.load_index(rec_dir, cache_dir=str(tmp_path / "c"))
    with open(rec_path, "r+b") as ff:
        ff.truncate(offsets[10] + 20)  # records 11.. are gone
    with pytest.raises(recordio.RecordIOError, match=rf"record 11 at offset {offsets[11]} points past the end"):
        recordio.load_index(rec_dir, cache_dir=str(tmp_path / "c"))
    assert utils.run_main(prepare_cli.main, ["--to-shards", rec_dir, "-o", str(tmp_path / "s")]) == 2
    assert not os.path.exists(tmp_path / "s")


def test_missing_idx_error_says_how_to_rebuild_it(rec_dir, tmp_path, capsys):
    idx_path = os.path.join(rec_dir, "train.idx")
    with open(idx_path) as ff:
        original = ff.read()
    os.remove(idx_path)
    with pytest.raises(FileNotFoundError, match=r"train\.idx not found.*--rebuild_idx"):
        data.prepare_dataset(rec_dir, batch_size=4, cache_dir=str(tmp_path / "c"), **OPTIONS)
    assert prepare_cli.main(["--rebuild_idx", rec_dir]) == 0
    with open(idx_path) as ff:
        assert ff.read() == original  # one line per record, the split record once
    rec_path = os.path.join(rec_dir, "train.rec")
    with open(rec_path, "r+b") as ff:
        ff.truncate(os.path.getsize(rec_path) - 4)
    other = str(tmp_path / "other.idx")
    assert utils.run_main(prepare_cli.main, ["--rebuild_idx", rec_path, "-o", other]) == 2
    assert "truncated file" in capsys.readouterr().err and not os.path.exists(other)


# ---------------------------------------------------------------------------------------------------------
# Shards.
# ---------------------------------------------------------------------------------------------------------
def test_framed_examples_read_back_with_tensorflow(tmp_path):
    """Records framed in bulk are read by TensorFlow's own TFRecord reader (which checks both CRCs of every
    record) and parse as the tf.train.Example built field by field; varint lengths of 1-4 bytes on each side of
    their boundaries, empty images and keys, labels up to 2**40."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    sizes = [0, 100, 127, 128, 16_383, 16_384, 20_000, 70_000, 3, 2**21]
    labels = np.array([0, 127, 128, 2**40, 5, 300, 2**14, 1, 99, 2**21])
    keys = np.array(
        [b"", b"0/1.jpg", b"k" * 200, b"x", b"train.rec record 17", b"a", b"b" * 127, b"c" * 128, b"d", b"e"]
    )
    images = [rng.bytes(size) for size in sizes]
    filler = rng.bytes(7)  # images not back to back in the buffer, as in a RecordIO block
    buffer = filler.join(images)
    starts = np.cumsum([0] + [size + len(filler) for size in sizes[:-1]])
    path = tmp_path / "t.tfrecord"
    framed, record_ends = tfrecord.ExampleFramer().frame(buffer, starts, starts + sizes, labels, keys)
    path.write_bytes(framed.tobytes())
    records = list(tf.data.TFRecordDataset(str(path)).as_numpy_iterator())
    assert len(records) == len(images)
    for record, image, label, key in zip(records, images, labels.tolist(), keys):
        expected = tf.train.Example(
            features=tf.train.Features(
                feature={
                    "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
                    "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
                    "key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[key])),
                }
            )
        )
        assert tf.train.Example.FromString(record) == expected
    with pytest.raises(ValueError, match="labels must be >= 0"):
        tfrecord.ExampleFramer().frame(buffer, starts, starts + sizes, -labels, keys)
    nothing = tfrecord.ExampleFramer().frame(buffer, starts[:0], starts[:0], labels[:0], keys[:0])
    assert (len(nothing[0]), len(nothing[1])) == (0, 0)  # a block whose images all go to shards already written


def test_crc32c_of_rows_matches_the_c_library():
    import google_crc32c

    rows = np.random.default_rng(1).integers(0, 256, (50, 8), dtype=np.uint8)
    expected = [google_crc32c.value(row.tobytes()) for row in rows]
    assert tfrecord.crc32c_rows(rows).tolist() == expected
    assert tfrecord.crc32c_rows(np.frombuffer(b"123456789", np.uint8)[None]).tolist() == [0xE3069283]  # check value


def _shard_contents(folder):
    """``{file name: [(key, label, image)]}`` of every shard, read with TensorFlow's own Example parser."""
    import tensorflow as tf

    with open(os.path.join(folder, "shards.json")) as ff:
        index = json.load(ff)
    contents = {}
    for shard in index["shards"]:
        records = tf.data.TFRecordDataset(os.path.join(folder, shard["file"]))
        parsed = [tf.io.parse_single_example(record, shards.feature_spec()) for record in records]
        contents[shard["file"]] = [(pp["key"].numpy().decode(), int(pp["label"]), pp["image"].numpy()) for pp in parsed]
    return index, contents


def test_shards_of_a_rec_hold_the_same_bytes_dealt_round_robin(rec_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "SHARD_GROUP", 2)  # 4 shards in 2 groups
    summary = shards.write_shards(rec_dir, str(tmp_path / "sh"), num_shards=4, cache_dir=str(tmp_path / "c"))
    assert (summary["images"], summary["classes"], summary["shards"], summary["new"]) == (16, 5, 4, 16)
    index, contents = _shard_contents(str(tmp_path / "sh"))
    assert [shard["images"] for shard in index["shards"]] == [4, 4, 4, 4] and index["classes"] == 5
    for number, records in enumerate(contents.values()):
        group, member = divmod(number, 2)
        tags = [group * 8 + member + 2 * ii for ii in range(4)]  # each group: 8 consecutive images, alternately
        assert [key for key, _, _ in records] == [f"train.rec record {tag + 1}" for tag in tags]
        assert [label for _, label, _ in records] == LABELS[tags].tolist()
        assert [image for _, _, image in records] == [tagged_rec_image(tag) for tag in tags]
    assert not [name for name in os.listdir(tmp_path / "sh") if name.startswith(".") or name.endswith(".partial")]


def test_shards_of_a_class_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(shards, "FOLDER_BLOCK_FILES", 5)  # blocks of 5, 5, 5 and 1 images
    folder = tmp_path / "folder"
    for tag, label in enumerate(LABELS):
        os.makedirs(folder / str(label), exist_ok=True)
        (folder / str(label) / f"{tag:02d}.png").write_bytes(tagged_image(tag))
    command = ["--to-shards", str(folder), "-o", str(tmp_path / "sh"), "--shards", "2", "--cache_dir", str(tmp_path)]
    assert prepare_cli.main(command) == 0
    progress = capsys.readouterr().err.splitlines()[-1]
    assert "16/16" in progress and "img/s" in progress and "MB/s" in progress  # the bar: images/s and MB/s
    index, contents = _shard_contents(str(tmp_path / "sh"))
    records = sum(contents.values(), [])
    assert sorted(key for key, _, _ in records) == sorted(f"{label}/{tag:02d}.png" for tag, label in enumerate(LABELS))
    for key, label, image in records:
        assert int(key.split("/")[0]) == label and image == (folder / key).read_bytes()
    ds = data.prepare_dataset(str(tmp_path / "sh"), batch_size=4, **OPTIONS)
    tags, labels = _epochs(ds, 1)[0]
    assert sorted(tags) == list(range(16)) and labels == LABELS[tags].tolist()


def test_resume_with_blocks_whose_images_all_go_to_a_finished_shard(tmp_path, monkeypatch):
    """One image per block: on resume, every other block belongs only to the shard already written."""
    folder = tmp_path / "folder"
    for tag, label in enumerate(LABELS):
        os.makedirs(folder / str(label), exist_ok=True)
        (folder / str(label) / f"{tag:02d}.png").write_bytes(tagged_image(tag))
    monkeypatch.setattr(shards, "FOLDER_BLOCK_FILES", 1)
    dest, cache = tmp_path / "sh", str(tmp_path / "c")
    shards.write_shards(str(folder), str(dest), num_shards=2, cache_dir=cache, progress=False)
    first = (dest / "train-00001-of-00002.tfrecord").read_bytes()
    os.remove(dest / "train-00001-of-00002.tfrecord")
    os.remove(dest / "shards.json")  # as if killed before the second shard was renamed into place
    summary = shards.write_shards(str(folder), str(dest), num_shards=2, cache_dir=cache, progress=False)
    assert summary["new"] == 8 and (dest / "train-00001-of-00002.tfrecord").read_bytes() == first
    _, contents = _shard_contents(str(dest))
    assert sorted(key for records in contents.values() for key, _, _ in records) == sorted(
        f"{label}/{tag:02d}.png" for tag, label in enumerate(LABELS)
    )
    assert all(image == (folder / key).read_bytes() for records in contents.values() for key, _, image in records)


def test_every_image_once_per_epoch_from_shards(rec_dir, tmp_path):
    shards.write_shards(rec_dir, str(tmp_path / "sh"), num_shards=4, cache_dir=str(tmp_path / "c"), progress=False)
    ds = data.prepare_dataset(str(tmp_path / "sh"), batch_size=4, **OPTIONS)
    assert (ds.steps_per_epoch, ds.classes, ds.num_images) == (4, 5, 16)
    orders = []
    for tags, labels in _epochs(ds, 3):
        assert sorted(tags) == list(range(16)) and labels == LABELS[tags].tolist()
        orders.append(tags)
    assert orders[0] != orders[1] or orders[1] != orders[2]  # reshuffled
    with pytest.raises(ValueError, match="needs random access by class"):
        data.prepare_dataset(str(tmp_path / "sh"), batch_size=4, image_per_class=2, **OPTIONS)


@pytest.mark.parametrize("num_shards", [4, 3])
def test_two_worker_shares_of_shards(rec_dir, tmp_path, num_shards):
    """4 shards: each worker reads two of them; 3 shards: each reads all and keeps every other record."""
    shards.write_shards(rec_dir, str(tmp_path / "sh"), num_shards, cache_dir=str(tmp_path / "c"), progress=False)
    with pytest.warns(UserWarning, match="do not divide") if num_shards == 3 else contextlib.nullcontext():
        shares = [data.prepare_dataset(str(tmp_path / "sh"), 4, shard=(2, ii), **OPTIONS) for ii in range(2)]
    assert [ds.steps_per_epoch for ds in shares] == [2, 2]
    seen = [_epochs(ds, 2) for ds in shares]
    for epoch in range(2):
        first, second = seen[0][epoch][0], seen[1][epoch][0]
        assert sorted(first + second) == list(range(16)) and not set(first) & set(second)


def test_shard_conversion_resumes_after_a_kill(rec_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "SHARD_GROUP", 2)
    dest, real_open, framed = str(tmp_path / "sh"), shards._open_output, []

    def open_dying_at_the_last_shard(path):
        output = real_open(path)
        if "train-00003" in path:  # the second group dies after writing its first shard
            output.write = lambda data: (_ for _ in ()).throw(KeyboardInterrupt)
        return output

    monkeypatch.setattr(shards, "_open_output", open_dying_at_the_last_shard)
    with pytest.raises(KeyboardInterrupt):
        shards.write_shards(rec_dir, dest, num_shards=4, cache_dir=str(tmp_path / "c"), progress=False)
    done = sorted(name for name in os.listdir(dest) if name.endswith(".tfrecord"))
    assert done == ["train-00000-of-00004.tfrecord", "train-00001-of-00004.tfrecord"]  # the first group, complete
    assert os.path.getsize(os.path.join(dest, "train-00002-of-00004.tfrecord.partial")) > 0  # left behind, unused
    monkeypatch.setattr(shards, "_open_output", real_open)
    assert not os.path.exists(os.path.join(dest, "shards.json"))  # no index: not usable yet
    with pytest.raises(FileNotFoundError, match="shard index not found.*unfinished"):
        data.prepare_dataset(dest, batch_size=4, **OPTIONS)
    with pytest.raises(ValueError, match="another conversion.*shards"):
        shards.write_shards(rec_dir, dest, num_shards=8, cache_dir=str(tmp_path / "c"), progress=False)
    real_frame = tfrecord.ExampleFramer.frame
    monkeypatch.setattr(
        tfrecord.ExampleFramer, "frame", lambda *args: framed.extend(args[5].tolist()) or real_frame(*args)
    )
    summary = shards.write_shards(rec_dir, dest, num_shards=4, cache_dir=str(tmp_path / "c"), progress=False)
    assert summary["new"] == 8 and len(framed) == 8  # only the second group was written again
    _, contents = _shard_contents(dest)
    assert sorted(key for records in contents.values() for key, _, _ in records) == sorted(
        f"train.rec record {key}" for key in range(1, 17)
    )
    assert shards.write_shards(rec_dir, dest, num_shards=4, cache_dir=str(tmp_path / "c"))["new"] == 0


def test_shards_through_a_file_system_url(rec_dir, tmp_path):
    """A ``scheme://`` destination goes through ``tf.io.gfile`` (as ``gs://`` would): written, resumed, trained."""
    url = "file://" + str(tmp_path / "sh")
    summary = shards.write_shards(rec_dir, url, num_shards=2, cache_dir=str(tmp_path / "c"), progress=False)
    assert summary["new"] == 16
    _, contents = _shard_contents(str(tmp_path / "sh"))
    records = sum(contents.values(), [])
    assert sorted(key for key, _, _ in records) == sorted(f"train.rec record {key}" for key in range(1, 17))
    for key, label, image in records:
        tag = int(key.split()[-1]) - 1
        assert (label, image) == (LABELS[tag], tagged_rec_image(tag))
    ds = data.prepare_dataset(url, batch_size=4, **OPTIONS)
    tags, labels = _epochs(ds, 1)[0]
    assert sorted(tags) == list(range(16)) and labels == LABELS[tags].tolist()


def test_damaged_shard_is_refused(rec_dir, tmp_path):
    shards.write_shards(rec_dir, str(tmp_path / "sh"), num_shards=2, cache_dir=str(tmp_path / "c"), progress=False)
    with open(tmp_path / "sh" / "train-00001-of-00002.tfrecord", "r+b") as ff:
        ff.truncate(50)
    with pytest.raises(ValueError, match="50 bytes, the index says"):
        data.prepare_dataset(str(tmp_path / "sh"), batch_size=4, **OPTIONS)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["rec", "shards"])
def test_train_epochs_from_a_rec_or_shards_and_name_a_corrupt_record(tmp_path, source):
    import keras
    from helpers import tiny_basic_model

    from keras_insightface.nn import losses
    from keras_insightface.training import callbacks as myCallbacks
    from keras_insightface.training import train

    paths = {}
    for name, overrides in (("clean", None), ("corrupt", {6: b"garbage"})):
        paths[name] = str(tmp_path / name)
        write_tagged_rec(paths[name], CLASS_SIZES, overrides=overrides)
        if source == "shards":
            shards.write_shards(paths[name], paths[name] + "_sh", 2, cache_dir=str(tmp_path / "c"), progress=False)
            paths[name] += "_sh"
    keras.utils.set_random_seed(0)
    tt = train.Train(
        paths["clean"], str(tmp_path / "m.keras"), basic_model=tiny_basic_model((8, 8, 3), emb=8), batch_size=4,
        random_status=-1, verbose=0, plot_history=False,
    )  # fmt: skip
    assert (tt.classes, tt.steps_per_epoch, tt.train_ds.num_images) == (5, 4, 16)
    for tags, labels in _epochs(tt.train_ds, 2):  # the trainer's own input
        assert sorted(tags) == list(range(16)) and labels == LABELS[tags].tolist()
    history = tt.train([{"loss": losses.ArcfaceLoss(scale=16), "optimizer": "sgd", "epoch": 2}], 0)
    assert len(history["loss"]) == 2 and np.isfinite(history["loss"]).all()
    tt.reset_dataset(paths["corrupt"])
    with pytest.warns(myCallbacks.UnreadableImagesWarning, match="train.rec record 7"):
        tt.train([{"loss": losses.ArcfaceLoss(scale=16), "epoch": 1}], 2)


@pytest.mark.slow
def test_conversion_in_two_processes_writes_the_same_files(rec_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "SHARD_GROUP", 2)  # 4 shards in 2 groups: one per process
    monkeypatch.setattr(shards, "PARALLEL_MIN_BYTES", 0)
    written = {}
    for workers in (1, 2):
        dest = str(tmp_path / f"sh{workers}")
        summary = shards.write_shards(rec_dir, dest, 4, cache_dir=str(tmp_path / "c"), progress=False, workers=workers)
        assert summary["new"] == 16
        written[workers] = {path.name: path.read_bytes() for path in sorted((tmp_path / f"sh{workers}").iterdir())}
    assert written[1].keys() == written[2].keys() and len(written[1]) == 5  # 4 shards and the index
    for name in written[1]:
        if name != "shards.json":
            assert written[1][name] == written[2][name], name

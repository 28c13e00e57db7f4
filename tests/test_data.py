"""data.py: folder indexing, the tf.data pipeline, the .bin format and bad-input errors."""

import io
import os
import pickle
import shutil

import numpy as np
import pytest
from PIL import Image

from keras_insightface.data import pipeline as data


def _write_folder(root, class_sizes, size=24):
    rng = np.random.default_rng(0)
    for name, count in class_sizes.items():
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for ii in range(count):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
                os.path.join(root, name, f"{ii}.png")
            )
    return root


def test_numeric_class_names_sort_numerically(tmp_path):
    root = _write_folder(str(tmp_path / "ds"), {"10": 1, "2": 2, "1": 1})
    names, classes, class_names = data.scan_class_folder(root)
    assert class_names == ["1", "2", "10"]
    assert [os.path.basename(os.path.dirname(nn)) for nn in names] == ["1", "2", "2", "10"]
    assert classes.tolist() == [0, 1, 1, 2]


def test_non_numeric_class_names_sort_lexicographically_and_empty_skipped(tmp_path, caplog):
    root = _write_folder(str(tmp_path / "ds"), {"bob": 1, "Alice": 1, "carl": 0, "10": 1})
    names, classes, class_names = data.scan_class_folder(root)
    assert class_names == ["10", "Alice", "bob"]
    assert classes.tolist() == [0, 1, 2]
    assert "empty class folder" in caplog.text


def test_missing_folder_and_no_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        data.pre_process_folder(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty" / "0")
    with pytest.raises(ValueError, match="no images"):
        data.pre_process_folder(str(tmp_path / "empty"), cache_dir=str(tmp_path / "cache"))


def test_cache_invalidated_when_folder_changes(tmp_path):
    root = _write_folder(str(tmp_path / "ds"), {"0": 2, "1": 2})
    cache = str(tmp_path / "cache")
    first = data.pre_process_folder(root, cache_dir=cache)
    assert os.path.exists(os.path.join(cache, "ds_shuffle.npz"))
    assert len(first["image_names"]) == 4
    _write_folder(root, {"2": 3})
    second = data.pre_process_folder(root, cache_dir=cache)
    assert len(second["image_names"]) == 7 and second["image_classes"].max() == 2
    assert not [ff for ff in os.listdir(cache) if ff.endswith(".tmp.npz")]


def test_verify_images_drops_corrupt_files(tmp_path, caplog):
    root = _write_folder(str(tmp_path / "ds"), {"0": 3, "1": 2})
    with open(os.path.join(root, "1", "broken.jpg"), "wb") as ff:
        ff.write(b"\xff\xd8\xff not a jpeg")
    found = data.pre_process_folder(root, cache_dir=str(tmp_path / "cache"), verify_images=True)
    assert len(found["image_names"]) == 5
    assert "unreadable" in caplog.text


def test_corrupt_image_does_not_kill_the_epoch(tmp_path):
    root = _write_folder(str(tmp_path / "ds"), {"0": 4, "1": 4})
    with open(os.path.join(root, "1", "broken.jpg"), "wb") as ff:
        ff.write(b"garbage")
    ds = data.prepare_dataset(root, batch_size=4, img_shape=(24, 24), random_status=-1, cache_dir=str(tmp_path / "c"))
    batches = [batch for _, batch in zip(range(6), ds.dataset)]  # several passes over 9 files incl. the broken one
    assert all(images.shape == (4, 24, 24, 3) for images, _ in batches)


@pytest.mark.parametrize("random_status", [-1, 0, 1, 2, 3, 100])
def test_pipeline_shapes_range_and_labels(demo_small, tmp_path, random_status):
    ds = data.prepare_dataset(
        demo_small["train_dir"],
        batch_size=8,
        img_shape=(32, 32),
        random_status=random_status,
        random_crop=(28, 28, 3),
        cache_dir=str(tmp_path),
    )
    assert ds.classes == 12 and ds.num_images == 120 and ds.steps_per_epoch == 15
    images, targets = next(iter(ds.dataset))
    assert images.shape == (8, 32, 32, 3) and images.dtype.name == "float32"
    assert targets["label"].shape == (8,) and targets["label"].dtype.name == "int32"
    values = images.numpy()
    assert values.min() >= (0 - 127.5) * 0.0078125 - 1e-6 and values.max() <= (255 - 127.5) * 0.0078125 + 1e-6


def test_labels_match_class_folders_without_augmentation(demo_small, tmp_path):
    """With random_status -1 every image equals its file, normalized, and carries its folder's label.

    TF and PIL JPEG decoders differ by a few levels (mean absolute difference up to 2.4 levels on these files), so
    "equal" is: the closest file, out of all of them, is under 3 levels away and lies in the label's folder.
    """
    ds = data.prepare_dataset(
        demo_small["train_dir"], batch_size=4, img_shape=(32, 32), random_status=-1, cache_dir=str(tmp_path)
    )
    listing = data.pre_process_folder(demo_small["train_dir"], cache_dir=str(tmp_path))
    by_label = {}
    for name, label in zip(listing["image_names"], listing["image_classes"]):
        by_label.setdefault(int(label), []).append(
            (np.asarray(Image.open(name).convert("RGB"), np.float32) - 127.5) * 0.0078125
        )
    refs = np.stack([ref for refs in by_label.values() for ref in refs])
    ref_labels = np.array([ll for ll, refs in by_label.items() for _ in refs])
    closest = []
    for images, targets in ds.dataset.take(ds.steps_per_epoch):  # one epoch: every image once
        distances = np.abs(images.numpy()[:, None] - refs[None]).mean(axis=(2, 3, 4))
        closest += distances.argmin(axis=1).tolist()
        assert (distances.min(axis=1) < 3 * 0.0078125).all()
        assert (ref_labels[distances.argmin(axis=1)] == targets["label"].numpy()).all()
    assert sorted(closest) == list(range(len(refs)))


def test_triplet_batches_are_p_by_k(demo_small, tmp_path):
    ds = data.prepare_dataset(
        demo_small["train_dir"], batch_size=10, img_shape=(32, 32), image_per_class=4, cache_dir=str(tmp_path)
    )
    _, targets = next(iter(ds.dataset))
    labels = targets["label"].numpy()
    assert len(labels) == 8  # batch rounded down to a multiple of K
    groups = labels.reshape(2, 4)
    assert (groups == groups[:, :1]).all() and groups[0, 0] != groups[1, 0]


def test_mixup_keeps_sparse_labels(demo_small, tmp_path):
    ds = data.prepare_dataset(
        demo_small["train_dir"], batch_size=8, img_shape=(32, 32), mixup_alpha=0.4, cache_dir=str(tmp_path)
    )
    _, targets = next(iter(ds.dataset))
    assert targets["label_b"].shape == (8,) and targets["mix"].shape == (8,)
    mix = targets["mix"].numpy()
    assert ((mix >= 0) & (mix <= 1)).all()


def test_npz_image_list_input(demo_small, tmp_path):
    listing = data.pre_process_folder(demo_small["train_dir"], cache_dir=str(tmp_path))
    npz = str(tmp_path / "list.npz")
    np.savez(npz, image_names=listing["image_names"][:40], image_classes=listing["image_classes"][:40])
    ds = data.prepare_dataset(npz, batch_size=8, img_shape=(32, 32))
    assert ds.num_images == 40 and ds.classes == 4


# ------------------------------------------------------------------------------------------------ .bin files
def test_bin_round_trip(demo_small):
    bins, issame = data.load_bin(demo_small["bin_path"])
    assert len(bins) == 400 and issame.dtype == bool and issame.sum() == 100
    assert all(isinstance(bb, bytes) for bb in bins)
    assert Image.open(io.BytesIO(bins[0])).size == (32, 32)


def test_bin_with_numpy_array_images_is_read(tmp_path, demo_small):
    bins, issame = data.load_bin(demo_small["bin_path"])
    old_style = str(tmp_path / "old.bin")
    with open(old_style, "wb") as ff:
        pickle.dump(([np.frombuffer(bb, dtype=np.uint8) for bb in bins[:4]], [True, False]), ff, protocol=2)
    loaded, same = data.load_bin(old_style)
    assert loaded == bins[:4] and same.tolist() == [True, False]


def test_malformed_bins_give_clear_errors(tmp_path):
    path = str(tmp_path / "bad.bin")
    with open(path, "wb") as ff:
        ff.write(b"not a pickle at all")
    with pytest.raises(ValueError, match="not a valid verification bin"):
        data.load_bin(path)
    with open(path, "wb") as ff:
        pickle.dump(([b"a", b"b", b"c"], [True]), ff)
    with pytest.raises(ValueError, match="3 images for 1 pairs"):
        data.load_bin(path)
    with open(path, "wb") as ff:
        pickle.dump(([b"a", b"b"], [True], "extra"), ff)
    with pytest.raises(ValueError, match="pair"):
        data.load_bin(path)
    with pytest.raises(FileNotFoundError):
        data.load_bin(str(tmp_path / "missing.bin"))


class _Evil:
    def __reduce__(self):
        return (shutil.rmtree, ("/nonexistent",))


def test_bin_loader_refuses_code(tmp_path):
    path = str(tmp_path / "evil.bin")
    with open(path, "wb") as ff:
        pickle.dump(([_Evil(), b"x"], [True]), ff)
    with pytest.raises(ValueError, match="refusing to load 'shutil.rmtree'"):
        data.load_bin(path)


def test_wrap_a_user_dataset():
    import tensorflow as tf

    images = np.zeros((6, 8, 8, 3), "float32")
    raw = tf.data.Dataset.from_tensor_slices((images, np.arange(6) % 3)).batch(2)
    wrapped = data.TrainDataset.from_dataset(raw, classes=3, steps_per_epoch=3)
    batches = [targets["label"].numpy().tolist() for _, targets in wrapped.dataset.take(4)]
    assert batches == [[0, 1], [2, 0], [1, 2], [0, 1]]  # repeated, sparse int32 labels
    with pytest.raises(ValueError, match="images, labels"):
        data.TrainDataset.from_dataset(tf.data.Dataset.range(3), classes=3, steps_per_epoch=1)


def test_distill_tfrecord_and_npz_give_embedding_targets(demo_small, tmp_path):
    from keras_insightface.tools import distiller as data_distiller

    listing = data.pre_process_folder(demo_small["train_dir"], cache_dir=str(tmp_path))
    teacher = np.random.default_rng(0).normal(size=(12, 6)).astype("float16")  # one embedding per class
    embeddings = teacher[listing["image_classes"]]
    record = data_distiller.write_distill_tfrecord(
        str(tmp_path / "d.tfrecord"), listing["image_names"], listing["image_classes"], embeddings
    )
    npz = str(tmp_path / "d.npz")
    np.savez(npz, image_names=listing["image_names"], image_classes=listing["image_classes"], embeddings=embeddings)
    for source in (record, npz):
        ds = data.prepare_dataset(source, batch_size=8, img_shape=(32, 32), cache_dir=str(tmp_path))
        assert ds.embedding_dim == 6 and ds.classes == 12 and ds.num_images == 120
        _, targets = next(iter(ds.dataset))
        expected = teacher.astype("float32")[targets["label"].numpy()]
        np.testing.assert_array_equal(targets["embedding"].numpy(), expected)


def _constant_image_folder(root, num_classes, per_class, size=8):
    """Class folders of lossless single-colour images; image k (class-major) has intensity 10 * k + 5."""
    for class_id in range(num_classes):
        os.makedirs(os.path.join(root, str(class_id)))
        for ii in range(per_class):
            value = 10 * (class_id * per_class + ii) + 5
            Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(
                os.path.join(root, str(class_id), f"{ii}.png")
            )
    return root


def _pixels_and_labels(dataset, batches):
    """First pixel intensity (0..255) and label of every image in the first ``batches`` batches."""
    pixels, labels = [], []
    for images, targets in dataset.take(batches):
        pixels += np.rint(images.numpy()[:, 0, 0, 0] / data.SEEDS_SCALE + 127.5).astype(int).tolist()
        labels += targets["label"].numpy().tolist()
    return pixels, labels


def test_shards_split_the_images_before_decoding(tmp_path):
    root = _constant_image_folder(str(tmp_path / "ds"), num_classes=4, per_class=3)
    kwargs = dict(batch_size=2, img_shape=(8, 8), random_status=-1, cache_dir=str(tmp_path / "cache"), seed=1)
    shards = [data.prepare_dataset(root, shard=(2, index), **kwargs) for index in range(2)]
    assert [ds.steps_per_epoch for ds in shards] == [3, 3] and shards[0].num_images == 12 and shards[0].classes == 4
    seen = [_pixels_and_labels(ds.dataset, 3) for ds in shards]  # one epoch of each shard: 6 images
    first, second = (set(pixels) for pixels, _ in seen)
    assert len(first) == 6 and len(second) == 6 and not first & second
    assert first | second == {10 * kk + 5 for kk in range(12)}
    for pixels, labels in seen:
        assert labels == [(pixel - 5) // 10 // 3 for pixel in pixels]  # each image keeps its class


def test_triplet_shards_split_identities(tmp_path):
    root = _constant_image_folder(str(tmp_path / "ds"), num_classes=4, per_class=3)
    kwargs = dict(batch_size=6, img_shape=(8, 8), random_status=-1, image_per_class=3, cache_dir=str(tmp_path / "c"))
    labels = [
        set(_pixels_and_labels(data.prepare_dataset(root, shard=(2, ii), **kwargs).dataset, 4)[1]) for ii in (0, 1)
    ]
    assert len(labels[0]) == 2 and len(labels[1]) == 2 and labels[0] | labels[1] == {0, 1, 2, 3}


def test_triplet_batches_stay_p_by_k_around_a_corrupt_image(tmp_path):
    root = _write_folder(str(tmp_path / "ds"), {str(cc): 4 for cc in range(5)})
    with open(os.path.join(root, "2", "broken.jpg"), "wb") as ff:
        ff.write(b"garbage")
    ds = data.prepare_dataset(
        root, batch_size=8, img_shape=(24, 24), image_per_class=4, cache_dir=str(tmp_path / "c"), seed=0
    )
    for _, targets in ds.dataset.take(12):  # the broken file is drawn in many of these class visits
        groups = targets["label"].numpy().reshape(2, 4)
        assert (groups == groups[:, :1]).all()


def _folder_with_unreadable_files(root):
    """4 classes x 3 lossless images (``_constant_image_folder``) plus a truncated JPEG, a random-bytes ``.jpg`` and
    a text file named ``.png``; returns the three bad paths."""
    _constant_image_folder(root, num_classes=4, per_class=3)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    bad = {
        os.path.join(root, "0", "truncated.jpg"): buffer.getvalue()[: len(buffer.getvalue()) // 2],
        os.path.join(root, "1", "random.jpg"): np.random.default_rng(1).bytes(300),
        os.path.join(root, "2", "text.png"): b"this is a text file, not a PNG\n",
    }
    for path, content in bad.items():
        with open(path, "wb") as ff:
            ff.write(content)
    return sorted(bad)


def test_unreadable_images_are_skipped_and_named(tmp_path):
    """15 files, 3 unreadable: reading the 12 good images of the first epoch records all three bad files by name."""
    bad = _folder_with_unreadable_files(str(tmp_path / "ds"))
    ds = data.prepare_dataset(
        str(tmp_path / "ds"), batch_size=5, img_shape=(8, 8), random_status=-1, cache_dir=str(tmp_path / "c"), seed=0
    )
    # 15 files in batches of 5: an epoch cuts none, so its 12 good images are the first 12 read, whatever the order
    pixels, labels = _pixels_and_labels(ds.dataset, 3)
    assert set(pixels) == {10 * kk + 5 for kk in range(12)}  # only the good images, each in its own class
    assert labels == [(pixel - 5) // 10 // 3 for pixel in pixels]
    count, names = ds.skipped.drain()
    assert count >= 3 and sorted(set(names)) == bad and count == len(names)
    assert ds.skipped.drain() == (0, [])  # drained


def test_a_pipeline_started_later_reports_only_the_unreadable_images_it_reads(tmp_path):
    """A resumed run's pipeline starts at a later batch: the records before its start are not "skipped images".
    From epoch 2 on, 15 good images read cover all 15 files of epoch 2 (3 bad) and at most 3 bad ones of epoch 3."""
    bad = _folder_with_unreadable_files(str(tmp_path / "ds"))
    ds = data.prepare_dataset(
        str(tmp_path / "ds"), batch_size=5, img_shape=(8, 8), random_status=-1, cache_dir=str(tmp_path / "c"), seed=0
    )
    pixels, _ = _pixels_and_labels(ds.at(1, 0), 3)
    assert len(pixels) == 15
    count, names = ds.skipped.drain()
    assert 3 <= count <= 6 and count == len(names) and set(names) == set(bad)


def test_verify_images_decodes_fully_and_caches(tmp_path, monkeypatch):
    bad = _folder_with_unreadable_files(str(tmp_path / "ds"))
    cache = str(tmp_path / "cache")
    found = data.pre_process_folder(str(tmp_path / "ds"), cache_dir=cache, verify_images=True)
    assert len(found["image_names"]) == 12 and not set(bad) & set(found["image_names"].tolist())
    monkeypatch.setattr(data, "undecodable_indices", lambda *args, **kwargs: pytest.fail("verified again"))
    again = data.pre_process_folder(str(tmp_path / "ds"), cache_dir=cache, verify_images=True)
    assert again["image_names"].tolist() == found["image_names"].tolist()  # the verified list came from the cache


def test_undecodable_indices_of_encoded_images():
    good = data.encode_jpeg(np.zeros((6, 6, 3), np.uint8))
    encoded = [good, b"garbage", good, good[: len(good) // 2], good]
    assert data.undecodable_indices(encoded, is_path=False).tolist() == [1, 3]

"""Data tools: RecordIO round trip, .bin re-encoding and building, distillation data, sub-center cleaning."""

import hashlib
import io
import os
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from keras_insightface import utils
from keras_insightface.cli import distill as distill_cli
from keras_insightface.cli import prepare as prepare_cli
from keras_insightface.data import pipeline as data
from keras_insightface.tools import distiller as data_distiller
from keras_insightface.tools import drop_top_k as data_drop_top_k
from keras_insightface.tools import prepare_data

MAGIC = struct.pack("<I", 0xCED7230A)


def _jpeg(rng, size=16, comment=None):
    """Random-noise JPEG; ``comment`` is inserted as a COM segment right after SOI (keeps the file valid)."""
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
    jpeg = buffer.getvalue()
    if comment is not None:
        jpeg = jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + jpeg[2:]
    return jpeg


def _png(color, size=8):
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), color, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write(path, payload):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as ff:
        ff.write(payload)


def _tree(folder):
    """``{relative path: bytes}`` of every file under ``folder``."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as ff:
                files[os.path.relpath(os.path.join(root, name), folder)] = ff.read()
    return files


# A payload is the 24-byte header followed by the image (scalar label), so a COM segment holding
# b"\0\0" + MAGIC + b"abcd" + MAGIC + MAGIC puts the magic word at payload offsets 32, 40 and 44: all 4-aligned,
# so the dmlc writer must split that record into 4 parts (one of them empty).
SPLIT_COMMENT = b"\0\0" + MAGIC + b"abcd" + MAGIC + MAGIC


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    """3 classes x 3 JPEGs; image 1/1 forces split records, image 2/0 is large (~90 KB)."""
    root = tmp_path_factory.mktemp("folder") / "faces"
    rng = np.random.default_rng(0)
    for label in range(3):
        for index in range(3):
            if (label, index) == (1, 1):
                payload = _jpeg(rng, comment=SPLIT_COMMENT)
            elif (label, index) == (2, 0):
                payload = _jpeg(rng, size=320)
            else:
                payload = _jpeg(rng)
            _write(str(root / str(label) / f"{index}.jpg"), payload)
    return str(root)


@pytest.fixture()
def packed(class_folder, tmp_path):
    """``class_folder`` packed to RecordIO, image 0/2 with a multi-label header ``[0, 7.5, -2]``."""
    dest = tmp_path / "faces_rec"
    prepare_data.pack_folder(class_folder, str(dest), extra_labels={"0/2.jpg": [7.5, -2]})
    return str(dest)


def _frames_at(rec_path, offset):
    """Continuation flags of the frames of the record at ``offset`` (parsed here independently)."""
    with open(rec_path, "rb") as ff:
        ff.seek(offset)
        flags = []
        while True:
            magic, lrec = struct.unpack("<II", ff.read(8))
            assert magic == 0xCED7230A
            flags.append(lrec >> 29)
            length = lrec & ((1 << 29) - 1)
            ff.seek(length + (-length % 4), 1)
            if flags[-1] in (0, 3):
                return flags


def test_recordio_round_trip(class_folder, packed):
    summary = prepare_data.recordio_to_folders(packed)
    assert summary["dest_dir"] == packed + "_112x112_folders"
    assert (summary["expected"], summary["extracted"], summary["mismatch"]) == (9, 9, False)
    source, extracted = _tree(class_folder), _tree(summary["dest_dir"])
    # images are records 1..9 in label order; output is <label>/<record>.jpg, byte-for-byte identical
    expected = {
        f"{label}/{label * 3 + index + 1}.jpg": source[f"{label}/{index}.jpg"]
        for label in range(3)
        for index in range(3)
    }
    assert extracted == expected
    assert len(source["2/0.jpg"]) > 50_000

    index = prepare_data.read_idx(os.path.join(packed, "train.idx"))
    assert _frames_at(os.path.join(packed, "train.rec"), index[5]) == [1, 2, 2, 3]  # image 1/1: split record
    assert _frames_at(os.path.join(packed, "train.rec"), index[1]) == [0]
    with prepare_data.RecordIOReader(os.path.join(packed, "train.rec"), os.path.join(packed, "train.idx")) as reader:
        header0, _ = prepare_data.unpack_record(reader.read(0))
        np.testing.assert_array_equal(header0.label, [10, 13])  # [first identity record, end]
        ranges = [prepare_data.unpack_record(reader.read(key))[0].label.tolist() for key in (10, 11, 12)]
        assert ranges == [[1, 4], [4, 7], [7, 10]]
        multi, image = prepare_data.unpack_record(reader.read(3))
        assert multi.flag == 3 and multi.label.tolist() == [0.0, 7.5, -2.0] and image == source["0/2.jpg"]
    with open(os.path.join(packed, "property")) as ff:
        assert ff.read().strip() == "3,16,16"


def test_recordio_resume_skips_done_images(packed):
    dest = prepare_data.recordio_to_folders(packed)["dest_dir"]
    os.remove(os.path.join(dest, "1", "5.jpg"))
    summary = prepare_data.recordio_to_folders(packed)
    assert (summary["new"], summary["extracted"]) == (1, 9)
    assert not [name for name in _tree(dest) if ".tmp" in name]


def test_reader_joins_hand_made_split_record(tmp_path):
    """Frames written by hand per the dmlc format: parts joined with the magic word, padding dropped."""
    header = struct.pack("<IfQQ", 0, 4.0, 0, 0)
    parts = [header + b"abcd", b"", b"xyz"]  # 28 bytes, empty middle part, 3 bytes + 1 padding byte
    rec = b""
    for cflag, part in zip((1, 2, 3), parts):
        rec += MAGIC + struct.pack("<I", (cflag << 29) | len(part)) + part + b"\0" * (-len(part) % 4)
    rec_path, idx_path = tmp_path / "x.rec", tmp_path / "x.idx"
    rec_path.write_bytes(rec)
    idx_path.write_text("7\t0\n")
    with prepare_data.RecordIOReader(str(rec_path), str(idx_path)) as reader:
        header_out, image = prepare_data.unpack_record(reader.read(7))
    assert header_out.label == 4.0 and header_out.flag == 0
    assert image == b"abcd" + MAGIC + MAGIC + b"xyz"


@pytest.mark.parametrize("cut, message", [(4, "4 of 8 header bytes"), (20, "record needs")])
def test_truncated_rec_names_the_record(packed, cut, message):
    rec_path = os.path.join(packed, "train.rec")
    index = prepare_data.read_idx(os.path.join(packed, "train.idx"))
    with open(rec_path, "r+b") as ff:
        ff.truncate(index[7] + cut)  # cut record 7 (the large image) inside its frame header / its payload
    with pytest.raises(prepare_data.RecordIOError, match=rf"record 7 at offset {index[7]}: truncated file, {message}"):
        prepare_data.recordio_to_folders(packed)


def test_cli_reports_a_truncated_rec_in_one_line(packed, capsys):
    rec_path = os.path.join(packed, "train.rec")
    index = prepare_data.read_idx(os.path.join(packed, "train.idx"))
    with open(rec_path, "r+b") as ff:
        ff.truncate(index[7] + 20)
    assert utils.run_main(prepare_cli.main, ["-D", packed]) == 2
    err = capsys.readouterr().err  # besides the error line, stderr holds only the progress bar
    errors = [line for line in err.splitlines() if "error:" in line]
    assert "Traceback" not in err and len(errors) == 1
    assert f": error: {rec_path}: record 7 at offset {index[7]}: truncated file" in errors[0]


def test_count_mismatch_is_reported(packed):
    idx_path = os.path.join(packed, "train.idx")
    with open(idx_path) as ff:
        lines = [line for line in ff if not line.startswith("4\t")]
    with open(idx_path, "w") as ff:
        ff.writelines(lines)
    with pytest.warns(UserWarning, match="announces 9 images but 8"):
        summary = prepare_data.recordio_to_folders(packed)
    assert summary["mismatch"] and summary["extracted"] == 8
    with pytest.warns(UserWarning, match="announces 9 images"):
        assert prepare_cli.main(["-D", packed]) == 1


def test_reformat_old_bin_keeps_original(tmp_path):
    rng = np.random.default_rng(1)
    images = [_jpeg(rng) for _ in range(4)]
    old_path = tmp_path / "agedb_30.bin"
    with open(old_path, "wb") as ff:  # old format: encoded bytes stored as numpy uint8 arrays
        pickle.dump(([np.frombuffer(ii, np.uint8) for ii in images], [True, False]), ff)
    original = hashlib.sha256(old_path.read_bytes()).hexdigest()
    assert prepare_cli.main(["-D", str(tmp_path), "-T", "agedb_30.bin"]) == 0  # -T names are relative to -D
    new_path = tmp_path / "agedb_30_reformatted.bin"
    with open(new_path, "rb") as ff:
        bins, issame = data.restricted_pickle_load(ff)
    assert all(type(ii) is bytes for ii in bins) and bins == images and list(issame) == [True, False]
    assert hashlib.sha256(old_path.read_bytes()).hexdigest() == original
    with pytest.raises(ValueError, match="refusing to overwrite"):
        prepare_data.reformat_bin(str(old_path), str(old_path))


def test_make_bin_from_folder(class_folder, tmp_path):
    dest = str(tmp_path / "mine.bin")
    assert prepare_cli.main(["-B", class_folder, "-o", dest, "--pairs", "11", "--seed", "3"]) == 0
    bins, issame = data.load_bin(dest)
    assert len(bins) == 22 and int(issame.sum()) == 5
    owner = {payload: name.split("/")[0] for name, payload in _tree(class_folder).items()}
    pairs = set()
    for aa, bb, same in zip(bins[0::2], bins[1::2], issame):
        assert aa in owner and bb in owner  # bytes copied unchanged from the files
        assert (owner[aa] == owner[bb]) == same and aa != bb
        pairs.add(frozenset((aa, bb)))
    assert len(pairs) == 11
    with pytest.raises(ValueError, match="40 pairs need 20 genuine and 20 impostor pairs, its .* allow 9 and "):
        prepare_data.make_bin_from_folder(class_folder, dest, num_pairs=40)  # only 9 genuine pairs exist


# ---------------------------------------------------------------------------------------------------------
# Distillation data
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def png_folder(tmp_path_factory):
    """3 classes x 4 random 8x8 PNGs (lossless, so the test can decode them independently with PIL)."""
    root = tmp_path_factory.mktemp("png") / "pngs"
    rng = np.random.default_rng(2)
    for label in range(3):
        for index in range(4):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, format="PNG")
            _write(str(root / str(label) / f"{index}.png"), buffer.getvalue())
    return str(root)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Dense(6, name="embedding")(keras.layers.Flatten()(inputs))
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.keras")
    keras.Model(inputs, outputs).save(path)
    return path


def _reference_embeddings(teacher_file, names):
    """Teacher embeddings computed here: PIL decode, (x - 127.5) / 128, numpy forward pass, L2 normalize."""
    import keras

    dense = keras.saving.load_model(teacher_file).get_layer("embedding")
    kernel, bias = (keras.ops.convert_to_numpy(ww) for ww in dense.weights)
    images = np.stack([np.asarray(Image.open(name), dtype=np.float64) for name in names])
    emb = ((images - 127.5) / 128).reshape(len(names), -1) @ kernel + bias
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def _read_tfrecord(path):
    dataset, header = data_distiller.read_distill_tfrecord(path)
    names, classes, embs = zip(*dataset.as_numpy_iterator())
    return [name.decode() for name in names], np.array(classes), np.stack(embs), header


def test_distiller_tfrecord_npz_fp16(png_folder, teacher_file, tmp_path):
    fp32 = data_distiller.data_distiller(png_folder, teacher_file, str(tmp_path / "d32.tfrecord"), batch_size=5)
    names, classes, embs, header = _read_tfrecord(fp32)
    assert header == {"classes": 3, "emb_shape": 6, "total": 12, "use_fp16": False}
    assert sorted(names) == sorted(str(path) for path in data.scan_class_folder(png_folder)[0])
    assert [int(os.path.basename(os.path.dirname(name))) for name in names] == classes.tolist()
    np.testing.assert_allclose(embs, _reference_embeddings(teacher_file, names), atol=2e-6)

    npz16 = data_distiller.data_distiller(
        png_folder, teacher_file, str(tmp_path / "d16.npz"), batch_size=5, use_fp16=True, save_npz=True
    )
    names16, classes16, embs16 = data_distiller.load_distill_npz(npz16)
    assert embs16.dtype == np.float16 and names16.tolist() == names and classes16.tolist() == classes.tolist()
    np.testing.assert_allclose(embs16.astype(np.float32), embs, rtol=0, atol=2**-12)  # fp16 rounding of |x| < 1

    distill_cli.main(["-D", npz16])  # npz alone -> tfrecord next to it
    names_t, classes_t, embs_t, header_t = _read_tfrecord(str(tmp_path / "d16.tfrecord"))
    assert header_t["use_fp16"] and names_t == names and classes_t.tolist() == classes.tolist()
    np.testing.assert_array_equal(embs_t, embs16.astype(np.float32))


def test_distiller_resumes_after_interruption(png_folder, teacher_file, tmp_path, monkeypatch):
    real_embed, calls, interrupted = data_distiller.embed_images, [], []

    def failing_embed(teacher, names, batch_size, **kwargs):
        calls.append(len(names))
        if len(calls) == 2 and not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt
        return real_embed(teacher, names, batch_size, **kwargs)

    dest = str(tmp_path / "resume.tfrecord")
    monkeypatch.setattr(data_distiller, "embed_images", failing_embed)
    with pytest.raises(KeyboardInterrupt):
        data_distiller.data_distiller(png_folder, teacher_file, dest, batch_size=2, chunk_size=4)
    assert not os.path.exists(dest) and sorted(os.listdir(dest + ".parts")) == ["job.json", "part_000000.npy"]
    calls.clear()
    data_distiller.data_distiller(png_folder, teacher_file, dest, batch_size=2, chunk_size=4)
    assert calls == [4, 4] and not os.path.exists(dest + ".parts")  # only the 2 missing chunks were embedded
    names, _, embs, _ = _read_tfrecord(dest)
    np.testing.assert_allclose(embs, _reference_embeddings(teacher_file, names), atol=2e-6)


def test_distiller_bad_inputs(png_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher model file not found"):
        data_distiller.data_distiller(png_folder, str(tmp_path / "missing.keras"))
    with pytest.raises(ValueError, match="teacher model"):
        data_distiller.data_distiller(png_folder, None)
    bogus = tmp_path / "bogus.tfrecord"
    bogus.write_bytes(b"not a tfrecord at all")
    with pytest.raises(ValueError, match="not a distillation TFRecord"):
        data_distiller.read_distill_tfrecord(str(bogus))
    onnx_path = tmp_path / "teacher.onnx"
    onnx_path.write_bytes(b"\0")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs onnxruntime"):
            data_distiller.load_teacher(str(onnx_path))


# ---------------------------------------------------------------------------------------------------------
# Sub-center cleaning
# ---------------------------------------------------------------------------------------------------------
# Embedding = mean color (x - 127.5) / 128 (a global-average-pooling "basic model"), so a constant color image's
# embedding points where its color says. Sub-centers (class-major columns, K = 2):
X, Y, Z = [1, 0, 0], [0, 1, 0], [0, 0, 1]
SUB_CENTERS = [(X, Y), (Z, [-1, 0, 0]), (Z, Z), (Y, Z)]
IMAGES = {  # class -> [(color, kept at 75 degrees, kept at 50 degrees)]
    # 4 images vote X, 3 vote Y: X dominates. 60 deg from X kept at 75 only; 80 and 90 deg dropped.
    0: [((255, 128, 128), 1, 1), ((250, 130, 120), 1, 1), ((255, 140, 128), 1, 1), ((255, 120, 135), 1, 1),
        ((178, 214, 128), 1, 0), ((148, 246, 128), 0, 0), ((128, 255, 128), 0, 0)],
    1: [((128, 128, 255), 1, 1), ((120, 130, 250), 1, 1), ((135, 125, 255), 1, 1), ((0, 128, 128), 0, 0)],
    2: [((255, 128, 128), 0, 0), ((255, 130, 128), 0, 0)],  # 90 deg from both sub-centers: class emptied
    3: [((128, 255, 128), 1, 1), ((128, 250, 130), 1, 1)],  # renumbered to class 2
}  # fmt: skip


@pytest.fixture(scope="module")
def sub_center_setup(tmp_path_factory):
    import keras

    from keras_insightface.nn import losses

    root = tmp_path_factory.mktemp("topk") / "colors"
    for label, images in IMAGES.items():
        for index, (color, _, _) in enumerate(images):
            _write(str(root / str(label) / f"{index}.png"), _png(color))
    inputs = keras.Input((8, 8, 3))
    embedding = keras.layers.GlobalAveragePooling2D(name="embedding")(inputs)
    head = losses.NormDense(4, loss_top_k=2, name="NormDense")
    model = keras.Model(inputs, head(embedding))
    kernel = np.array([center for pair in SUB_CENTERS for center in pair], dtype=np.float32).T * 3.0  # (3, 8)
    head.kernel.assign(kernel)
    return str(root), model


@pytest.mark.parametrize("deg_thresh, column", [(75, 1), (50, 2)])
def test_drop_top_k_hand_built(sub_center_setup, tmp_path, deg_thresh, column):
    root, model = sub_center_setup
    dest = data_drop_top_k.data_drop_top_k(
        model, root, str(tmp_path / "clean.npz"), deg_thresh=deg_thresh, batch_size=4
    )
    with np.load(dest, allow_pickle=False) as content:
        kept = sorted(zip(content["image_names"].tolist(), content["image_classes"].tolist()))
    renumber = {0: 0, 1: 1, 3: 2}
    expected = sorted(
        (os.path.join(root, str(label), f"{index}.png"), renumber[label])
        for label, images in IMAGES.items()
        for index, image in enumerate(images)
        if image[column]
    )
    assert kept == expected
    assert data.pre_process_folder(dest)["image_classes"].max() == 2  # loadable as an image list


def test_drop_top_k_limit_and_errors(sub_center_setup, tmp_path):
    root, model = sub_center_setup
    dest = data_drop_top_k.data_drop_top_k(model, root, str(tmp_path / "limited.npz"), limit=2, batch_size=4)
    with np.load(dest, allow_pickle=False) as content:
        assert content["image_classes"].tolist() == [0] * 5 + [1] * 3
    with pytest.raises(ValueError, match="no NormDense layer"):
        data_drop_top_k.data_drop_top_k(_basic(model), root)
    with pytest.raises(ValueError, match=r"\[0, 180\]"):
        data_drop_top_k.data_drop_top_k(model, root, deg_thresh=200)


def _basic(model):
    import keras

    return keras.Model(model.inputs[0], model.get_layer("embedding").output)


def test_drop_top_k_accepts_a_partial_fc_head(sub_center_setup, tmp_path):
    """A ``PartialFCNormDense`` head stores the same centers transposed; the cleaning result must not change."""
    import keras

    from keras_insightface.nn import losses

    root, model = sub_center_setup
    inputs = keras.Input((8, 8, 3))
    embedding = keras.layers.GlobalAveragePooling2D(name="embedding")(inputs)
    head = losses.PartialFCNormDense(4, sample_rate=0.5, loss_top_k=2, name="arcface")
    partial_model = keras.Model(inputs, head(embedding))
    head.kernel.assign(keras.ops.convert_to_numpy(model.get_layer("NormDense").kernel).T)
    results = []
    for mm, name in ((model, "full.npz"), (partial_model, "partial.npz")):
        dest = data_drop_top_k.data_drop_top_k(mm, root, str(tmp_path / name), deg_thresh=75, batch_size=4)
        with np.load(dest, allow_pickle=False) as content:
            results.append(sorted(zip(content["image_names"].tolist(), content["image_classes"].tolist())))
    assert results[0] == results[1] and len(results[0]) == 10  # 5 + 3 + 0 + 2 kept at 75 degrees (IMAGES)

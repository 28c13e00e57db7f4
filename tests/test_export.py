"""Export to TFLite / SavedModel / ONNX: agreement with the Keras model, options, errors, atomic writes.

The reference is always the Keras model itself (plus numpy for normalization and L2); a small GDC model at 48x48
with its BatchNormalization statistics set on demo faces keeps every conversion at a few seconds.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_insightface import utils
from keras_insightface.cli import export as export_cli
from keras_insightface.data import demo as demo_data
from keras_insightface.tools import export

SIZE = 48
EMB = 64


def cosine(aa, bb):
    aa, bb = np.asarray(aa, np.float64), np.asarray(bb, np.float64)
    return np.sum(aa * bb, axis=1) / np.linalg.norm(aa, axis=1) / np.linalg.norm(bb, axis=1)


def seeds_normalize(images):
    """Independent reference of the training preprocessing, (x - 127.5) / 128."""
    return ((np.asarray(images, np.float32) - 127.5) * 0.0078125).astype(np.float32)


def build_small_model():
    """MobileFaceNet-like: conv-BN-PReLU, depthwise, pointwise, GDC (depthwise over the whole map), Dense, BN."""
    inputs = keras.Input((SIZE, SIZE, 3))
    nn = keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(inputs)
    nn = keras.layers.BatchNormalization()(nn)
    nn = keras.layers.PReLU(shared_axes=[1, 2])(nn)
    nn = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", use_bias=False)(nn)
    nn = keras.layers.BatchNormalization()(nn)
    nn = keras.layers.ReLU()(nn)
    nn = keras.layers.Conv2D(48, 1, use_bias=False)(nn)
    nn = keras.layers.BatchNormalization()(nn)
    nn = keras.layers.ReLU()(nn)
    nn = keras.layers.DepthwiseConv2D(nn.shape[1], use_bias=False, name="GDC_dw")(nn)
    nn = keras.layers.BatchNormalization()(nn)
    nn = keras.layers.Flatten()(nn)
    nn = keras.layers.Dense(EMB, use_bias=False)(nn)
    nn = keras.layers.BatchNormalization(name="pre_embedding")(nn)
    embedding = keras.layers.Activation("linear", dtype="float32", name="embedding")(nn)
    return keras.Model(inputs, embedding, name="small_gdc")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Demo faces at 48x48: a class folder and a .bin (both usable as representative data)."""
    root = tmp_path_factory.mktemp("demo")
    paths = demo_data.make_demo_dataset(
        str(root), num_classes=4, images_per_class=5, num_eval_classes=3, eval_images_per_class=4, num_pairs=12,
        image_size=SIZE, seed=3,
    )  # fmt: skip
    images = export.load_representative_images(paths["train_dir"], (SIZE, SIZE), num=20)
    return {**paths, "images": images}


@pytest.fixture(scope="module")
def model(demo):
    keras.utils.set_random_seed(0)
    return export.calibrate_batch_norm(build_small_model(), seeds_normalize(demo["images"]))


@pytest.fixture(scope="module")
def reference(model, demo):
    return model.predict(seeds_normalize(demo["images"]), verbose=0)


def assert_no_leftovers(folder, keep=()):
    assert sorted(name for name in os.listdir(folder) if name not in keep) == []


def test_representative_images_from_folder_and_bin(demo, tmp_path):
    from_folder = export.load_representative_images(demo["train_dir"], (40, 44), num=7)
    assert from_folder.shape == (7, 40, 44, 3) and from_folder.dtype == np.uint8
    from_bin = export.load_representative_images(demo["bin_path"], (SIZE, SIZE), num=100)
    assert from_bin.shape == (24, SIZE, SIZE, 3)  # 12 pairs = 24 images, fewer than asked
    with pytest.raises(ValueError, match="no images"):
        export.load_representative_images(str(tmp_path), (SIZE, SIZE))
    with pytest.raises(ValueError, match="folder of images or a verification .bin"):
        export.load_representative_images(__file__, (SIZE, SIZE))  # an existing non-.bin file


@pytest.mark.parametrize(
    "quant, min_cosine, max_size_ratio",
    [(None, 0.9999, 1.0), ("float16", 0.999, 0.65), ("dynamic", 0.99, 0.5)],
)
def test_tflite_float_and_dynamic_agree_with_keras(model, demo, reference, tmp_path, quant, min_cosine, max_size_ratio):
    dest = export.export_model(model, tmp_path / "model.tflite", quant=quant)
    outputs = export.tflite_predict(dest, seeds_normalize(demo["images"]))
    assert cosine(outputs, reference).min() >= min_cosine
    float32_size = 4 * model.count_params()
    assert os.path.getsize(dest) <= max_size_ratio * float32_size + 8000  # + flatbuffer overhead
    assert_no_leftovers(tmp_path, keep=["model.tflite"])


@pytest.mark.parametrize("quant, source", [("uint8", "train_dir"), ("int8", "bin_path")])
def test_tflite_full_integer_agrees_with_keras(model, demo, reference, tmp_path, quant, source):
    dest = export.export_model(
        model, tmp_path / "model.tflite", quant=quant, representative_data=demo[source], num_calibration=20
    )
    interpreter = export.tflite_interpreter(dest)
    assert interpreter.get_input_details()[0]["dtype"] == np.dtype(quant)
    assert interpreter.get_output_details()[0]["dtype"] == np.dtype(quant)
    outputs = export.tflite_predict(interpreter, seeds_normalize(demo["images"]))
    assert cosine(outputs, reference).min() >= 0.99


def test_tflite_preprocessing_l2_and_dynamic_size(model, demo, tmp_path):
    dest = export.export_model(
        model, tmp_path / "deploy.tflite", include_preprocessing=True, l2_normalize=True, dynamic_input_size=True
    )
    interpreter = export.tflite_interpreter(dest)
    assert interpreter.get_input_details()[0]["dtype"] == np.uint8
    big = tf.image.resize(demo["images"][:6], (72, 60)).numpy().round().astype(np.uint8)
    for images in (demo["images"][:6], big):
        outputs = export.tflite_predict(interpreter, images)
        resized = tf.image.resize(seeds_normalize(images), (SIZE, SIZE), method="bilinear").numpy()
        expected = model.predict(resized, verbose=0)
        expected = expected / np.linalg.norm(expected, axis=1, keepdims=True)
        np.testing.assert_allclose(np.linalg.norm(outputs, axis=1), 1.0, atol=1e-5)
        assert cosine(outputs, expected).min() >= 0.9999


def test_full_integer_with_preprocessing_takes_raw_pixels(model, demo, reference, tmp_path):
    dest = export.export_model(
        model, tmp_path / "q.tflite", quant="uint8", representative_data=demo["train_dir"], include_preprocessing=True
    )
    details = export.tflite_interpreter(dest).get_input_details()[0]
    assert details["dtype"] == np.uint8 and details["quantization"] == (0.0, 0)  # raw pixels, no rescaling needed
    assert cosine(export.tflite_predict(dest, demo["images"]), reference).min() >= 0.99


def test_saved_model_agrees_and_replaces_existing_folder(model, demo, reference, tmp_path):
    dest = tmp_path / "saved"
    dest.mkdir()
    (dest / "stale.txt").write_text("old export")
    export.export_model(model, dest, format="saved_model", l2_normalize=True)
    assert not (dest / "stale.txt").exists()
    assert_no_leftovers(tmp_path, keep=["saved"])
    loaded = tf.saved_model.load(str(dest))  # keep a reference: ``serve`` only weakly holds the variables
    outputs = loaded.serve(tf.constant(seeds_normalize(demo["images"]))).numpy()
    np.testing.assert_allclose(np.linalg.norm(outputs, axis=1), 1.0, atol=1e-5)
    assert cosine(outputs, reference).min() >= 0.9999


def test_onnx_agrees_with_keras(model, demo, reference, tmp_path):
    pytest.importorskip("tf2onnx")
    pytest.importorskip("onnxruntime")
    dest = export.export_model(model, tmp_path / "model.onnx", format="onnx")
    assert cosine(export.onnx_predict(dest, seeds_normalize(demo["images"])), reference).min() >= 0.9999
    pre = export.export_model(model, tmp_path / "pre.onnx", format="onnx", include_preprocessing=True)
    assert cosine(export.onnx_predict(pre, demo["images"]), reference).min() >= 0.9999
    assert_no_leftovers(tmp_path, keep=["model.onnx", "pre.onnx"])


class Betainc(keras.layers.Layer):
    """A layer whose op (regularized incomplete beta) neither TFLite builtins nor ONNX support."""

    def call(self, inputs):
        return tf.math.betainc(tf.ones_like(inputs), tf.ones_like(inputs) * 2.0, tf.sigmoid(inputs))


@pytest.fixture(scope="module")
def unsupported_model():
    inputs = keras.Input((8, 8, 3))
    nn = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    nn = Betainc(name="odd_layer")(nn)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(nn))


@pytest.mark.parametrize("format, name", [("tflite", "out.tflite"), ("onnx", "out.onnx")])
def test_unsupported_layer_gives_clear_error_and_keeps_old_file(unsupported_model, tmp_path, format, name):
    if format == "onnx":
        pytest.importorskip("tf2onnx")
    dest = tmp_path / name
    dest.write_bytes(b"previous export")
    with pytest.raises(export.ExportError, match=r"Betainc.*'odd_layer' \(Betainc\)"):
        export.export_model(unsupported_model, dest, format=format)
    assert dest.read_bytes() == b"previous export"
    assert_no_leftovers(tmp_path, keep=[name])


def test_missing_representative_data_fails_before_any_work(model, tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("conversion work started before the representative data was checked")

    monkeypatch.setattr(export.models, "load_model", no_work)
    monkeypatch.setattr(export, "build_deploy_model", no_work)
    with pytest.raises(FileNotFoundError, match="representative data not found: .*nowhere"):
        export.export_model(model, tmp_path / "q.tflite", quant="int8", representative_data=tmp_path / "nowhere")
    assert_no_leftovers(tmp_path)


def test_an_unwritable_or_wrong_kind_of_destination_fails_before_any_work(model, tmp_path, monkeypatch, capsys):
    def no_work(*args, **kwargs):
        raise AssertionError("conversion work started before the destination was checked")

    model_path = str(tmp_path / "basic.keras")
    model.save(model_path)
    monkeypatch.setattr(export.models, "load_basic_model", no_work)
    monkeypatch.setattr(export, "build_deploy_model", no_work)
    (tmp_path / "a_file").write_text("x")
    dest = str(tmp_path / "a_file" / "x.tflite")  # its folder would be a file: even root cannot write there
    folder = tmp_path / "exports"
    folder.mkdir()
    for argv, message in [
        (["-m", model_path, "-o", dest], f"cannot write {dest}: "),
        (["-m", model_path, "-o", str(folder)], f"{folder} is a folder: the output of tflite is a file (e.g. "),
        (["-m", model_path, "-f", "saved_model", "-o", model_path], f"{model_path} is a file: the output of"),
    ]:
        assert utils.run_main(export_cli.main, argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines
    assert os.listdir(folder) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"format": "pb"}, "format='pb' is not one of"),
        ({"quant": "int4"}, "quant='int4' is not one of"),
        ({"format": "onnx", "quant": "float16"}, "only supported for format='tflite'"),
        ({"quant": "int8"}, "needs representative_data"),
        ({"quant": "float16", "representative_data": "."}, "representative_data is only used"),
    ],
)
def test_bad_options_raise_value_error(model, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        export.export_model(model, tmp_path / "x.out", **kwargs)
    assert_no_leftovers(tmp_path)


def test_cli_exports_next_to_the_model_file(model, demo, tmp_path):
    model_path = tmp_path / "basic.keras"
    model.save(model_path)
    dest = export_cli.main(["-m", str(model_path), "-f", "tflite", "-q", "float16", "--l2", "--preprocess"])
    assert dest == str(tmp_path / "basic_float16_pre_l2.tflite")
    outputs = export.tflite_predict(dest, demo["images"][:4])
    expected = model.predict(seeds_normalize(demo["images"][:4]), verbose=0)
    np.testing.assert_allclose(np.linalg.norm(outputs, axis=1), 1.0, atol=1e-3)
    assert cosine(outputs, expected).min() >= 0.999
    with pytest.raises(FileNotFoundError, match="model not found"):
        export_cli.main(["-m", str(tmp_path / "missing.keras")])


def test_onnx_without_tf2onnx_says_what_to_install(model, tmp_path, monkeypatch):
    monkeypatch.setattr(export.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install tf2onnx onnx"):
        export.export_model(model, tmp_path / "m.onnx", format="onnx")
    assert_no_leftovers(tmp_path)


def test_quantize_and_dequantize_by_hand():
    details = {"quantization": (0.5, -3), "dtype": np.int8}
    # round(v / 0.5 - 3) clipped to int8: 1.0 -> -1, 1.24 -> round(-0.52) = -1, -100 -> -128, 100 -> 127
    np.testing.assert_array_equal(export.quantize_input(np.array([1.0, 1.24, -100, 100]), details), [-1, -1, -128, 127])
    np.testing.assert_allclose(export.dequantize_output(np.array([-1, 5], np.int8), details), [1.0, 4.0])
    raw = {"quantization": (0.0, 0), "dtype": np.uint8}  # built-in preprocessing: raw pixels pass through
    np.testing.assert_array_equal(export.quantize_input(np.array([0, 17, 255]), raw), [0, 17, 255])


@pytest.fixture(scope="module")
def vit_model(demo):
    """``vit_t``'s network at 48x48 (5x5 patches of 9 pixels, the last 3 pixels unused as 108 of 112 are), width 32,
    2 blocks of 4 heads, its masking and drop-path layers in the graph; the feature head calibrated on demo faces."""
    from keras_insightface.models import zoo as models

    keras.utils.set_random_seed(0)
    model = models.buildin_models("vit_t", input_shape=(SIZE, SIZE, 3), emb_shape=EMB, width=32, depth=2, num_heads=4)
    return export.calibrate_batch_norm(model, seeds_normalize(demo["images"]))


@pytest.mark.parametrize(
    "format, quant, name, min_cosine",
    [
        pytest.param("onnx", None, "vit.onnx", 0.9999, marks=pytest.mark.slow),  # several seconds of conversion
        pytest.param("tflite", "float16", "vit.tflite", 0.999, marks=pytest.mark.slow),
        ("saved_model", None, "vit", 0.9999),
    ],
)
def test_a_vit_exports_and_agrees_with_keras(vit_model, demo, tmp_path, format, quant, name, min_cosine):
    if format == "onnx":
        pytest.importorskip("tf2onnx")
        pytest.importorskip("onnxruntime")
    images = seeds_normalize(demo["images"])
    reference = vit_model.predict(images, verbose=0)
    dest = export.export_model(vit_model, tmp_path / name, format=format, quant=quant)
    if format == "onnx":
        outputs = export.onnx_predict(dest, images)
    elif format == "tflite":
        outputs = export.tflite_predict(dest, images)
    else:
        loaded = tf.saved_model.load(str(dest))  # keep a reference: ``serve`` only weakly holds the variables
        outputs = loaded.serve(tf.constant(images)).numpy()
    assert cosine(outputs, reference).min() >= min_cosine
    assert_no_leftovers(tmp_path, keep=[name])

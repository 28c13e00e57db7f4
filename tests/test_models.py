"""Tests for models.py and backbones/: every built-in name builds, heads and IResNet sizes match hand counts and
the published insightface figures, surgery helpers checked numerically, save / load round trips are exact."""

import os

import keras
import numpy as np
import pytest

from keras_insightface import utils
from keras_insightface.models import zoo as models
from keras_insightface.models.backbones import resnest

SMALL = (32, 32, 3)
IMAGES = np.random.default_rng(0).uniform(-1, 1, size=(2, 32, 32, 3)).astype("float32")


def _kernel_paths(model, suffixes):
    """Variables of ``model`` whose path ends with one of ``suffixes`` (an independent way to list weights)."""
    return [w for w in model.trainable_weights if w.path.split("/")[-1] in suffixes]


def _predict(model, images=IMAGES):
    return keras.ops.convert_to_numpy(model(images, training=False))


@pytest.fixture(scope="module")
def mobilenet_gdc():
    return models.buildin_models("MobileNet", emb_shape=16, input_shape=SMALL, output_layer="GDC")


def _tiny_stem(name="tiny"):
    """A small stem with every regularizable layer type: Conv2D (bias), BN, PReLU, DepthwiseConv2D (bias),
    SeparableConv2D (bias), a frozen BN and a ReLU."""
    inputs = keras.Input(SMALL)
    nn = keras.layers.Conv2D(8, 3, strides=2, name="c1")(inputs)
    nn = keras.layers.BatchNormalization(name="b1")(nn)
    nn = keras.layers.PReLU(shared_axes=[1, 2], name="p1")(nn)
    nn = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", name="d1")(nn)
    nn = keras.layers.SeparableConv2D(16, 3, padding="same", name="s1")(nn)
    frozen = keras.layers.BatchNormalization(name="frozen_bn")
    frozen.trainable = False
    nn = keras.layers.ReLU(name="r1_relu")(frozen(nn))
    return keras.Model(inputs, nn, name=name)


@pytest.fixture(scope="module")
def mfn_backbone():
    return models.backbone_from_name("mobilefacenet", input_shape=(64, 64, 3))


@pytest.fixture(scope="module")
def r18_model():
    return models.buildin_models("r18", emb_shape=16, input_shape=SMALL, output_layer="E")


def _check_embedding(model, images, emb_shape):
    out = model(images, training=False)
    assert model.layers[-1].name == "embedding"
    assert tuple(out.shape) == (len(images), emb_shape)
    assert out.dtype == "float32"
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(out)))


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in models.buildin_model_names() if not name.startswith("vit_")])
def test_every_buildin_name_builds(name):  # the ViTs: test_vit.py
    model = models.buildin_models(name, emb_shape=8, input_shape=SMALL, output_layer="GDC")
    _check_embedding(model, IMAGES, 8)


def test_print_buildin_models_lists_every_name(capsys):
    models.print_buildin_models()
    printed = capsys.readouterr().out
    for name in models.buildin_model_names():
        assert name in printed


@pytest.mark.parametrize(
    "name, canonical",
    [
        ("MobileNet", "mobilenet"),
        ("resnet34", "r34"),
        ("IResNet18", "r18"),
        ("SE_MobileFaceNet", "se_mobilefacenet"),
        ("ResNet101V2", "resnet101v2"),
        ("EfficientNetB4", "efficientnetb4"),
        ("ResNeSt101", "resnest101"),
        ("DenseNet121", "densenet121"),
    ],
)
def test_names_are_case_insensitive_and_aliased(name, canonical):
    resolved, builder = models.resolve_backbone_name(name)
    assert resolved == canonical
    if canonical in ("mobilenet", "resnet101v2", "densenet121"):
        assert builder is getattr(keras.applications, {"mobilenet": "MobileNet"}.get(canonical, name))


def _head_params(height, width, channels, emb, output_layer):
    """Hand count of head parameters on a (height, width, channels) feature map: BN = 4 * channels
    (gamma, beta, moving mean / var), no bias, final BN with scale = 4 * emb."""
    if output_layer == "E":
        return 4 * channels + height * width * channels * emb + 4 * emb
    if output_layer == "GDC":
        return height * width * channels + 4 * channels + channels * emb + 4 * emb
    if output_layer == "GAP":
        return 4 * channels + channels * emb + 4 * emb
    return height * width * channels * emb + 4 * emb  # F


@pytest.mark.parametrize("output_layer", ["E", "GDC", "GAP", "F"])
def test_head_parameter_counts(mfn_backbone, output_layer):
    _, height, width, channels = mfn_backbone.output.shape
    assert (height, width, channels) == (4, 4, 512)
    model = models.buildin_models(mfn_backbone, emb_shape=32, output_layer=output_layer.lower(), dropout=0.3)
    assert model.count_params() - mfn_backbone.count_params() == _head_params(height, width, channels, 32, output_layer)
    assert any(isinstance(layer, keras.layers.Dropout) for layer in model.layers)
    _check_embedding(model, np.zeros((1, 64, 64, 3), "float32"), 32)


def test_pointwise_conv_and_mxnet_options():
    stem = _tiny_stem()
    _, height, width, channels = stem.output.shape
    model = models.buildin_models(
        stem, emb_shape=32, output_layer="GDC", add_pointwise_conv=True, scale=False, bn_momentum=0.9, bn_epsilon=2e-5
    )
    # pointwise conv + BN + PReLU to 512; GDC on 512 channels; final BN without gamma = 3 * emb
    expected = channels * 512 + 4 * 512 + 512 + height * width * 512 + 4 * 512 + 512 * 32 + 3 * 32
    assert model.count_params() - stem.count_params() == expected
    batch_norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(batch_norms) == 5
    assert all((bn.momentum, bn.epsilon) == (0.9, 2e-5) for bn in batch_norms)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"stem_model": "no_such_net"}, ValueError),
        ({"stem_model": "r18", "output_layer": "X"}, ValueError),
        ({"stem_model": "r18", "emb_shape": 0}, ValueError),
        ({"stem_model": "MobileNet", "weights": "imagenet"}, ValueError),
        ({"stem_model": 3}, TypeError),
        ({"stem_model": "MobileNet", "input_shape": (16, 16, 3)}, ValueError),  # keras.applications minimum 32
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error):
    with pytest.raises(error):
        models.buildin_models(**{"input_shape": SMALL, **kwargs})


def test_embedding_is_float32_under_mixed_precision_policy():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = models.buildin_models("mobilefacenet", emb_shape=8, input_shape=SMALL)
    finally:
        keras.config.set_dtype_policy(previous)
    assert model.get_layer("pre_embedding").compute_dtype == "float16"
    assert model(IMAGES).dtype == "float32"


@pytest.mark.parametrize("name, published", [("r50", 43.6e6), ("r100", 65.2e6)])
def test_iresnet_parameter_counts_match_insightface(name, published):
    model = models.buildin_models(name, emb_shape=512, output_layer="E", input_shape=(112, 112, 3))
    _check_embedding(model, np.zeros((1, 112, 112, 3), "float32"), 512)
    assert abs(model.count_params() - published) / published < 0.01


@pytest.mark.parametrize("apply_to_batch_normal, apply_to_bias", [(False, False), (True, True)])
def test_l2_regularizer_loss_is_half_weight_decay_sum_of_squares(apply_to_batch_normal, apply_to_bias):
    model = models.buildin_models(_tiny_stem(), emb_shape=8, output_layer="E", use_bias=True)
    before = _predict(model)
    wd = 5e-4
    model = models.add_l2_regularizer_2_model(
        model, wd, apply_to_batch_normal=apply_to_batch_normal, apply_to_bias=apply_to_bias
    )
    suffixes = {"kernel", "depthwise_kernel", "pointwise_kernel"}
    suffixes |= {"gamma", "beta", "alpha"} if apply_to_batch_normal else set()
    suffixes |= {"bias"} if apply_to_bias else set()
    covered = _kernel_paths(model, suffixes)  # trainable only: the frozen BN is never covered
    assert len(covered) == {(False, False): 5, (True, True): 5 + 7 + 4}[(apply_to_batch_normal, apply_to_bias)]
    expected = wd / 2 * sum(np.sum(np.square(keras.ops.convert_to_numpy(w)), dtype="float64") for w in covered)
    assert len(model.losses) == len(covered)
    np.testing.assert_allclose(float(sum(keras.ops.convert_to_numpy(loss) for loss in model.losses)), expected, 1e-5)
    np.testing.assert_array_equal(_predict(model), before)
    assert models.get_l2_regularizer_value(model) == pytest.approx(wd / 2)
    with pytest.raises(ValueError):
        models.add_l2_regularizer_2_model(model, -1)


def test_l2_regularizer_survives_save_and_load(tmp_path):
    model = models.add_l2_regularizer_2_model(models.buildin_models(_tiny_stem(), emb_shape=8), 1e-3)
    path = str(tmp_path / "l2.keras")
    model.save(path)
    loaded = models.load_model(path)
    total = float(sum(keras.ops.convert_to_numpy(loss) for loss in loaded.losses))
    covered = _kernel_paths(model, {"kernel", "depthwise_kernel", "pointwise_kernel"})
    expected = 1e-3 / 2 * sum(np.sum(np.square(w.numpy())) for w in covered)
    np.testing.assert_allclose(total, expected, rtol=1e-5)


def test_replace_relu_with_prelu_keeps_other_weights(mobilenet_gdc):
    relu_names = [layer.name for layer in mobilenet_gdc.layers if isinstance(layer, keras.layers.ReLU)]
    converted = models.replace_ReLU_with_PReLU(mobilenet_gdc)
    prelus = [layer for layer in converted.layers if isinstance(layer, keras.layers.PReLU)]
    assert not any(isinstance(layer, keras.layers.ReLU) for layer in converted.layers)
    assert [layer.name for layer in prelus] == [name.replace("_relu", "_prelu") for name in relu_names]
    for prelu in prelus:
        np.testing.assert_array_equal(prelu.get_weights()[0], np.full(prelu.get_weights()[0].shape, 0.25))
    old_weights = {w.path: w.numpy() for w in mobilenet_gdc.weights}
    new_weights = {w.path: w.numpy() for w in converted.weights if "prelu" not in w.path}
    assert new_weights.keys() == old_weights.keys()
    for path, value in new_weights.items():
        np.testing.assert_array_equal(value, old_weights[path])


def test_prelu_option_matches_numpy_prelu():
    model = models.buildin_models(_tiny_stem(), emb_shape=8, use_prelu=True)
    probe = keras.Model(model.input, [model.get_layer("frozen_bn").output, model.get_layer("r1_prelu").output])
    before, after = (keras.ops.convert_to_numpy(t) for t in probe(IMAGES))
    assert before.min() < 0 < before.max()
    np.testing.assert_allclose(after, np.where(before > 0, before, 0.25 * before), rtol=1e-6)


def test_stochastic_depth_layer_drops_whole_residuals_per_sample():
    layer = models.StochasticDepth(0.5, seed=1)
    shortcut = np.ones((400, 3), "float32")
    residual = np.full((400, 3), 2.0, "float32")
    train_out = keras.ops.convert_to_numpy(layer([shortcut, residual], training=True))
    kept = np.all(train_out == 1 + 2 / 0.5, axis=1)
    dropped = np.all(train_out == 1, axis=1)
    assert np.all(kept | dropped)
    assert 0.4 < kept.mean() < 0.6
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer([shortcut, residual])), shortcut + residual)
    with pytest.raises(ValueError):
        models.StochasticDepth(0)


def test_add_and_remove_stochastic_depth(r18_model):
    before = _predict(r18_model)
    with_sd = models.add_stochastic_depth(r18_model, survivals=(1, 0.5))
    layers = [layer for layer in with_sd.layers if isinstance(layer, models.StochasticDepth)]
    assert len(layers) == 8  # r18: 2 + 2 + 2 + 2 residual blocks
    np.testing.assert_allclose([layer.survival_probability for layer in layers], np.linspace(1, 0.5, 8))
    first_inputs = [t._keras_history[0].name for t in layers[0]._inbound_nodes[0].input_tensors]
    assert first_inputs == ["stack1_block1_shortcut_bn", "stack1_block1_3_bn"]  # shortcut first
    np.testing.assert_array_equal(_predict(with_sd), before)
    restored = models.replace_stochastic_depth_with_add(with_sd)
    assert sum(isinstance(layer, keras.layers.Add) for layer in restored.layers) == 8
    np.testing.assert_array_equal(_predict(restored), before)
    with pytest.raises(ValueError):
        models.add_stochastic_depth(models.buildin_models("MobileNet", emb_shape=8, input_shape=SMALL))


@pytest.mark.parametrize("policy, compute_dtype", [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")])
def test_mixed_precision_conversion_round_trip(r18_model, policy, compute_dtype):
    before = _predict(r18_model)
    mixed = models.convert_to_mixed_float16(r18_model, policy=policy)
    assert mixed.get_layer("stack1_block1_1_conv").compute_dtype == compute_dtype
    assert all(w.dtype == "float32" for w in mixed.weights)
    assert mixed.get_layer("embedding").compute_dtype == "float32"
    out = _predict(mixed)
    assert out.dtype == np.float32
    tolerance = 0.05 if compute_dtype == "bfloat16" else 0.01
    assert np.abs(out - before).max() <= tolerance * np.abs(before).max()
    back = models.convert_mixed_float16_to_float32(mixed)
    assert back.get_layer("stack1_block1_1_conv").compute_dtype == "float32"
    np.testing.assert_array_equal(_predict(back), before)
    with pytest.raises(ValueError):
        models.convert_to_mixed_float16(r18_model, policy="float8")


def _split_attention_model():
    inputs = keras.Input((8, 8, 16))
    return keras.Model(inputs, resnest.split_attention_conv(inputs, 16, name="sa_"))


@pytest.mark.parametrize("extension", [".keras", ".h5"])
def test_save_load_round_trip_is_exact(tmp_path, r18_model, extension):
    for model in (models.add_stochastic_depth(r18_model, 0.8), _split_attention_model()):
        path = str(tmp_path / (model.name + extension))
        with utils.atomic_write(path) as tmp:
            model.save(tmp)
        loaded = models.load_model(path)
        assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
        images = np.random.default_rng(1).normal(size=(2,) + tuple(model.input.shape[1:])).astype("float32")
        np.testing.assert_array_equal(_predict(loaded, images), _predict(model, images))


def test_split_attention_layers_match_numpy():
    x = np.random.default_rng(2).normal(size=(2, 1, 1, 6)).astype("float32")
    summed = keras.ops.convert_to_numpy(resnest.SplitSum(2)(x))
    np.testing.assert_allclose(summed, x[..., :3] + x[..., 3:], rtol=1e-6)
    weights = keras.ops.convert_to_numpy(resnest.RSoftmax(2)(x))
    first, second = np.exp(x[..., :3]), np.exp(x[..., 3:])
    expected = np.concatenate([first / (first + second), second / (first + second)], axis=-1)
    np.testing.assert_allclose(weights, expected, rtol=1e-5)


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        models.load_model(str(tmp_path / "missing.keras"))
    bad = tmp_path / "weights.txt"
    bad.write_text("x")
    with pytest.raises(ValueError):
        models.load_model(str(bad))
    assert not os.path.exists(tmp_path / "missing.keras")

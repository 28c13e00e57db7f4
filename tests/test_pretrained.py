"""Pretrained models of other tools imported as the library's own networks: insightface ONNX graphs (PyTorch and
MXNet exports) against onnxruntime, arcface_torch checkpoints against a numpy forward pass of their state dict,
Keras_insightface .h5 files against a replica of the upstream network; refusals of what cannot be imported exactly;
the files used directly by evaluation, photo comparison and training. Small networks at 32x32; the full-size r50 is
in test_pretrained_full.py."""

import os
import pickle
import zipfile

import keras
import numpy as np
import onnxruntime
import pytest
from pretrained_files import (
    TINY_MBF,
    MbfSpec,
    assert_same_embeddings,
    calibrated,
    code_executing_pickle,
    iresnet_forward,
    iresnet_state_dict,
    keras_insightface_iresnet,
    keras_insightface_mobilefacenet,
    mbf_forward,
    mbf_state_dict,
    mxnet_iresnet_onnx,
    ours,
    probe_images,
    randomize_weights,
    torch_iresnet_onnx,
    torch_mbf_onnx,
    torch_style,
    write_code_executing_checkpoint,
    write_keras2_h5,
    write_torch_checkpoint,
)
from vit_files import TINY_VIT, VitSpec, calibrated_vit, torch_vit_onnx, vit_forward

from keras_insightface import utils
from keras_insightface.cli import evals as evals_cli
from keras_insightface.cli import pretrained as pretrained_cli
from keras_insightface.models import foreign as foreign_models
from keras_insightface.models import torch_checkpoint
from keras_insightface.models import zoo as models
from keras_insightface.models.backbones import blocks

SIZE = 32


def onnxruntime_embeddings(path, inputs):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"data": np.ascontiguousarray(inputs, dtype=np.float32)})[0]


def imported_embeddings(path, images):
    return models.load_model(str(path)).predict(ours(images), verbose=0)


@pytest.fixture(scope="module")
def images():
    return probe_images(SIZE)


@pytest.fixture(scope="module")
def iresnet_sd():
    """A small arcface_torch IResNet (blocks 1-2-1-1, widths 8-8-16-16, emb 16) with calibrated batch norms."""
    calibration = torch_style(probe_images(SIZE, seed=7))
    return calibrated(iresnet_state_dict(np.random.default_rng(0)), iresnet_forward, calibration)


@pytest.fixture(scope="module")
def iresnet_pth(iresnet_sd, tmp_path_factory):
    return str(
        write_torch_checkpoint(tmp_path_factory.mktemp("pth") / "backbone.pth", iresnet_sd, transposed=["fc.weight"])
    )


@pytest.fixture(scope="module")
def iresnet_onnx(iresnet_sd, tmp_path_factory):
    """Its torch.onnx.export graph; the stem's PReLU slope reaches the node through an ``Identity``, as the exporter
    writes a slope it shares between PReLUs."""
    import onnx

    model = torch_iresnet_onnx(iresnet_sd, SIZE)
    prelu = next(node for node in model.graph.node if node.op_type == "PRelu")
    model.graph.node.insert(0, onnx.helper.make_node("Identity", [prelu.input[1]], ["shared_slope"], name="Identity_0"))
    prelu.input[1] = "shared_slope"
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return str(path)


# ---------------------------------------------------------------------------------------------------------
# arcface_torch checkpoints
# ---------------------------------------------------------------------------------------------------------
def test_checkpoint_iresnet_matches_a_numpy_forward_pass(iresnet_sd, iresnet_pth, images):
    model = models.load_model(iresnet_pth)
    assert [layer.name for layer in model.layers[1:4]] == ["stem_conv", "stem_bn", "stem_prelu"]
    assert model.get_layer("stack2_block2_2_conv") and model.input_shape == (None, SIZE, SIZE, 3)
    reference = iresnet_forward(iresnet_sd, torch_style(images))
    assert_same_embeddings(model.predict(ours(images), verbose=0), reference)


@pytest.mark.parametrize("spec", [TINY_MBF, MbfSpec(first=("residual", 2))], ids=["grouped_stem", "residual_stem"])
def test_checkpoint_mobilefacenet_matches_a_numpy_forward_pass(spec, images, tmp_path):
    sd = calibrated(
        mbf_state_dict(np.random.default_rng(1), spec), mbf_forward, torch_style(probe_images(SIZE, 7)), spec=spec
    )
    path = write_torch_checkpoint(tmp_path / "mbf.pt", sd)
    reference = mbf_forward(sd, torch_style(images), spec)
    assert_same_embeddings(imported_embeddings(path, images), reference)


def test_registered_mbf_has_arcface_torch_s_parameter_count():
    """arcface_torch's ``MobileFaceNet(blocks=(1, 4, 6, 2), scale=2)`` counted by hand from its modules (conv weights,
    4 values per batch-norm channel, 1 per PReLU channel): what ``mbf`` must hold with a GDC head of 512."""

    def conv_block(cin, cout, kernel=1, groups=1, prelu=True):
        return cin // groups * cout * kernel * kernel + 4 * cout + (cout if prelu else 0)

    def depthwise(cin, hidden, cout):
        return conv_block(cin, hidden) + conv_block(hidden, hidden, 3, hidden) + conv_block(hidden, cout, prelu=False)

    count = conv_block(3, 128, 3) + conv_block(128, 128, 3, 64)
    count += depthwise(128, 128, 128) + 4 * depthwise(128, 128, 128)
    count += depthwise(128, 256, 256) + 6 * depthwise(256, 256, 256)
    count += depthwise(256, 512, 256) + 2 * depthwise(256, 256, 256)
    count += conv_block(256, 512) + conv_block(512, 512, 7, 512, prelu=False) + 512 * 512 + 4 * 512
    assert models.buildin_models("mbf", emb_shape=512, output_layer="GDC").count_params() == count == 2_083_328


def test_checkpoint_reader_follows_storages_strides_and_training_checkpoints(tmp_path):
    rng = np.random.default_rng(2)
    state = {
        "module.a.weight": rng.normal(size=(3, 5)).astype(np.float32),
        "module.b.half": rng.normal(size=(2, 2, 3)).astype(np.float16),
        "module.c.num_batches_tracked": np.array(7, np.int64),
    }
    path = write_torch_checkpoint(
        tmp_path / "ck.pth", state, archive="ck", transposed=["module.a.weight"], wrap="state_dict_backbone"
    )
    loaded = torch_checkpoint.load_state_dict(path)
    assert sorted(loaded) == ["a.weight", "b.half", "c.num_batches_tracked"]
    for key, value in state.items():
        np.testing.assert_array_equal(loaded[key.removeprefix("module.")], value)
        assert loaded[key.removeprefix("module.")].dtype == value.dtype


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path, capsys):
    marker, proof = tmp_path / "marker", tmp_path / "proof"
    path = tmp_path / "evil.pth"
    write_code_executing_checkpoint(path, marker)
    pickle.loads(code_executing_pickle(proof)).close()  # the payload runs under a plain unpickler
    assert proof.exists()
    with pytest.raises(ValueError, match=r"evil.pth: refusing to load 'builtins.open'"):
        models.load_model(str(path))
    assert utils.run_main(pretrained_cli.main, [str(path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not marker.exists()


def test_files_that_are_not_state_dict_checkpoints_are_refused_in_one_line(tmp_path):
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.rest")
    with pytest.raises(ValueError, match="legacy .*PyTorch < 1.6"):
        models.load_model(str(legacy))
    (tmp_path / "noise.pt").write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        models.load_model(str(tmp_path / "noise.pt"))
    with zipfile.ZipFile(tmp_path / "script.pt", "w") as zip_file:
        zip_file.writestr("script/constants.pkl", b"")
        zip_file.writestr("script/code/__torch__.py", b"")
    with pytest.raises(ValueError, match="TorchScript module"):
        models.load_model(str(tmp_path / "script.pt"))
    write_torch_checkpoint(tmp_path / "other.pth", {"encoder.weight": np.ones((2, 2), np.float32)})
    with pytest.raises(ValueError, match="not an arcface_torch IResNet, MobileFaceNet or ViT state dict"):
        models.load_model(str(tmp_path / "other.pth"))


def test_missing_extra_and_misshapen_weights_are_errors_naming_them(iresnet_sd, tmp_path):
    extra = write_torch_checkpoint(tmp_path / "extra.pth", {**iresnet_sd, "layer1.0.se.weight": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match="key 'layer1.0.se.weight' has no place in the network"):
        models.load_model(str(extra))
    missing = write_torch_checkpoint(
        tmp_path / "missing.pth", {k: v for k, v in iresnet_sd.items() if k != "layer2.1.prelu.weight"}
    )
    with pytest.raises(ValueError, match="key 'layer2.1.prelu.weight' is missing"):
        models.load_model(str(missing))
    wrong = dict(iresnet_sd, **{"layer1.0.conv1.weight": np.ones((8, 8, 1, 1), np.float32)})
    with pytest.raises(
        ValueError,
        match=r"layer 'stack1_block1_1_conv': weights of shapes \[\(1, 1, 8, 8\)\] in the file, the layer needs \[\(3, 3, 8, 8\)\]",
    ):
        models.load_model(str(write_torch_checkpoint(tmp_path / "wrong.pth", wrong)))


# ---------------------------------------------------------------------------------------------------------
# insightface ONNX graphs
# ---------------------------------------------------------------------------------------------------------
def test_pytorch_export_graph_matches_onnxruntime(iresnet_onnx, images):
    import onnx

    graph = onnx.load(iresnet_onnx).graph
    conv_biases = [node for node in graph.node if node.op_type == "Conv" and len(node.input) == 3]
    batch_norms = [node.input[1] for node in graph.node if node.op_type == "BatchNormalization"]
    assert len(conv_biases) == 1 + 2 * 5 + 4 and batch_norms[:2] == ["layer1.0.bn1.weight", "layer2.0.bn1.weight"]
    reference = onnxruntime_embeddings(iresnet_onnx, torch_style(images))
    assert_same_embeddings(imported_embeddings(iresnet_onnx, images), reference)


def test_mxnet_export_graph_with_its_normalization_inside_matches_onnxruntime(tmp_path, images):
    calibration = torch_style(probe_images(SIZE, 7))
    sd = calibrated(iresnet_state_dict(np.random.default_rng(3)), iresnet_forward, calibration, eps=2e-5)
    path = tmp_path / "arcface_r100_v1.onnx"
    path.write_bytes(mxnet_iresnet_onnx(sd, SIZE).SerializeToString())
    reference = onnxruntime_embeddings(path, images.transpose(0, 3, 1, 2))  # MXNet graphs take raw pixels
    assert_same_embeddings(imported_embeddings(path, images), reference)
    model = models.load_model(str(path))
    assert model.get_layer("stem_bn").epsilon == pytest.approx(2e-5) and model.get_layer(
        "pre_embedding"
    ).epsilon == pytest.approx(2e-5)


def test_mobilefacenet_export_graph_matches_onnxruntime(tmp_path, images):
    sd = calibrated(mbf_state_dict(np.random.default_rng(4)), mbf_forward, torch_style(probe_images(SIZE, 7)))
    path = tmp_path / "w600k_mbf.onnx"
    path.write_bytes(torch_mbf_onnx(sd).SerializeToString())
    reference = onnxruntime_embeddings(path, torch_style(images))
    assert_same_embeddings(imported_embeddings(path, images), reference)
    assert_same_embeddings(reference, mbf_forward(sd, torch_style(images)))  # the graph is the network


def _with_input_constants(model, subtract, multiply):
    """The MXNet graph with other ``_minusscalar0`` / ``_mulscalar0`` constants (per channel when 3 values)."""
    import onnx

    for initializer in model.graph.initializer:
        value = {"_minusscalar0_second": subtract, "_mulscalar0_second": multiply}.get(initializer.name)
        if value is not None:
            value = np.asarray(value, np.float32).reshape((3, 1, 1) if np.size(value) == 3 else ())
            initializer.CopyFrom(onnx.numpy_helper.from_array(value, initializer.name))
    return model


def test_input_normalization_folds_exactly_when_a_scale_and_is_refused_otherwise(iresnet_sd, tmp_path, images):
    per_channel = _with_input_constants(mxnet_iresnet_onnx(iresnet_sd, SIZE), 127.5, [1 / 58.4, 1 / 57.1, 1 / 57.4])
    path = tmp_path / "scaled.onnx"
    path.write_bytes(per_channel.SerializeToString())
    reference = onnxruntime_embeddings(path, images.transpose(0, 3, 1, 2))
    assert_same_embeddings(imported_embeddings(path, images), reference)
    shifted = _with_input_constants(mxnet_iresnet_onnx(iresnet_sd, SIZE), [123.7, 116.3, 103.5], 0.0078125)
    path = tmp_path / "shifted.onnx"
    path.write_bytes(shifted.SerializeToString())
    with pytest.raises(ValueError, match="shifted.onnx: the network normalizes its input .* cannot be folded exactly"):
        models.load_model(str(path))


def test_unsupported_graphs_stop_naming_the_op_and_the_node(iresnet_sd, tmp_path):
    import onnx

    model = torch_iresnet_onnx(iresnet_sd, SIZE)
    prelu = next(node for node in model.graph.node if node.op_type == "PRelu")
    prelu.op_type, prelu.input[:] = "Relu", prelu.input[:1]
    onnx.save(model, str(tmp_path / "relu.onnx"))
    with pytest.raises(ValueError, match=r"relu.onnx: unsupported op Relu at node '/prelu/PRelu'"):
        models.load_model(str(tmp_path / "relu.onnx"))
    model = torch_iresnet_onnx(iresnet_sd, SIZE)
    gemm = next(node for node in model.graph.node if node.op_type == "Gemm")
    next(a for a in gemm.attribute if a.name == "transB").i = 0
    for initializer in model.graph.initializer:
        if initializer.name == "fc.weight":
            initializer.CopyFrom(
                onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(initializer).T.copy(), "fc.weight")
            )
    onnx.save(model, str(tmp_path / "gemm.onnx"))  # an equivalent layout: imported
    assert models.load_model(str(tmp_path / "gemm.onnx")).output_shape == (None, 16)
    (tmp_path / "broken.onnx").write_bytes(b"not protobuf at all")
    with pytest.raises(ValueError, match="broken.onnx: not an ONNX model"):
        models.load_model(str(tmp_path / "broken.onnx"))


# ---------------------------------------------------------------------------------------------------------
# Keras_insightface .h5 releases
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation, head", [("PReLU", "E"), ("relu", "F")])
def test_keras_insightface_iresnet_h5_matches_the_upstream_network(activation, head, tmp_path, images):
    upstream = randomize_weights(keras_insightface_iresnet(activation=activation, head=head), np.random.default_rng(5))
    path = write_keras2_h5(tmp_path / "r18_upstream.h5", upstream)
    assert foreign_models.foreign_model_kind(path) == "keras2"
    model = models.load_model(str(path))
    assert model.get_layer("stem_prelu") and model.get_layer("stack1_block1_2_pad")  # PyTorch-style padding kept
    assert_same_embeddings(model.predict(ours(images), verbose=0), upstream.predict(ours(images), verbose=0))


@pytest.mark.parametrize("use_se, head", [(False, "GDC"), (True, "GAP")], ids=["GDC", "SE_GAP"])
def test_keras_insightface_mobilefacenet_h5_matches_the_upstream_network(use_se, head, tmp_path, images):
    upstream = randomize_weights(keras_insightface_mobilefacenet(use_se=use_se, head=head), np.random.default_rng(6))
    path = write_keras2_h5(tmp_path / "mobilefacenet_upstream.h5", upstream)
    model = models.load_model(str(path))
    assert model.get_layer("stem_sep_conv") and model.get_layer("pw_prelu")
    assert not model.get_layer("pre_embedding").scale
    assert any(layer.name.endswith("se_reduce") for layer in model.layers) == use_se
    assert_same_embeddings(model.predict(ours(images), verbose=0), upstream.predict(ours(images), verbose=0))


def test_the_library_s_own_h5_files_load_as_before(tmp_path):
    model = models.buildin_models("r18", emb_shape=8, input_shape=(SIZE, SIZE, 3), output_layer="E")
    model.save(tmp_path / "ours.h5")
    assert foreign_models.foreign_model_kind(tmp_path / "ours.h5") is None
    assert [layer.name for layer in models.load_model(str(tmp_path / "ours.h5")).layers] == [
        layer.name for layer in model.layers
    ]


# ---------------------------------------------------------------------------------------------------------
# The backbones' PyTorch-style padding
# ---------------------------------------------------------------------------------------------------------
def test_symmetric_padding_samples_as_pytorch_and_same_padding_does_not():
    from pretrained_files import conv2d

    rng = np.random.default_rng(8)
    x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
    reference = conv2d(x.transpose(0, 3, 1, 2), kernel.transpose(3, 2, 0, 1), stride=2).transpose(0, 2, 3, 1)
    results = {}
    for symmetric in (True, False):
        inputs = keras.Input((8, 8, 3))
        padded, padding = blocks.conv_padding(inputs, 3, 2, symmetric, name="x_")
        conv = keras.layers.Conv2D(4, 3, strides=2, padding=padding, use_bias=False)
        model = keras.Model(inputs, conv(padded))
        conv.set_weights([kernel])
        results[symmetric] = model.predict(x, verbose=0)
    np.testing.assert_allclose(results[True], reference, atol=1e-5)
    assert np.abs(results[False] - reference).max() > 0.1


# ---------------------------------------------------------------------------------------------------------
# Used directly wherever a model path is taken
# ---------------------------------------------------------------------------------------------------------
def test_evals_cli_evaluates_an_onnx_model_on_a_bin(iresnet_onnx, demo_small):
    from keras_insightface.data import pipeline as data
    from keras_insightface.evaluation import metrics

    result = evals_cli.main(["-m", iresnet_onnx, "-t", demo_small["bin_path"]])["demo_eval"]
    bins, issame = data.load_bin(demo_small["bin_path"])
    images = np.stack([data.decode_image(image, (SIZE, SIZE), is_path=False).numpy() for image in bins])
    reference = onnxruntime_embeddings(iresnet_onnx, torch_style(images))
    reference += onnxruntime_embeddings(iresnet_onnx, torch_style(images[:, :, ::-1]))
    expected = metrics.verification_metrics(metrics.l2_normalize(reference), issame)
    assert abs(result["accuracy"] - expected["accuracy"]) <= 1 / len(issame)


def test_photos_compared_with_an_imported_checkpoint(iresnet_sd, iresnet_pth, tmp_path):
    import skimage.data
    from PIL import Image

    photos = [str(tmp_path / "astronaut.png"), str(tmp_path / "astronaut_mirrored.jpg")]
    Image.fromarray(skimage.data.astronaut()).save(photos[0])
    Image.fromarray(skimage.data.astronaut()[:, ::-1]).save(photos[1], quality=90)
    result = evals_cli.main(["-m", iresnet_pth, "--compare", *photos, "--result_dir", str(tmp_path / "results")])[
        "compare"
    ]
    crops = np.stack(result["crops"]).astype(np.float32)
    assert crops.shape == (2, SIZE, SIZE, 3)
    embeddings = iresnet_forward(iresnet_sd, torch_style(crops)) + iresnet_forward(
        iresnet_sd, torch_style(crops[:, :, ::-1])
    )
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    np.testing.assert_allclose(result["similarity"], embeddings @ embeddings.T, atol=1e-5)


def test_fine_tuning_an_imported_checkpoint_trains_and_reloads(iresnet_pth, demo_small, tmp_path):
    from keras_insightface.nn import losses
    from keras_insightface.training import train

    keras.utils.set_random_seed(0)
    save_path = str(tmp_path / "finetuned.keras")
    tt = train.Train(
        demo_small["train_dir"], save_path, basic_model=iresnet_pth, batch_size=30, random_status=-1, verbose=0
    )
    imported = [weight.copy() for weight in tt.basic_model.get_weights()]
    history = tt.train([{"loss": losses.ArcfaceLoss(scale=16), "optimizer": "sgd", "epoch": 1}], 0)
    assert len(history["loss"]) == 1 and np.isfinite(history["loss"][0])
    assert any(not np.array_equal(a, b) for a, b in zip(imported, tt.basic_model.get_weights()))
    probe = ours(probe_images(SIZE)[:4])
    reloaded = models.extract_basic_model(models.load_model(save_path))
    np.testing.assert_allclose(reloaded.predict(probe, verbose=0), tt.basic_model.predict(probe, verbose=0), atol=1e-5)


def test_pretrained_argument_copies_weights_only_into_the_same_network(iresnet_sd, iresnet_pth, images):
    same_padding = models.buildin_models(
        resnet_like(symmetric_padding=False), output_layer="E", emb_shape=16, use_bias=True
    )
    with pytest.raises(ValueError, match="layer 'stack1_block1_2_pad' \\(padding\\) is only in the pretrained model"):
        models.load_weights(same_padding, iresnet_pth)
    target = models.buildin_models(resnet_like(symmetric_padding=True), output_layer="E", emb_shape=16, use_bias=True)
    models.load_weights(target, iresnet_pth)
    reference = iresnet_forward(iresnet_sd, torch_style(images))  # the checkpoint's network, in numpy
    assert_same_embeddings(target.predict(ours(images), verbose=0), reference)


def resnet_like(symmetric_padding):
    from keras_insightface.models.backbones import resnet

    return resnet.iresnet(None, (SIZE, SIZE, 3), False, "iresnet", (1, 2, 1, 1), (8, 8, 16, 16), symmetric_padding)


def test_command_line_converts_and_checks_against_onnxruntime(iresnet_onnx, tmp_path, capsys):
    dest = str(tmp_path / "converted.keras")
    assert pretrained_cli.main([iresnet_onnx, "-o", dest, "--check", "3"]) == 0
    printed = capsys.readouterr().out
    cosine = float(printed.split("min cosine ")[1].split(",")[0])
    assert cosine >= 0.99999 and "Saved: " + dest in printed
    images = probe_images(SIZE)[:3]
    saved = keras.saving.load_model(dest).predict(ours(images), verbose=0)
    assert_same_embeddings(saved, onnxruntime_embeddings(iresnet_onnx, torch_style(images)))
    checkpoint_dest = tmp_path / "from_checkpoint.keras"
    assert (
        utils.run_main(pretrained_cli.main, [iresnet_onnx[:-5] + ".pth", "-o", str(checkpoint_dest), "--check", "3"])
        == 2
    )
    assert "needs an .onnx source" in capsys.readouterr().err and not checkpoint_dest.exists()  # refused before work


# ---------------------------------------------------------------------------------------------------------
# arcface_torch vision transformers
# ---------------------------------------------------------------------------------------------------------
PTH_VIT = VitSpec(patch=8, heads=8)  # a state dict does not record the heads: arcface_torch's 8


@pytest.fixture(scope="module")
def vit_sd():
    """A small arcface_torch ViT (32x32 input in 5x5 patches of 6 pixels, width 16, 2 blocks of 2 heads)."""
    return calibrated_vit(np.random.default_rng(20), TINY_VIT, torch_style(probe_images(SIZE, seed=7)))


def test_vit_checkpoint_matches_a_numpy_forward_pass(images, tmp_path):
    sd = calibrated_vit(np.random.default_rng(21), PTH_VIT, torch_style(probe_images(SIZE, seed=7)))
    path = write_torch_checkpoint(tmp_path / "vit.pth", sd, transposed=["feature.0.weight"])
    model = models.load_model(str(path))
    assert model.input_shape == (None, SIZE, SIZE, 3) and model.get_layer("block2_attn").num_heads == 8
    np.testing.assert_array_equal(model.get_layer("mask_tokens").get_weights()[0], sd["mask_token"])
    assert_same_embeddings(model.predict(ours(images), verbose=0), vit_forward(sd, torch_style(images), PTH_VIT))


@pytest.mark.parametrize("opset, cast", [(11, False), (17, True)], ids=["opset11_decomposed", "opset17_folded"])
def test_vit_export_graphs_match_onnxruntime(vit_sd, opset, cast, images, tmp_path):
    """Opset 11: LayerNorm decomposed, reshape targets computed (any batch); opset 17: LayerNormalization nodes, the
    export's batch of 1 folded into the targets (run one image at a time), ``.float()`` as Cast nodes. The input is
    32x32, of which the 5x5 patches of 6 pixels read 30x30, as arcface_torch's 112 in patches of 9 reads 108."""
    path = tmp_path / f"vit_{opset}.onnx"
    path.write_bytes(torch_vit_onnx(vit_sd, TINY_VIT, opset, cast).SerializeToString())
    inputs = torch_style(images)
    reference = np.concatenate(
        [onnxruntime_embeddings(path, inputs[index : index + 1]) for index in range(len(inputs))]
    )
    assert_same_embeddings(reference, vit_forward(vit_sd, inputs))  # the graph is the network
    model = models.load_model(str(path))
    assert model.input_shape == (None, SIZE, SIZE, 3) and model.get_layer("block1_attn").num_heads == 2
    assert_same_embeddings(model.predict(ours(images), verbose=0), reference)


def test_vit_parts_that_do_not_map_are_refused_naming_them(vit_sd, tmp_path):
    import onnx

    with_bias = dict(vit_sd, **{"blocks.0.attn.qkv.bias": np.zeros(48, np.float32)})
    with pytest.raises(ValueError, match=r"layer 'block1_attn_qkv': weights of shapes \[\(16, 48\), \(48,\)\] in the"):
        models.load_model(str(write_torch_checkpoint(tmp_path / "bias.pth", with_bias)))
    model = torch_vit_onnx(vit_sd, TINY_VIT, 17)
    clip = next(node for node in model.graph.node if node.op_type == "Clip")
    clip.op_type, clip.input[:] = "Relu", clip.input[:1]
    onnx.save(model, str(tmp_path / "relu.onnx"))
    with pytest.raises(
        ValueError, match=r"relu.onnx: expected ReLU6 \(a Clip\) after '.*', found '/Clip_\d+' \(Relu\)"
    ):
        models.load_model(str(tmp_path / "relu.onnx"))
    model = torch_vit_onnx(vit_sd, TINY_VIT, 11)
    products = {node.output[0] for node in model.graph.node if node.op_type == "MatMul"}
    scale = next(node for node in model.graph.node if node.op_type == "Mul" and node.input[0] in products)
    scale.input[1] = next(node.output[0] for node in model.graph.node if node.op_type == "Constant")  # 2.0
    onnx.save(model, str(tmp_path / "scale.onnx"))
    with pytest.raises(ValueError, match=r"scale.onnx: blocks.0.attn: attention scale 2, not 0.353553"):
        models.load_model(str(tmp_path / "scale.onnx"))


def test_a_vit_checkpoint_fine_tunes_a_built_vit_and_converts_from_the_command_line(vit_sd, images, tmp_path, capsys):
    """``pretrained=``: the weights go into ``buildin_models("vit_t", ...)`` of the same size, masking and drop path
    on for fine-tuning and idle at inference; ``keras-insightface pretrained`` converts the ONNX export, checked."""
    path = str(write_torch_checkpoint(tmp_path / "vit.pth", vit_sd))
    built = models.buildin_models(
        "vit_t", input_shape=(SIZE, SIZE, 3), emb_shape=8, width=16, depth=2, num_heads=2, patch_size=6
    )
    models.load_weights(built, path)
    assert built.get_layer("patch_masking").mask_ratio == 0.1 and built.get_layer("pre_embedding").epsilon == 2e-5
    assert_same_embeddings(built.predict(ours(images), verbose=0), vit_forward(vit_sd, torch_style(images)))
    onnx_path = tmp_path / "vit.onnx"
    onnx_path.write_bytes(torch_vit_onnx(vit_sd).SerializeToString())
    assert pretrained_cli.main([str(onnx_path), "-o", str(tmp_path / "vit.keras"), "--check", "4"]) == 0
    assert float(capsys.readouterr().out.split("min cosine ")[1].split(",")[0]) >= 0.99999

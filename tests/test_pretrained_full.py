"""Full-size pretrained models: an insightface-style r50 ONNX graph (random weights, batch norms calibrated on images,
exported as torch.onnx.export does) and the same network as an arcface_torch checkpoint, imported at 112x112 and
both checked against onnxruntime (the small networks of test_pretrained.py are also checked against a numpy forward
pass); arcface_torch's ``vit_t`` as a checkpoint and an opset-11 export, against a numpy forward pass and
onnxruntime. Slow: built once per session (a 166 MB and a 77 MB graph)."""

import numpy as np
import onnxruntime
import pytest
from pretrained_files import (
    assert_same_embeddings,
    calibrated,
    iresnet_forward,
    iresnet_state_dict,
    ours,
    probe_images,
    torch_iresnet_onnx,
    torch_style,
    write_torch_checkpoint,
)
from vit_files import VitSpec, calibrated_vit, torch_vit_onnx, vit_forward

from keras_insightface.models import zoo as models

pytestmark = pytest.mark.slow

R50_BLOCKS, R50_WIDTHS, SIZE = (3, 4, 14, 3), (64, 128, 256, 512), 112


@pytest.fixture(scope="session")
def r50(tmp_path_factory):
    """The arcface_torch r50 state dict and its ONNX export (``w600k_r50.onnx`` layout)."""
    sd = iresnet_state_dict(np.random.default_rng(50), R50_BLOCKS, R50_WIDTHS, emb=512, side=7)
    sd = calibrated(sd, iresnet_forward, torch_style(probe_images(SIZE, seed=7)[::4]))
    path = tmp_path_factory.mktemp("r50") / "w600k_r50.onnx"
    path.write_bytes(torch_iresnet_onnx(sd, SIZE).SerializeToString())
    return sd, str(path)


def test_full_size_r50_onnx_and_checkpoint_match_their_references(r50, tmp_path):
    sd, onnx_path = r50
    images = probe_images(SIZE)
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    reference = session.run(None, {"data": torch_style(images).astype(np.float32)})[0]
    model = models.load_model(onnx_path)
    assert abs(model.count_params() - 43.6e6) / 43.6e6 < 0.01  # insightface's published r50 size
    assert_same_embeddings(model.predict(ours(images), batch_size=16, verbose=0), reference)
    pth_path = write_torch_checkpoint(tmp_path / "backbone.pth", sd)  # the same weights as arcface_torch saves them
    checkpoint_model = models.load_model(str(pth_path))
    assert_same_embeddings(checkpoint_model.predict(ours(images), batch_size=16, verbose=0), reference)


@pytest.fixture(scope="session")
def vit_t():
    """arcface_torch's ``vit_t`` (WebFace42M's ViT-T: 112x112 in 12x12 patches of 9 pixels, width 256, 12 blocks of 8
    heads, MLP 1024, 512-d embedding), random weights, its feature head calibrated on images."""
    spec = VitSpec(input=112, patch=9, width=256, depth=12, heads=8, hidden=1024, emb=512)
    return spec, calibrated_vit(np.random.default_rng(51), spec, torch_style(probe_images(SIZE, seed=7)[::4]))


def test_full_size_vit_t_checkpoint_and_onnx_match_their_references(vit_t, tmp_path):
    spec, sd = vit_t
    images = probe_images(SIZE)
    reference = vit_forward(sd, torch_style(images), spec)
    model = models.load_model(str(write_torch_checkpoint(tmp_path / "model.pt", sd)))
    assert model.count_params() == 19_139_328 and model.name == "vit_t"
    assert_same_embeddings(model.predict(ours(images), batch_size=16, verbose=0), reference)
    path = tmp_path / "vit_t.onnx"
    path.write_bytes(torch_vit_onnx(sd, spec, opset=11).SerializeToString())
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exported = session.run(None, {"data": torch_style(images).astype(np.float32)})[0]
    assert_same_embeddings(exported, reference)
    assert_same_embeddings(models.load_model(str(path)).predict(ours(images), batch_size=16, verbose=0), exported)

"""Full-size pretrained models: an insightface-style r50 ONNX graph (random weights, batch norms calibrated on images,
exported as torch.onnx.export does) and the same network as an arcface_torch checkpoint, imported at 112x112 and
both checked against onnxruntime (the small networks of test_pretrained.py are also checked against a numpy forward
pass). Slow: built once per session (a 166 MB graph)."""

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

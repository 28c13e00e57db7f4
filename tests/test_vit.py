"""arcface_torch's vision transformers as built-in backbones: each size's parameter count against a count made by hand
from arcface_torch's layout, every name's drop path and masking, the random patch masking and the attention against
numpy, saving and mixed precision, a demo-size training run that learns, and TensorFlow and JAX training steps that
agree. (Importing arcface_torch files: test_pretrained.py; exporting: test_export.py; the schedule:
test_schedules.py.)"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from vit_backend_job import CLASSES, tiny_vit, train_steps
from vit_files import attention

from keras_insightface.models import zoo as models
from keras_insightface.models.backbones import blocks, vit

HERE = os.path.dirname(os.path.abspath(__file__))

# arcface_torch ``backbones.get_model(name)``: (embed_dim, depth, drop_path_rate, mask_ratio) as configured there; all
# with img_size 112, patch_size 9, num_heads 8, mlp_ratio 4, no qkv bias, LayerNorm.
ARCFACE_TORCH_VITS = {
    "vit_t": (256, 12, 0.1, 0.1),
    "vit_t_dp005_mask0": (256, 12, 0.05, 0.0),
    "vit_s": (512, 12, 0.1, 0.1),
    "vit_s_dp005_mask_0": (512, 12, 0.05, 0.0),
    "vit_b": (512, 24, 0.1, 0.1),
    "vit_b_dp005_mask_005": (512, 24, 0.05, 0.05),
    "vit_l_dp005_mask_005": (768, 24, 0.05, 0.05),
}


def arcface_torch_parameters(width, depth, tokens=144, patch=9, mlp_ratio=4, emb=512):
    """``VisionTransformer``'s parameters and batch-norm statistics counted from its modules (``num_batches_tracked``
    left out): patch conv with bias, position embedding, mask token, per block two LayerNorms (weight, bias), qkv
    without bias, proj / fc1 / fc2 with bias; the final LayerNorm; the feature head Linear (no bias), BatchNorm1d (4
    values per channel), Linear (no bias), BatchNorm1d."""
    hidden = width * mlp_ratio
    block = 2 * 2 * width + 3 * width * width + (width * width + width) + (width * hidden + hidden)
    block += hidden * width + width
    feature = tokens * width * width + 4 * width + width * emb + 4 * emb
    return (3 * patch * patch * width + width) + tokens * width + width + depth * block + 2 * width + feature


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, count",
    [("vit_t", 19_139_328), ("vit_s", 76_025_344), ("vit_b", 113_835_520), ("vit_l_dp005_mask_005", 255_686_912)],
)
def test_each_vit_size_has_arcface_torch_s_parameter_count_and_runs(name, count):
    width, depth, _, _ = ARCFACE_TORCH_VITS[name]
    model = models.buildin_models(name)
    assert model.count_params() == arcface_torch_parameters(width, depth) == count
    assert model.get_layer("patch_embed").output.shape == (None, 12, 12, width)  # 112 // 9 patches a side
    images = np.random.default_rng(0).uniform(-1, 1, (2, 112, 112, 3)).astype("float32")
    embeddings = keras.ops.convert_to_numpy(model(images, training=False))
    assert embeddings.shape == (2, 512) and np.isfinite(embeddings).all() and model.layers[-1].name == "embedding"


def test_every_name_has_arcface_torch_s_layout_drop_path_and_masking():
    """The layouts are arcface_torch's; drop path rises linearly from 0 over the blocks to the name's rate; a mask
    ratio > 0 masks 10 %, as arcface_torch's forward does whatever ratio is configured."""
    assert set(vit.VIT_LAYOUTS) == set(ARCFACE_TORCH_VITS) and set(vit.VIT_LAYOUTS) <= set(models.BUILDIN_MODELS)
    for name, (width, depth, drop_path_rate, mask_ratio) in ARCFACE_TORCH_VITS.items():
        assert vit.VIT_LAYOUTS[name][:3] == (width, depth, drop_path_rate)
        model = models.buildin_models(name, input_shape=(32, 32, 3), emb_shape=8, width=16, depth=3)
        survivals = [
            layer.survival_probability if isinstance(layer, blocks.StochasticDepth) else 1.0
            for layer in model.layers
            if layer.name.endswith("_add")
        ]
        np.testing.assert_allclose(survivals, np.repeat(1 - np.linspace(0, drop_path_rate, 3), 2), rtol=1e-6)
        for layer in ("patch_masking", "mask_tokens"):
            assert model.get_layer(layer).mask_ratio == (0.1 if mask_ratio > 0 else 0.0)
        assert model.get_layer("VIT_batchnorm").epsilon == 2e-5 and model.get_layer("pre_embedding").momentum == 0.9


def _attention_reference(tokens, kernel, heads):
    """numpy multi-head attention of ``tokens`` with a qkv kernel (Keras layout) and no projection."""
    width = tokens.shape[-1]
    weights = {"a.qkv.weight": kernel.T, "a.proj.weight": np.eye(width), "a.proj.bias": np.zeros(width)}
    return attention(tokens[None].astype(np.float64), weights, "a", heads)[0]


def test_masking_drops_a_share_of_each_image_s_tokens_and_attention_sees_only_the_others():
    keras.utils.set_random_seed(3)
    length, width, heads = 20, 8, 2
    inputs = keras.Input((length, width))
    kept, restore = vit.PatchMasking(0.25, seed=5)(inputs)
    qkv = keras.layers.Dense(3 * width, use_bias=False, name="qkv")(kept)
    model = keras.Model(inputs, vit.MaskTokens(0.25, name="tokens")([vit.SelfAttention(heads)(qkv), restore]))
    x = np.random.default_rng(0).normal(size=(6, length, width)).astype("float32")
    kernel, token = model.get_layer("qkv").get_weights()[0], model.get_layer("tokens").get_weights()[0][0, 0]
    trained = keras.ops.convert_to_numpy(model(x, training=True))
    masked = np.all(trained == token, axis=-1)
    assert (masked.sum(axis=1) == length - int(length * 0.75)).all()  # 15 kept, 5 masked in every image
    assert len({tuple(row) for row in masked}) == len(x)  # drawn per image
    for index, mask in enumerate(masked):  # a kept token attends over the kept tokens only, in its own place
        expected = _attention_reference(x[index][~mask], kernel, heads)
        np.testing.assert_allclose(trained[index][~mask], expected, atol=2e-5)
    inferred = keras.ops.convert_to_numpy(model(x, training=False))  # every token, attending over all
    np.testing.assert_allclose(inferred[2], _attention_reference(x[2], kernel, heads), atol=2e-5)


def test_a_vit_saves_loads_and_converts_to_mixed_precision(tmp_path):
    keras.utils.set_random_seed(1)
    model = tiny_vit(mask_ratio=0.1, drop_path_rate=0.1)
    images = np.random.default_rng(1).uniform(-1, 1, (4, 32, 32, 3)).astype("float32")
    expected = model.predict(images, verbose=0)
    model.save(tmp_path / "vit.keras")
    loaded = models.load_model(str(tmp_path / "vit.keras"))
    np.testing.assert_allclose(loaded.predict(images, verbose=0), expected, atol=1e-6)
    assert loaded.get_layer("patch_masking").mask_ratio == 0.1
    half = models.convert_to_mixed_float16(model)
    assert half.get_layer("block1_attn").compute_dtype == "float16"
    found = half.predict(images, verbose=0)
    cosine = np.sum(found * expected, 1) / np.linalg.norm(found, axis=1) / np.linalg.norm(expected, axis=1)
    assert found.dtype == np.float32 and cosine.min() > 0.999


@pytest.mark.slow
def test_a_demo_size_vit_learns_with_train_as_arcface_torch_trains_it(demo_small, tmp_path):
    """AdamW with weight decay 0.1, warmup then the power-2 decay, two batches per update, gradient clipping at 5,
    CosFace margin 0.4, patch masking and drop path on: the loss falls and the accuracy leaves chance behind."""
    from keras_insightface.nn import losses
    from keras_insightface.training import train

    keras.utils.set_random_seed(0)
    tt = train.Train(
        demo_small["train_dir"],
        str(tmp_path / "vit.keras"),
        basic_model=tiny_vit(mask_ratio=0.1, drop_path_rate=0.1),
        batch_size=12,
        lr_base=2e-3,
        lr_decay_steps=7,
        lr_warmup_steps=1,
        lr_decay_power=2,
        gradient_accumulation_steps=2,
        gradient_clip_norm=5.0,
        random_status=0,
        verbose=0,
        plot_history=False,
    )
    optimizer = keras.optimizers.AdamW(2e-3, weight_decay=0.1, epsilon=1e-8)
    history = tt.train([{"loss": losses.CosFaceLoss(margin=0.4, scale=16), "optimizer": optimizer, "epoch": 8}], 0)
    assert np.isfinite(history["loss"]).all() and history["loss"][-1] < 0.7 * history["loss"][0]
    assert max(history["accuracy"]) > 4 / 12  # 12 classes: chance is 1/12
    assert history["lr"][0] == pytest.approx(2e-3) and history["lr"][-1] < 0.05 * history["lr"][0]  # warmup, decay


@pytest.mark.slow
def test_tensorflow_and_jax_training_steps_agree(tmp_path):
    """Three AdamW steps of a tiny ViT from the same weights on the same batch (masking and drop path off, so both
    are deterministic): the losses of TensorFlow's step runner and of JAX's agree; with masking and drop path on,
    JAX's jitted step trains too."""
    tensorflow_losses = train_steps(str(tmp_path))
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
    job = [sys.executable, os.path.join(HERE, "vit_backend_job.py"), str(tmp_path)]
    done = subprocess.run(job, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT")[-1])
    assert result["backend"] == "jax" and len(result["losses"]) == len(tensorflow_losses) == 3
    np.testing.assert_allclose(result["losses"], tensorflow_losses, rtol=2e-4)
    assert tensorflow_losses[2] < tensorflow_losses[0]  # the same batch again: the steps learned it
    assert np.isfinite(result["masked_losses"]).all() and CLASSES == 6

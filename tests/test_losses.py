"""Tests of losses.py: every loss against an independent numpy implementation of its published formula."""

import functools
import json
import math
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from helpers import (
    compiled,
    np_arcface,
    np_cross_entropy,
    np_log_softmax,
    np_softmax,
    np_with_target,
    on_tensorflow,
    value_and_gradients,
)

from keras_insightface.nn import losses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES, BATCH = 7, 10
LABELS = np.array([0, 3, 6, 2, 2, 5, 1, 4, 0, 3], dtype="int32")
TF_ONLY = "TensorFlow-only mechanism: "  # start of the skip reason of the tests of one


# ---------------------------------------------------------------------------------------------- numpy references
def np_arcface_t4_target(cos_y, margin):
    """MXNet loss-type 4: c cos m - sqrt(1 - c^2) sin m where c > cos(pi - m), else c - m sin(pi - m)."""
    plain = cos_y * np.cos(margin) - np.sqrt(np.maximum(1 - cos_y**2, 0)) * np.sin(margin)
    return np.where(cos_y > np.cos(np.pi - margin), plain, cos_y - margin * np.sin(np.pi - margin))


def random_cosines(seed, extra_columns=0):
    """Random cosines in [-1, 1] whose target column covers exactly +/-1, near +/-1 and values below the
    ArcFace threshold cos(pi - 0.5) = -0.8776."""
    rng = np.random.default_rng(seed)
    cosines = rng.uniform(-1, 1, size=(BATCH, NUM_CLASSES + extra_columns)).astype("float32")
    special = np.array([1.0, -1.0, 0.99999, -0.99999, -0.95, -0.9, 0.3, -0.5, 0.8, 0.0], dtype="float32")
    cosines[np.arange(BATCH), LABELS] = special
    return cosines


def keras_value(loss, labels, y_pred):
    return float(loss(labels, y_pred))


# ---------------------------------------------------------------------------------------------- NormDense
def test_norm_dense_matches_numpy_with_sub_centers_and_norm():
    rng = np.random.default_rng(1)
    inputs = rng.normal(size=(4, 6)).astype("float32")
    layer = losses.NormDense(3, loss_top_k=2, append_norm=True)
    output = np.asarray(layer(inputs))
    kernel = layer.kernel.numpy()
    assert kernel.shape == (6, 6)
    cos = (inputs / np.linalg.norm(inputs, axis=1, keepdims=True)) @ (kernel / np.linalg.norm(kernel, axis=0))
    expected = cos.reshape(4, 3, 2).max(axis=2)  # class-major columns: class c owns columns 2c, 2c + 1
    np.testing.assert_allclose(output[:, :3], expected, atol=1e-6)
    np.testing.assert_allclose(output[:, 3], -np.linalg.norm(inputs, axis=1), rtol=1e-6)
    cosines, norms = losses.split_norm_column(output)
    np.testing.assert_allclose(norms, np.linalg.norm(inputs, axis=1), rtol=1e-6)
    assert cosines.shape == (4, 3)


def test_norm_dense_float32_under_mixed_precision_and_config():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        layer = losses.NormDense(5, kernel_regularizer=keras.regularizers.L2(1e-3), loss_top_k=2)
        output = layer(np.ones((2, 4), dtype="float16"))
    finally:
        keras.config.set_dtype_policy(previous)
    assert keras.backend.standardize_dtype(output.dtype) == "float32" and layer.kernel.dtype == "float32"
    clone = losses.NormDense.from_config(layer.get_config())
    assert (clone.units, clone.loss_top_k, clone.append_norm) == (5, 2, False)
    assert clone.kernel_regularizer.get_config()["l2"] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="units"):
        losses.NormDense(0)


def test_model_with_head_and_loss_reloads_without_custom_objects(tmp_path):
    inputs = keras.Input((6,))
    model = keras.Model(inputs, losses.NormDense(NUM_CLASSES, loss_top_k=2, name="head")(inputs))
    model.compile(optimizer="sgd", loss=losses.ArcfaceLoss(margin2=0.4, scale=32.0, label_smoothing=0.1))
    path = str(tmp_path / "model.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    x = np.random.default_rng(2).normal(size=(3, 6)).astype("float32")
    np.testing.assert_allclose(reloaded(x), model(x), atol=1e-6)
    config = reloaded.loss.get_config()
    assert isinstance(reloaded.loss, losses.ArcfaceLoss)
    assert (config["margin2"], config["scale"], config["label_smoothing"]) == (0.4, 32.0, 0.1)


# ---------------------------------------------------------------------------------------------- margin losses
MARGIN_SETS = [(1.0, 0.0, 0.0), (1.5, 0.0, 0.0), (1.0, 0.0, 0.35), (1.0, 0.5, 0.0), (1.2, 0.4, 0.0), (0.9, 0.4, 0.15)]


@pytest.mark.parametrize("margins", MARGIN_SETS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_arcface_loss_matches_numpy(margins, label_smoothing):
    cosines = random_cosines(3)
    loss = losses.ArcfaceLoss(*margins, scale=64.0, label_smoothing=label_smoothing, reduction=None)
    expected = np_arcface(cosines, LABELS, *margins, 64.0, label_smoothing)
    np.testing.assert_allclose(loss(LABELS, cosines), expected, rtol=1e-5, atol=2e-3)


def test_threshold_branch_is_used_below_threshold():
    # c = -0.95 < cos(pi - 0.5): the plain formula would give cos(acos(-0.95) + 0.5) which increases again.
    loss = losses.ArcfaceLoss(scale=1.0, reduction=None)
    cosines = np.array([[-0.95, 0.0]], dtype="float32")
    plain_target = np.cos(np.arccos(-0.95) + 0.5)
    expected_target = -2.0 - plain_target
    np.testing.assert_allclose(loss([0], cosines), np_cross_entropy([0], np.array([[expected_target, 0.0]])), rtol=1e-5)
    assert expected_target < -0.95


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_arcface_simple_and_cosface_and_scale_softmax(label_smoothing):
    cosines = random_cosines(4)
    cos_y = cosines[np.arange(BATCH), LABELS].astype("float64")
    simple = losses.ArcfaceLossSimple(margin=0.45, scale=32.0, label_smoothing=label_smoothing, reduction=None)
    expected = np_cross_entropy(
        LABELS, np_with_target(cosines, LABELS, np_arcface_t4_target(cos_y, 0.45)) * 32, label_smoothing
    )
    np.testing.assert_allclose(simple(LABELS, cosines), expected, rtol=1e-5, atol=2e-3)
    assert losses.ArcfaceLossT4 is losses.ArcfaceLossSimple

    cosface = losses.CosFaceLoss(margin=0.3, scale=64.0, label_smoothing=label_smoothing, reduction=None)
    expected = np_cross_entropy(LABELS, np_with_target(cosines, LABELS, cos_y - 0.3) * 64, label_smoothing)
    np.testing.assert_allclose(cosface(LABELS, cosines), expected, rtol=1e-5, atol=2e-3)

    expected = np_cross_entropy(LABELS, cosines.astype("float64") * 64, label_smoothing)
    values = losses.scale_softmax(LABELS, cosines, label_smoothing=label_smoothing)
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=2e-3)


def np_adacos_step(cosines, labels, scale):
    """One AdaCos dynamic step (Zhang et al. 2019): returns (new scale, per-sample loss with it)."""
    onehot = np.eye(cosines.shape[-1], dtype=bool)[labels]
    b_avg = np.where(onehot, 0.0, np.exp(scale * cosines.astype("float64"))).sum(axis=1).mean()
    theta = np.sort(np.arccos(cosines[onehot].astype("float64")))
    theta_med = theta[(len(theta) - 1) // 2]  # torch.median: the lower of the two middle values
    new_scale = np.log(b_avg) / np.cos(min(np.pi / 4, theta_med))
    return new_scale, np_cross_entropy(labels, cosines * new_scale)


def test_adacos_fixed_and_dynamic_over_two_steps():
    cosines = random_cosines(5)
    fixed_scale = np.sqrt(2) * np.log(NUM_CLASSES - 1)
    fixed = losses.AdaCosLoss(is_dynamic=False, reduction=None)
    np.testing.assert_allclose(fixed(LABELS, cosines), np_cross_entropy(LABELS, cosines * fixed_scale), rtol=1e-5)

    dynamic = losses.AdaCosLoss(num_classes=NUM_CLASSES, reduction=None)
    scale = fixed_scale
    for step in range(2):
        batch = random_cosines(6 + step)
        scale, expected = np_adacos_step(batch, LABELS, scale)
        np.testing.assert_allclose(dynamic(LABELS, batch), expected, rtol=1e-4)
        np.testing.assert_allclose(dynamic.scale_variable.numpy(), scale, rtol=1e-5)


def np_curricular_step(cosines, labels, t, margin=0.5, scale=64.0, momentum=0.01):
    """One CurricularFace step (Huang et al. 2020, official code): returns (new t, per-sample loss)."""
    rows = np.arange(len(labels))
    cos = cosines.astype("float64").copy()
    cos_y = cos[rows, labels]
    cos_theta_m = cos_y * np.cos(margin) - np.sqrt(1 - cos_y**2) * np.sin(margin)
    final_target = np_arcface_t4_target(cos_y, margin)
    mask = cos > cos_theta_m[:, None]
    t = cos_y.mean() * momentum + (1 - momentum) * t
    cos[mask] = cos[mask] * (t + cos[mask])
    cos[rows, labels] = final_target
    return t, np_cross_entropy(labels, cos * scale)


def test_curricular_face_over_two_steps():
    loss = losses.CurricularFaceLoss(margin=0.5, scale=64.0, momentum=0.1, reduction=None)
    t = 0.0
    for step in range(2):
        cosines = random_cosines(8 + step)
        t, expected = np_curricular_step(cosines, LABELS, t, momentum=0.1)
        np.testing.assert_allclose(loss(LABELS, cosines), expected, rtol=1e-5, atol=2e-3)
        np.testing.assert_allclose(loss.hard_scale.numpy(), t, rtol=1e-5)


def with_norm_column(cosines, norms):
    return np.concatenate([cosines, -norms[:, None]], axis=1).astype("float32")


def test_magface_matches_numpy():
    rng = np.random.default_rng(10)
    cosines, norms = random_cosines(10), rng.uniform(5, 130, size=BATCH)
    l_a, u_a, l_m, u_m, lam = 10.0, 110.0, 0.45, 0.8, 35.0
    a = np.clip(norms, l_a, u_a)
    margin = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m
    cos_y = cosines[np.arange(BATCH), LABELS].astype("float64")
    logits = np_with_target(cosines, LABELS, np_arcface_t4_target(cos_y, margin)) * 64
    expected = np_cross_entropy(LABELS, logits, 0.1) + lam * (a / u_a**2 + 1 / a)
    loss = losses.MagFaceLoss(label_smoothing=0.1, reduction=None)
    np.testing.assert_allclose(loss(LABELS, with_norm_column(cosines, norms)), expected, rtol=1e-5, atol=2e-3)


def np_adaface_step(cosines, norms, labels, mean, std, m=0.4, h=0.333, s=64.0, t_alpha=0.01, eps=1e-3):
    """One AdaFace step (Kim et al. 2022, official head.py): returns (mean, std, per-sample loss)."""
    safe = np.clip(norms, 0.001, 100)
    mean = safe.mean() * t_alpha + (1 - t_alpha) * mean
    std = safe.std(ddof=1) * t_alpha + (1 - t_alpha) * std
    scaler = np.clip((safe - mean) / (std + eps) * h, -1, 1)
    cos_y = cosines[np.arange(len(labels)), labels].astype("float64")
    theta = np.clip(np.arccos(cos_y) - m * scaler, eps, np.pi - eps)
    target = np.cos(theta) - (m + m * scaler)
    return mean, std, np_cross_entropy(labels, np_with_target(cosines, labels, target) * s)


def test_adaface_over_two_steps():
    rng = np.random.default_rng(11)
    loss = losses.AdaFaceLoss(mean_std_alpha=0.5, reduction=None)
    mean, std = 20.0, 100.0
    for step in range(2):
        cosines, norms = random_cosines(12 + step), rng.uniform(5, 40, size=BATCH)
        mean, std, expected = np_adaface_step(cosines, norms, LABELS, mean, std, t_alpha=0.5)
        np.testing.assert_allclose(loss(LABELS, with_norm_column(cosines, norms)), expected, rtol=1e-5, atol=2e-3)
        np.testing.assert_allclose([loss.batch_mean.numpy(), loss.batch_std.numpy()], [mean, std], rtol=1e-5)


def adacos_reference(cosines, norms, state):
    """``(new state, per-sample loss)`` of a dynamic AdaCos step; a state of 0 means the fixed scale."""
    previous = state[0] if state[0] > 0 else np.sqrt(2) * np.log(NUM_CLASSES - 1)
    scale, loss = np_adacos_step(cosines, LABELS, previous)
    return [scale], loss


def curricular_reference(cosines, norms, state):
    t, loss = np_curricular_step(cosines, LABELS, state[0], momentum=0.1)
    return [t], loss


def adaface_reference(cosines, norms, state):
    mean, std, loss = np_adaface_step(cosines, norms, LABELS, *state, t_alpha=0.5)
    return [mean, std], loss


STATEFUL_LOSSES = {  # name: (factory, names of its state variables, numpy reference of one step)
    "AdaCos": (lambda: losses.AdaCosLoss(num_classes=NUM_CLASSES), ["scale_variable"], adacos_reference),
    "CurricularFace": (lambda: losses.CurricularFaceLoss(momentum=0.1), ["hard_scale"], curricular_reference),
    "AdaFace": (lambda: losses.AdaFaceLoss(mean_std_alpha=0.5), ["batch_mean", "batch_std"], adaface_reference),
}


@pytest.mark.parametrize("name", STATEFUL_LOSSES)
def test_stateful_losses_compiled_over_two_steps_match_numpy(name):
    """Compiled as a training step compiles them (TensorFlow: XLA; JAX: jit over a StatelessScope of the state)."""
    factory, state_names, reference = STATEFUL_LOSSES[name]
    loss = factory()
    assert losses.state_variables(loss) == [getattr(loss, state_name) for state_name in state_names]
    step = compiled(loss.call, losses.state_variables(loss))
    state = [float(variable.numpy()) for variable in losses.state_variables(loss)]
    rng = np.random.default_rng(19)
    for seed in (20, 21):
        cosines, norms = random_cosines(seed), rng.uniform(5, 40, size=BATCH)
        state, expected = reference(cosines, norms, state)
        y_pred = with_norm_column(cosines, norms) if loss.append_norm else cosines
        np.testing.assert_allclose(step(LABELS, y_pred), expected, rtol=1e-4, atol=2e-3)
        np.testing.assert_allclose([v.numpy() for v in losses.state_variables(loss)], state, rtol=1e-5)


def test_state_variables_are_empty_for_stateless_losses():
    for loss in (
        losses.ArcfaceLoss(),
        losses.AdaCosLoss(is_dynamic=False),
        losses.MagFaceLoss(),
        losses.BatchHardTripletLoss(),
        losses.as_loss(losses.distiller_loss_cosine),
        losses.scale_softmax,
        keras.losses.CategoricalCrossentropy(),
    ):
        assert losses.state_variables(loss) == []
    center = losses.CenterLoss(3, 2)
    assert losses.state_variables(center) == [center.centers] and not center.centers.trainable


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_margin_softmax_matches_numpy(label_smoothing):
    probs = np_softmax(random_cosines(14).astype("float64") * 3)
    p_y = probs[np.arange(BATCH), LABELS]
    replaced = np_with_target(probs, LABELS, (p_y**2 + 0.4 * p_y) / 2)
    replaced /= replaced.sum(axis=1, keepdims=True)  # Keras' cross entropy on probabilities renormalizes
    onehot = np.eye(NUM_CLASSES)[LABELS] * (1 - label_smoothing) + label_smoothing / NUM_CLASSES
    expected = -(onehot * np.log(replaced)).sum(axis=1)
    loss = losses.MarginSoftmax(label_smoothing=label_smoothing, reduction=None)
    np.testing.assert_allclose(loss(LABELS, probs.astype("float32")), expected, rtol=1e-5)
    if not label_smoothing:
        np.testing.assert_allclose(losses.margin_softmax(LABELS, probs.astype("float32")), expected, rtol=1e-5)


def margin_losses():
    """(loss factory, y_pred columns beyond the classes) for every classification loss."""
    return [
        (lambda: losses.ArcfaceLoss(label_smoothing=0.1), 0),
        (lambda: losses.ArcfaceLoss(1.2, 0.4, 0.0), 0),
        (lambda: losses.ArcfaceLossSimple(), 0),
        (lambda: losses.CosFaceLoss(label_smoothing=0.1), 0),
        (lambda: losses.AdaCosLoss(), 0),
        (lambda: losses.AdaCosLoss(is_dynamic=False, label_smoothing=0.1), 0),
        (lambda: losses.CurricularFaceLoss(), 0),
        (lambda: losses.MagFaceLoss(label_smoothing=0.1), 1),
        (lambda: losses.AdaFaceLoss(), 1),
        (lambda: losses.MarginSoftmax(), 0),
    ]


def loss_input(extra_columns, seed=15):
    if extra_columns:
        return with_norm_column(random_cosines(seed), np.linspace(5, 60, BATCH))
    return random_cosines(seed)


@pytest.mark.parametrize("factory, extra", margin_losses())
def test_sparse_column_and_one_hot_labels_agree(factory, extra):
    y_pred = loss_input(extra)
    if isinstance(factory(), losses.MarginSoftmax):
        y_pred = np_softmax(y_pred.astype("float64")).astype("float32")
    values = [factory()(labels, y_pred) for labels in (LABELS, LABELS[:, None], np.eye(NUM_CLASSES)[LABELS])]
    np.testing.assert_allclose(values[1], values[0], rtol=1e-6)
    np.testing.assert_allclose(values[2], values[0], rtol=1e-6)


@pytest.mark.parametrize("factory, extra", margin_losses())
def test_gradients_finite_at_unit_cosines_and_for_half_precision(factory, extra):
    for dtype in ("float32", "float16", "bfloat16"):
        y_pred = keras.ops.cast(loss_input(extra), dtype)
        value, (gradient,) = value_and_gradients(functools.partial(factory(), LABELS), y_pred)
        assert value.dtype == np.float32 and np.isfinite(value)
        assert np.all(np.isfinite(gradient.astype("float32"))), dtype


@pytest.mark.parametrize(
    "factory",
    [
        losses.ArcfaceLoss,
        losses.AdaCosLoss,
        lambda: losses.CenterLoss(NUM_CLASSES, NUM_CLASSES),
        losses.BatchAllTripletLossEuclidean,
    ],
)
def test_losses_compile_with_xla_and_give_eager_values(factory):
    y_pred = random_cosines(17)
    loss = factory()
    xla = compiled(loss, losses.state_variables(loss))  # no unique_with_counts or other dynamic-shape ops
    np.testing.assert_allclose(float(xla(LABELS, y_pred)), float(factory()(LABELS, y_pred)), rtol=1e-5)


def test_float16_input_gives_float32_value_close_to_float32():
    cosines = random_cosines(16)
    loss = losses.ArcfaceLoss(reduction=None)
    half = loss(LABELS, cosines.astype("float16"))
    full = np_arcface(cosines.astype("float16").astype("float32"), LABELS, 1.0, 0.5, 0.0, 64.0)
    assert keras.backend.standardize_dtype(half.dtype) == "float32"
    np.testing.assert_allclose(half, full, rtol=1e-5, atol=2e-3)


@pytest.mark.skipif(not on_tensorflow(), reason=TF_ONLY + "label range asserts (tf.debugging); JAX has no value checks")
def test_out_of_range_sparse_labels_raise_on_tensorflow():
    import tensorflow as tf

    with pytest.raises(tf.errors.InvalidArgumentError, match="sparse labels must be in \\[0, 7\\)"):
        losses.ArcfaceLoss()(np.array([1, 7]), np.zeros((2, 7), "float32"))
    with pytest.raises(tf.errors.InvalidArgumentError, match="sparse labels must be in \\[0, 3\\)"):
        losses.CenterLoss(3, 2)(np.array([-1, 0]), np.zeros((2, 2), "float32"))


def test_bad_labels_and_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="one-hot labels have 5 columns"):
        losses.ArcfaceLoss()(np.eye(5)[[0, 1]], np.zeros((2, 7), "float32"))
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.ArcfaceLoss(label_smoothing=1.5)
    with pytest.raises(ValueError, match="num_classes >= 3"):
        losses.AdaCosLoss(num_classes=2)
    with pytest.raises(ValueError, match="fallback"):
        losses.margin_target(np.array([0.5], "float32"), fallback="nope")
    with pytest.raises(ValueError, match="3 equal thirds"):
        losses.OfflineTripletLoss()(np.zeros(4), np.ones((4, 3), "float32"))


# ---------------------------------------------------------------------------------------------- serialization / types
ALL_LOSSES = [
    losses.ArcfaceLoss(0.9, 0.4, 0.15, scale=32.0),
    losses.ArcfaceLossSimple(0.4),
    losses.CosFaceLoss(0.3),
    losses.AdaCosLoss(num_classes=100, is_dynamic=False),
    losses.CurricularFaceLoss(momentum=0.02),
    losses.MagFaceLoss(max_margin=0.7),
    losses.AdaFaceLoss(margin=0.3),
    losses.MarginSoftmax(power=3.0),
    losses.CenterLoss(4, 3, alpha=0.3),
    losses.BatchHardTripletLoss(0.3),
    losses.BatchAllTripletLoss(0.3),
    losses.BatchHardTripletLossEuclidean(0.3),
    losses.BatchAllTripletLossEuclidean(0.3),
    losses.OfflineTripletLoss(0.3),
    losses.DistillKLDivergenceLoss(5.0),
]


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=lambda loss: type(loss).__name__)
def test_losses_serialize_and_reload_with_same_config(loss):
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert type(clone) is type(loss)
    assert clone.get_config() == loss.get_config()


def test_functions_serialize_and_head_types():
    for fn in (
        losses.scale_softmax,
        losses.margin_softmax,
        losses.distiller_loss_cosine,
        losses.distiller_loss_euclidean,
    ):
        assert keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(fn)) is fn
    expected = {
        losses.ArcfaceLoss(): "arcface",
        losses.MagFaceLoss(): "arcface",
        losses.AdaCosLoss(): "arcface",
        losses.MarginSoftmax(): "softmax",
        losses.CenterLoss(2, 2): "center",
        losses.BatchHardTripletLoss(): "triplet",
        losses.OfflineTripletLoss(): "triplet",
        losses.DistillKLDivergenceLoss(): "distill",
        keras.losses.CategoricalCrossentropy(): "softmax",
    }
    for loss, head in expected.items():
        assert losses.get_head_type(loss) == head
    assert losses.get_head_type(losses.scale_softmax) == "arcface"
    assert losses.MagFaceLoss.append_norm and losses.AdaFaceLoss.append_norm and not losses.ArcfaceLoss.append_norm
    assert losses.get_head_type(losses.distiller_loss_cosine) == "distill"


def test_as_loss_wraps_functions_with_reduction_weights_and_serialization():
    cosines = random_cosines(18)
    per_sample = np_cross_entropy(LABELS, cosines.astype("float64") * 64)
    wrapped = losses.as_loss(losses.scale_softmax)
    assert losses.as_loss(wrapped) is wrapped and losses.get_head_type(wrapped) == "arcface"
    assert float(wrapped(LABELS, cosines)) == pytest.approx(per_sample.mean(), rel=1e-5)
    weights = np.linspace(0, 1, BATCH).astype("float32")
    assert float(wrapped(LABELS, cosines, sample_weight=weights)) == pytest.approx(
        (per_sample * weights).mean(), rel=1e-5
    )
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(wrapped))
    assert clone.fn is losses.scale_softmax and clone.head_type == "arcface"
    distill = losses.as_loss(losses.distiller_loss_cosine)
    assert losses.get_head_type(distill) == "distill"
    with pytest.raises(ValueError, match="callable"):
        losses.FunctionLoss(3)


# ---------------------------------------------------------------------------------------------- center loss
def np_center_steps(centers, batches, alpha):
    """Wen et al. 2016 update, per sample, accumulated: c_y -= alpha * sum_i (c_y - e_i) / (1 + n_y)."""
    centers = centers.astype("float64").copy()
    step_losses = []
    for labels, embeddings in batches:
        step_losses.append((np.square(embeddings - centers[labels]).sum(axis=1) / 2).mean())
        delta = np.zeros_like(centers)
        for cls in np.unique(labels):
            rows = labels == cls
            delta[cls] = alpha * (centers[cls] - embeddings[rows]).sum(axis=0) / (1 + rows.sum())
        centers -= delta
    return centers, step_losses


def center_batches(seed, steps=3, batch=8, num_classes=5, emb=4):
    rng = np.random.default_rng(seed)
    return [
        (rng.integers(0, num_classes, batch).astype("int32"), rng.normal(size=(batch, emb)).astype("float32"))
        for _ in range(steps)
    ]


def test_center_loss_steps_match_numpy_and_centers_survive_reload(tmp_path):
    batches = center_batches(20)
    loss = losses.CenterLoss(num_classes=5, emb_shape=4, alpha=0.5)
    step = compiled(loss, losses.state_variables(loss), jit_compile=False)
    values = [
        float(step(np.eye(5, dtype="float32")[labels] if i == 1 else labels, emb))
        for i, (labels, emb) in enumerate(batches)
    ]
    expected_centers, expected_losses = np_center_steps(np.zeros((5, 4)), batches, 0.5)
    np.testing.assert_allclose(values, expected_losses, rtol=1e-5)
    np.testing.assert_allclose(loss.centers.numpy(), expected_centers, rtol=1e-5, atol=1e-6)

    path = tmp_path / "stem_centers.npy"
    loss.save_centers(path)
    assert sorted(os.listdir(tmp_path)) == ["stem_centers.npy"]  # atomic write left no temporary file
    reloaded = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(losses.CenterLoss(5, 4, alpha=0.5, initial_file=str(path)))
    )
    np.testing.assert_array_equal(reloaded.centers.numpy(), loss.centers.numpy())
    with pytest.raises(ValueError, match="expected \\(6, 4\\)"):
        losses.CenterLoss(6, 4, initial_file=str(path))


def test_center_loss_gradient_only_through_embeddings():
    loss = losses.CenterLoss(num_classes=3, emb_shape=2, alpha=0.5)
    embeddings = np.array([[1.0, 2.0], [3.0, -1.0]], dtype="float32")
    _, (gradient,) = value_and_gradients(functools.partial(loss, np.array([0, 2])), embeddings)
    # d/de mean(sum((e - c)^2) / 2) = (e - c) / B with the centers read before the update (zeros).
    np.testing.assert_allclose(gradient, embeddings / 2, rtol=1e-6)


JAX_STEP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, keras
    from keras_insightface.nn import losses
    loss = losses.CenterLoss(num_classes=5, emb_shape=4, alpha=0.5)

    @jax.jit
    def step(labels, embeddings, centers):
        with keras.StatelessScope(state_mapping=[(loss.centers, centers)]) as scope:
            value = loss(labels, embeddings)
        return value, scope.get_current_value(loss.centers)

    centers, values = loss.centers.value, []
    for labels, embeddings in json.loads(sys.stdin.read()):
        value, centers = step(jax.numpy.asarray(labels, "int32"), jax.numpy.asarray(embeddings), centers)
        values.append(float(value))
    out = {"values": values, "centers": centers.tolist(), "variable": loss.centers.numpy().tolist()}
    print("RESULT" + json.dumps(out))
    """
)


@pytest.mark.slow
def test_center_loss_in_a_stateless_scope_under_jax_jit_matches_numpy():
    """What a JAX training step does: the centers' value goes in, the loss and the assigned centers come out. Run in
    a JAX process whatever the suite's backend, so it runs (and is never skipped) in the one test command."""
    batches = center_batches(23)
    env = dict(os.environ, PYTHONPATH=REPO, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    payload = json.dumps([[labels.tolist(), embeddings.tolist()] for labels, embeddings in batches])
    command = [sys.executable, "-c", JAX_STEP_SCRIPT]
    proc = subprocess.run(command, input=payload, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT")[-1])
    expected_centers, expected_losses = np_center_steps(np.zeros((5, 4)), batches, 0.5)
    np.testing.assert_allclose(result["values"], expected_losses, rtol=1e-5)
    np.testing.assert_allclose(result["centers"], expected_centers, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result["variable"], np.zeros((5, 4)))  # the variable itself is untouched


DISTRIBUTED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from keras_insightface.nn import losses
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    batches = json.loads(sys.stdin.read())
    with strategy.scope():
        center = losses.CenterLoss(5, 4, alpha=0.5)
        curricular = losses.CurricularFaceLoss(momentum=0.5)

    @tf.function
    def step(labels, embeddings, cosines):
        def replica_fn(labels, embeddings, cosines):
            return center(labels, embeddings), curricular(labels, cosines)
        return strategy.run(replica_fn, args=(labels, embeddings, cosines))

    def split(values, dtype):
        halves = np.split(np.array(values, dtype), 2)
        return strategy.experimental_distribute_values_from_function(lambda ctx: halves[ctx.replica_id_in_sync_group])

    out = {"losses": []}
    for labels, embeddings, cosines in batches:
        center_loss, _ = step(split(labels, "int32"), split(embeddings, "float32"), split(cosines, "float32"))
        out["losses"].append([float(v) for v in strategy.experimental_local_results(center_loss)])
    out["centers"] = [v.numpy().tolist() for v in center.centers.value.values]
    out["hard_scale"] = [float(v.numpy()) for v in curricular.hard_scale.value.values]
    print("RESULT" + json.dumps(out))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not on_tensorflow(), reason=TF_ONLY + "tf.distribute.MirroredStrategy replicas")
def test_center_loss_under_mirrored_strategy_matches_global_numpy_update():
    batches = center_batches(21)
    rng = np.random.default_rng(22)
    cosines = [rng.uniform(-1, 1, size=(8, 5)).astype("float32") for _ in batches]
    payload = [[labels.tolist(), emb.tolist(), cos.tolist()] for (labels, emb), cos in zip(batches, cosines)]
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-c", DISTRIBUTED_SCRIPT],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT")[-1])
    expected_centers, _ = np_center_steps(np.zeros((5, 4)), batches, 0.5)
    assert len(result["centers"]) == 2  # two replicas, identical copies equal to the global-batch update
    for replica_centers in result["centers"]:
        np.testing.assert_allclose(replica_centers, expected_centers, rtol=1e-5, atol=1e-6)
    # Each replica's loss is over its half of the batch with the pre-update centers. Keras 3's default reduction
    # already divides by the number of replicas inside a strategy (keras.src.losses.loss.scale_loss_for_distribution).
    centers = np.zeros((5, 4))
    for (labels, emb), replica_losses in zip(batches, result["losses"]):
        per_sample = np.square(emb - centers[labels]).sum(axis=1) / 2
        np.testing.assert_allclose(replica_losses, [per_sample[:4].mean() / 2, per_sample[4:].mean() / 2], rtol=1e-5)
        centers, _ = np_center_steps(centers, [(labels, emb)], 0.5)
    t = 0.0
    for (labels, _), cos in zip(batches, cosines):
        t = 0.5 * cos[np.arange(8), labels].mean() + 0.5 * t
    np.testing.assert_allclose(result["hard_scale"], [t, t], rtol=1e-5)


# ---------------------------------------------------------------------------------------------- triplet losses
EXAMPLE_LABELS = np.array([0, 0, 2, 1, 1, 2])
EXAMPLE_SIMILARITIES = np.array(
    [
        [1, 0.9, 0.8, 0.7, 0.2, 0.1],
        [0.9, 1, 0.7, 0.5, 0.6, 0.3],
        [0.1, 0.2, 1, 0.2, 0.2, 0.8],
        [0.6, 0.9, 0.3, 1, 0.6, 0.2],
        [0.4, 0.5, 0.6, 0.2, 1, 0.2],
        [0.5, 0.4, 0.2, 0.3, 0.2, 1],
    ]
)


def test_batch_hard_on_a_worked_example_matches_hand_computation():
    # Per anchor: max_neg s - min_pos s + 0.35, clipped at 0:
    # 0.8-0.9, 0.7-0.9, 0.2-0.8, 0.9-0.6, 0.6-0.2, 0.5-0.2 (+0.35) -> 0.25, 0.15, 0, 0.65, 0.75, 0.65
    values = losses.batch_hard_from_distances(EXAMPLE_LABELS, 1 - EXAMPLE_SIMILARITIES, 0.35)
    np.testing.assert_allclose(values, [0.25, 0.15, 0.0, 0.65, 0.75, 0.65], atol=1e-6)
    assert float(np.mean(values)) == pytest.approx(2.45 / 6, abs=1e-6)


def test_batch_all_on_a_worked_example_matches_hand_computation():
    # Per anchor: mean over positives of (1 - s), plus the sum of s over negatives with min_pos s - s < 0.35,
    # divided by (their count + 1). Row 0: 0.1/2 + (0.8 + 0.7)/3; row 3: 0.4/2 + (0.6 + 0.9 + 0.3)/4 ...
    expected = [0.05 + 1.5 / 3, 0.05 + 1.3 / 3, 0.1 + 0.0, 0.2 + 1.8 / 4, 0.4 + 1.7 / 5, 0.4 + 1.4 / 5]
    values = losses.batch_all_from_distances(EXAMPLE_LABELS, 1 - EXAMPLE_SIMILARITIES, 0.35)
    np.testing.assert_allclose(values, expected, atol=1e-6)
    assert float(np.mean(values)) == pytest.approx(3.2033333 / 6, abs=1e-6)


def np_normalize(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def np_batch_hard(labels, dists, alpha):
    out = []
    for i in range(len(labels)):
        pos, neg = labels == labels[i], labels != labels[i]
        out.append(max(dists[i][pos].max() - dists[i][neg].min() + alpha, 0))
    return np.array(out)


def np_batch_all_hermans(labels, dists, alpha):
    values = []
    for a in range(len(labels)):
        for p in range(len(labels)):
            for n in range(len(labels)):
                if a != p and labels[a] == labels[p] and labels[a] != labels[n]:
                    values.append(max(dists[a, p] - dists[a, n] + alpha, 0))
    values = np.array(values)
    return values.sum() / max((values > 0).sum(), 1)


def test_triplet_losses_on_embeddings_match_numpy():
    rng = np.random.default_rng(30)
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 3])
    embeddings = rng.normal(size=(8, 5)).astype("float32")
    normed = np_normalize(embeddings.astype("float64"))
    cos_dists = 1 - normed @ normed.T
    euclid = np.sqrt(np.maximum(((normed[:, None] - normed[None]) ** 2).sum(-1), 0))
    alpha = 0.3
    checks = [
        (losses.BatchHardTripletLoss(alpha), np_batch_hard(labels, cos_dists, alpha).mean()),
        (losses.BatchHardTripletLossEuclidean(alpha), np_batch_hard(labels, euclid, alpha).mean()),
        (losses.BatchAllTripletLossEuclidean(alpha), np_batch_all_hermans(labels, euclid, alpha)),
    ]
    for loss, expected in checks:
        assert float(loss(labels, embeddings)) == pytest.approx(expected, rel=1e-5), type(loss).__name__
        assert float(loss(np.eye(4)[labels], embeddings.astype("float16"))) == pytest.approx(expected, rel=1e-2)
    # BatchAll on embeddings: Keras_insightface's formula written out directly on similarities.
    sims, expected = normed @ normed.T, []
    for i in range(8):
        pos = labels == labels[i]
        valid = ~pos & (sims[i][pos].min() - sims[i] < alpha)
        expected.append((1 - sims[i][pos]).sum() / pos.sum() + sims[i][valid].sum() / (valid.sum() + 1))
    assert float(losses.BatchAllTripletLoss(alpha)(labels, embeddings)) == pytest.approx(np.mean(expected), rel=1e-5)


def test_triplet_gradients_finite_with_duplicate_embeddings():
    embeddings = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype="float32")
    for loss in (
        losses.BatchHardTripletLossEuclidean(),
        losses.BatchAllTripletLossEuclidean(),
        losses.BatchHardTripletLoss(),
    ):
        _, (gradient,) = value_and_gradients(functools.partial(loss, np.array([0, 0, 1, 1])), embeddings)
        assert np.all(np.isfinite(gradient))


def test_offline_triplet_loss_matches_numpy():
    rng = np.random.default_rng(31)
    anchor, positive, negative = (np_normalize(rng.normal(size=(4, 6))) for _ in range(3))
    expected = np.maximum((anchor * negative).sum(1) - (anchor * positive).sum(1) + 0.35, 0)
    embeddings = np.concatenate([anchor * 3, positive, negative * 0.5]).astype("float32")
    np.testing.assert_allclose(losses.OfflineTripletLoss(reduction=None)(np.zeros(12), embeddings), expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------- distillation
def test_distillation_losses_match_numpy():
    rng = np.random.default_rng(40)
    teacher, student = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    cosine = 1 - (np_normalize(teacher) * np_normalize(student)).sum(1)
    np.testing.assert_allclose(losses.distiller_loss_cosine(teacher.astype("float16"), student), cosine, atol=2e-3)
    np.testing.assert_allclose(losses.distiller_loss_cosine(teacher, student), cosine, atol=1e-6)
    euclidean = ((np_normalize(teacher) - np_normalize(student)) ** 2).sum(1)
    np.testing.assert_allclose(losses.distiller_loss_euclidean(teacher, student), euclidean, atol=1e-6)

    temperature = 4.0
    p_teacher = np.exp(np_log_softmax(teacher / temperature))
    kl = (p_teacher * (np_log_softmax(teacher / temperature) - np_log_softmax(student / temperature))).sum(1)
    loss = losses.DistillKLDivergenceLoss(temperature)
    assert float(loss(teacher, student)) == pytest.approx(kl.mean(), rel=1e-5)
    assert float(loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        losses.DistillKLDivergenceLoss(0)


def test_margin_target_is_continuous_and_decreasing_at_threshold():
    # The mirrored branch keeps the ArcFace target monotonic in theta: check a fine grid of cosines.
    cos = np.linspace(-1, 1, 2001, dtype="float32")
    for m1, m2, m3 in MARGIN_SETS:
        target = np.asarray(losses.margin_target(cos, m1, m2, m3))
        assert np.all(np.diff(target) >= -1e-5), (m1, m2, m3)
    linear = np.asarray(losses.margin_target(cos, 1.0, 0.5, 0.0, "linear"))
    assert np.all(np.diff(linear) >= -1e-5)
    assert math.isclose(linear[-1], math.cos(0.5), rel_tol=1e-6)

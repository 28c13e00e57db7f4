"""Tests of Partial FC (losses.partial_fc_*, PartialFCNormDense) against numpy references of the full cosine head."""

import json
import math
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from helpers import np_arcface, on_tensorflow, value_and_gradients

from keras_insightface.nn import losses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES, EMB, BATCH = 40, 6, 8
TF_ONLY = "TensorFlow-only mechanism: "


def np_normalize(x, axis):
    return x / np.linalg.norm(x, axis=axis, keepdims=True)


def np_class_cosines(embeddings, kernel_class_major, top_k=1):
    """Full-head cosines ``(B, C)`` from a class-major kernel ``(C * K, emb)``: max over each class's K centers."""
    cos = np_normalize(embeddings, 1) @ np_normalize(kernel_class_major, 1).T
    return cos.reshape(len(embeddings), -1, top_k).max(axis=2)


def make_head(rate, top_k=1, units=CLASSES, seed=0):
    head = losses.PartialFCNormDense(units, sample_rate=rate, loss_top_k=top_k, seed=seed)
    head.build((None, EMB))
    return head


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(BATCH, EMB)).astype("float32")
    labels = np.array([3, 17, 3, 39, 0, 21, 8, 17], dtype="int32")
    return embeddings, labels


# ---------------------------------------------------------------------------------------------- sampling
def test_num_sampled_is_ceil_of_rate_times_classes_at_least_global_batch():
    assert losses.partial_fc_num_sampled(1_000_000, 0.1) == 100_000
    assert losses.partial_fc_num_sampled(85_742, 0.1) == 8575  # ceil(8574.2)
    assert losses.partial_fc_num_sampled(100, 0.05, global_batch=16) == 16  # every positive must fit
    assert losses.partial_fc_num_sampled(10, 0.5, global_batch=64) == 10  # never more than the classes
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="sample_rate"):
            losses.partial_fc_num_sampled(100, bad)
    with pytest.raises(ValueError, match="sample_rate"):
        losses.PartialFCNormDense(10, sample_rate=0)


def test_sample_keeps_every_positive_and_remaps_labels(batch):
    _, labels = batch
    for step in range(5):
        sampled, remapped = (np.asarray(t) for t in losses.partial_fc_sample(labels, CLASSES, 0.25, step, seed=7))
        assert len(sampled) == 10 and np.all(np.diff(sampled) > 0) and sampled.min() >= 0 and sampled.max() < CLASSES
        assert set(labels) <= set(sampled)
        np.testing.assert_array_equal(sampled[remapped], labels)


def test_sample_is_a_function_of_seed_and_step(batch):
    _, labels = batch
    draw = lambda step, seed=1: np.asarray(losses.partial_fc_sample(labels, CLASSES, 0.5, step, seed)[0])  # noqa: E731
    np.testing.assert_array_equal(draw(3), draw(3))
    assert not np.array_equal(draw(3), draw(4))
    assert not np.array_equal(draw(3), draw(3, seed=2))
    # the negatives are uniform over the other classes: each is drawn with probability (20 - 6) / (40 - 6)
    counts = np.zeros(CLASSES)
    for step in range(300):
        counts[draw(step)] += 1
    negatives = np.setdiff1d(np.arange(CLASSES), labels)
    np.testing.assert_allclose(counts[negatives] / 300, 14 / 34, atol=0.12)
    assert np.all(counts[labels] == 300)


@pytest.mark.skipif(not on_tensorflow(), reason=TF_ONLY + "label range asserts (tf.debugging); JAX has no value checks")
def test_out_of_range_labels_are_rejected():
    import tensorflow as tf

    with pytest.raises(tf.errors.InvalidArgumentError, match="labels must be in"):
        losses.partial_fc_sample(np.array([0, CLASSES]), CLASSES, 0.5, 0)


# ---------------------------------------------------------------------------------------------- logits
@pytest.mark.parametrize("top_k", [1, 3])
def test_partial_cosines_are_the_full_head_columns_of_the_sampled_classes(batch, top_k):
    embeddings, labels = batch
    head = make_head(0.3, top_k)
    cosines, remapped = head.partial_call(embeddings, labels, step=11)
    sampled, _ = losses.partial_fc_sample(labels, CLASSES, 0.3, 11, seed=0)
    full = np_class_cosines(embeddings, head.kernel.numpy(), top_k)
    cosines, remapped = np.asarray(cosines), np.asarray(remapped)
    assert cosines.shape == (BATCH, 12)
    np.testing.assert_allclose(cosines, full[:, np.asarray(sampled)], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        cosines[np.arange(BATCH), remapped], full[np.arange(BATCH), labels], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(np.asarray(head(embeddings)), full, rtol=1e-5, atol=1e-6)


def test_plain_norm_dense_head_gives_the_same_partial_cosines(batch):
    """``partial_fc_logits`` also serves a plain ``NormDense`` (kernel ``(emb, classes)``): same columns."""
    embeddings, labels = batch
    class_major = make_head(0.3, 2)
    plain = losses.NormDense(CLASSES, loss_top_k=2, append_norm=True)
    plain.build((None, EMB))
    plain.kernel.assign(class_major.kernel.numpy().T)
    cosines, remapped = losses.partial_fc_logits(plain, embeddings, labels, 0.3, step=11)
    expected, expected_labels = class_major.partial_call(embeddings, labels, step=11)
    cosines = np.asarray(cosines)
    np.testing.assert_allclose(cosines[:, :-1], np.asarray(expected), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(-cosines[:, -1], np.linalg.norm(embeddings, axis=1), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(remapped), np.asarray(expected_labels))


def test_rate_one_equals_the_full_head_loss_and_gradients(batch):
    embeddings, labels = batch
    partial = make_head(1.0)
    kernel = np.random.default_rng(1).normal(size=partial.kernel.shape).astype("float32")
    row = kernel[labels[1]]
    kernel[labels[1]] = -embeddings[1] / np.linalg.norm(embeddings[1]) + 0.35 * row / np.linalg.norm(row)
    target_cosine = np_class_cosines(embeddings, kernel)[1, labels[1]]
    assert -0.99 < target_cosine < math.cos(math.pi - 0.5)  # on ArcFace's mirrored branch, away from acos(-1)
    partial.kernel.assign(kernel)
    full = losses.NormDense(CLASSES)
    full.build((None, EMB))
    full.kernel.assign(partial.kernel.numpy().T)
    loss_fn = losses.ArcfaceLoss(scale=16)
    np.testing.assert_array_equal(np.asarray(partial.partial_call(embeddings, labels, step=0)[1]), labels)

    def partial_loss_fn(x):
        cosines, remapped = partial.partial_call(x, labels, step=0)
        return loss_fn(remapped, cosines)

    partial_loss, (partial_x_grad, partial_kernel_grad) = value_and_gradients(
        partial_loss_fn, embeddings, variables=[partial.kernel]
    )
    full_loss, (full_x_grad, full_kernel_grad) = value_and_gradients(
        lambda x: loss_fn(labels, full(x)), embeddings, variables=[full.kernel]
    )
    np.testing.assert_allclose(partial_loss, full_loss, rtol=1e-6)
    np.testing.assert_allclose(partial_kernel_grad, full_kernel_grad.T, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(partial_x_grad, full_x_grad, rtol=1e-4, atol=1e-7)
    # and the value is the ArcFace formula in numpy (theta + 0.5 on the target, scale 16), the mirror included
    expected = np_arcface(np_class_cosines(embeddings, kernel), labels, 1.0, 0.5, 0.0, 16).mean()
    np.testing.assert_allclose(partial_loss, expected, rtol=1e-5)


@pytest.mark.skipif(not on_tensorflow(), reason=TF_ONLY + "IndexedSlices gradients of a sparse variable read")
def test_kernel_gradient_is_sparse_over_the_sampled_rows(batch):
    import tensorflow as tf

    embeddings, labels = batch
    head = make_head(0.25, top_k=2)
    with tf.GradientTape() as tape:
        cosines, remapped = head.partial_call(embeddings, labels, step=5)
        loss = losses.ArcfaceLoss()(remapped, cosines)
    grad = tape.gradient(loss, head.kernel)
    assert isinstance(grad, tf.IndexedSlices)
    sampled = losses.partial_fc_sample(labels, CLASSES, 0.25, 5)[0].numpy()
    np.testing.assert_array_equal(
        np.unique(grad.indices.numpy()), np.sort(np.concatenate([2 * sampled, 2 * sampled + 1]))
    )


# ---------------------------------------------------------------------------------------------- optimizer updates
def _changed_rows(before, after):
    return np.flatnonzero(np.abs(after - before).sum(axis=1) > 0)


def _two_steps(optimizer, embeddings, labels):
    """Two training steps of the head alone (steps 0 and 1 sample different negatives); returns the second's
    sampled kernel rows and the rows of kernel / slots that the second step changed."""
    import tensorflow as tf

    head = make_head(0.25)
    optimizer.build([head.kernel])
    slots = [var for var in optimizer.variables if tuple(var.shape) == tuple(head.kernel.shape)]

    def step(number):
        with tf.GradientTape() as tape:
            cosines, remapped = head.partial_call(embeddings, labels, step=number)
            loss = losses.ArcfaceLoss()(remapped, cosines)
        optimizer.apply_gradients([(tape.gradient(loss, head.kernel), head.kernel)])

    step(0)
    before = [head.kernel.numpy()] + [slot.numpy() for slot in slots]
    step(1)
    changed = [_changed_rows(old, var.numpy()) for old, var in zip(before, [head.kernel, *slots])]
    return losses.partial_fc_sample(labels, CLASSES, 0.25, 1)[0].numpy(), changed


@pytest.mark.skipif(not on_tensorflow(), reason=TF_ONLY + "IndexedSlices gradients applied by Keras optimizers")
@pytest.mark.parametrize("name", ["SGD", "Adagrad"])
def test_lazy_keras_optimizers_update_only_sampled_centers_and_slots(batch, name):
    sampled, changed = _two_steps(keras.optimizers.get(name), *batch)
    for rows in changed:  # a negative with a softmax probability of ~0 may move by less than a float32 ulp
        assert set(rows) <= set(sampled) and set(batch[1]) <= set(rows)


@pytest.mark.skipif(not on_tensorflow(), reason=TF_ONLY + "lazy optimizers apply IndexedSlices gradients")
@pytest.mark.parametrize("optimizer", [losses.LazySGD(0.1, momentum=0.9), losses.LazyAdam(0.01)])
def test_lazy_optimizers_update_only_sampled_centers_and_slots(batch, optimizer):
    sampled, changed = _two_steps(optimizer, *batch)
    for rows in changed:
        assert set(batch[1]) <= set(rows) <= set(sampled)


def np_lazy_update(name, var, slots, rows, grad, lr, step):
    """One lazy update of ``rows`` in numpy: SGD momentum 0.9 (``m = 0.9 m - lr g; w += m``) or Adam."""
    var, slots = var.copy(), [slot.copy() for slot in slots]
    if name == "LazySGD":
        slots[0][rows] = 0.9 * slots[0][rows] - lr * grad
        var[rows] += slots[0][rows]
    else:
        slots[0][rows] = 0.9 * slots[0][rows] + 0.1 * grad
        slots[1][rows] = 0.999 * slots[1][rows] + 0.001 * grad**2
        alpha = lr * np.sqrt(1 - 0.999**step) / (1 - 0.9**step)
        var[rows] -= alpha * slots[0][rows] / (np.sqrt(slots[1][rows]) + 1e-7)
    return var, slots


@pytest.mark.skipif(not on_tensorflow(), reason=TF_ONLY + "lazy optimizers apply IndexedSlices gradients")
@pytest.mark.parametrize("name", ["LazySGD", "LazyAdam"])
def test_lazy_update_matches_numpy_and_sums_repeated_rows(name):
    """Rows repeated in an ``IndexedSlices`` (as after an all-reduce over replicas) are summed, as dense would be."""
    import tensorflow as tf

    rng = np.random.default_rng(3)
    var = keras.Variable(rng.normal(size=(7, 3)).astype("float32"))
    optimizer = getattr(losses, name)(0.1, momentum=0.9) if name == "LazySGD" else losses.LazyAdam(0.1)
    optimizer.build([var])
    slots = [v for v in optimizer.variables if tuple(v.shape) == (7, 3)]
    for slot in slots:
        slot.assign(np.abs(rng.normal(size=(7, 3))).astype("float32"))
    start, start_slots = var.numpy(), [slot.numpy() for slot in slots]
    values = rng.normal(size=(3, 3)).astype("float32")
    optimizer.apply_gradients(
        [(tf.IndexedSlices(tf.constant(values), tf.constant([4, 1, 4]), tf.constant([7, 3])), var)]
    )
    expected, expected_slots = np_lazy_update(
        name, start, start_slots, np.array([4, 1]), np.stack([values[0] + values[2], values[1]]), 0.1, 1
    )
    np.testing.assert_allclose(var.numpy(), expected, rtol=1e-5, atol=1e-6)
    for slot, want in zip(slots, expected_slots):
        np.testing.assert_allclose(slot.numpy(), want, rtol=1e-5, atol=1e-6)


def test_lazy_optimizers_keep_keras_updates_for_dense_gradients():
    rng = np.random.default_rng(4)
    start, grad = rng.normal(size=(5, 3)).astype("float32"), rng.normal(size=(5, 3)).astype("float32")
    for lazy, plain in (
        (losses.LazySGD(0.1, momentum=0.9), keras.optimizers.SGD(0.1, momentum=0.9)),
        (losses.LazyAdam(0.1), keras.optimizers.Adam(0.1)),
    ):
        results = []
        for optimizer in (lazy, plain):
            var = keras.Variable(start)
            optimizer.apply_gradients([(keras.ops.convert_to_tensor(grad), var)])
            results.append(var.numpy())
        np.testing.assert_array_equal(results[0], results[1])


# ---------------------------------------------------------------------------------------------- save / distribute
def test_model_with_partial_fc_head_survives_save_and_reload(batch, tmp_path):
    embeddings, labels = batch
    inputs = keras.Input((EMB,))
    model = keras.Model(
        inputs, {"arcface": losses.PartialFCNormDense(CLASSES, sample_rate=0.2, seed=5, name="arcface")(inputs)}
    )
    path = str(tmp_path / "partial.keras")
    model.save(path)
    reloaded = keras.models.load_model(path, safe_mode=True)
    head = reloaded.get_layer("arcface")
    assert isinstance(head, losses.PartialFCNormDense) and (head.sample_rate, head.seed) == (0.2, 5)
    np.testing.assert_array_equal(head.kernel.numpy(), model.get_layer("arcface").kernel.numpy())
    for got, want in zip(
        head.partial_call(embeddings, labels, 9), model.get_layer("arcface").partial_call(embeddings, labels, 9)
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from keras_insightface.nn import losses

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    labels = tf.constant([[1, 5, 5, 9], [30, 31, 1, 2]], tf.int32)

    @tf.function
    def run(step):
        def replica_fn():
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            return losses.partial_fc_sample(tf.gather(labels, replica), 40, 0.25, step, seed=3)
        return strategy.run(replica_fn)

    out = []
    for step in range(3):
        sampled, remapped = run(tf.constant(step, tf.int64))
        out.append({
            "sampled": [t.numpy().tolist() for t in strategy.experimental_local_results(sampled)],
            "remapped": [t.numpy().tolist() for t in strategy.experimental_local_results(remapped)],
        })
    print("RESULT" + json.dumps(out))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not on_tensorflow(), reason=TF_ONLY + "tf.distribute.MirroredStrategy replicas")
def test_replicas_sample_the_same_classes_including_all_global_positives():
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = json.loads(proc.stdout.split("RESULT")[-1])
    global_labels = [1, 5, 5, 9, 30, 31, 1, 2]
    for step, result in enumerate(steps):
        first, second = (np.array(s) for s in result["sampled"])
        np.testing.assert_array_equal(first, second)
        assert len(first) == math.ceil(0.25 * 40) and set(global_labels) <= set(first.tolist())
        np.testing.assert_array_equal(first[result["remapped"][0]], global_labels[:4])
        np.testing.assert_array_equal(first[result["remapped"][1]], global_labels[4:])
        # the same subset as one device sampling the global batch at this step
        single = losses.partial_fc_sample(np.array(global_labels), 40, 0.25, step, seed=3)[0].numpy()
        np.testing.assert_array_equal(first, single)
    assert not np.array_equal(steps[0]["sampled"][0], steps[1]["sampled"][0])

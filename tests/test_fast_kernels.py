"""fast_kernels: the fused batch norm, PReLU and momentum-SGD kernels give Keras' own numbers (forward, backward,
moving statistics, updates), are used only inside ``training_kernels()``, and speed nothing else up by accident."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_insightface.nn import fast_kernels


def _traced(fn, *args, fast):
    """Run ``fn`` traced in a ``tf.function`` (inside ``training_kernels()`` when ``fast``); return its outputs and the
    op types of the traced graph."""
    graph_fn = tf.function(fn)
    context = fast_kernels.training_kernels() if fast else _nothing()
    with context:
        concrete = graph_fn.get_concrete_function(*args)
    op_types = {op.type for op in concrete.graph.get_operations()}
    op_types |= {node.op for func in concrete.graph.as_graph_def().library.function for node in func.node_def}
    return [np.asarray(value) for value in concrete(*args)], op_types


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _batch_norm_step(layer, inputs):
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.sin(tf.cast(x, tf.float32)))
        grads = tape.gradient(loss, [x, *layer.trainable_weights])
        return [y, *grads, tf.identity(layer.moving_mean), tf.identity(layer.moving_variance)]

    return step


@pytest.mark.parametrize(
    "options",
    [{}, {"center": False}, {"scale": False, "momentum": 0.5}, {"epsilon": 2e-5, "momentum": 0.9}],
    ids=["default", "no_center", "no_scale", "insightface"],
)
def test_fused_batch_norm_equals_keras(options):
    inputs = tf.constant(np.random.default_rng(0).normal(2.0, 3.0, size=(4, 5, 6, 7)).astype("float32"))
    results = []
    for fast in (False, True):
        layer = keras.layers.BatchNormalization(**options)
        layer.build(inputs.shape)
        outputs, op_types = _traced(_batch_norm_step(layer, inputs), inputs, fast=fast)
        assert ("FusedBatchNormV3" in op_types) == fast
        results.append(outputs)
    for keras_value, fast_value in zip(*results):  # output, input / gamma / beta gradients, moving statistics
        np.testing.assert_allclose(fast_value, keras_value, rtol=1e-5, atol=1e-5)


def test_fused_batch_norm_keeps_keras_for_frozen_layers_and_half_precision_inputs():
    inputs = np.random.default_rng(1).normal(size=(2, 3, 3, 4)).astype("float32")
    frozen = keras.layers.BatchNormalization()
    frozen.build(inputs.shape)
    frozen.trainable = False  # Keras uses the moving statistics then: so must the fast path
    (keras_out, *_), _ = _traced(_batch_norm_step(frozen, tf.constant(inputs)), tf.constant(inputs), fast=False)
    (fast_out, *_), op_types = _traced(_batch_norm_step(frozen, tf.constant(inputs)), tf.constant(inputs), fast=True)
    np.testing.assert_allclose(fast_out, keras_out, rtol=1e-6)
    np.testing.assert_allclose(keras_out, inputs / np.sqrt(1 + 1e-3), rtol=1e-6)  # moving mean 0, variance 1
    assert "FusedBatchNormV3" not in op_types
    half = tf.constant(inputs, tf.float16)
    results = []
    for fast in (False, True):
        layer = keras.layers.BatchNormalization(dtype="mixed_float16")
        layer.build(half.shape)
        results.append(_traced(_batch_norm_step(layer, half), half, fast=fast)[0])
    for keras_value, fast_value in zip(*results):
        assert keras_value.dtype == fast_value.dtype
        np.testing.assert_allclose(np.float32(fast_value), np.float32(keras_value), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("shared_axes", [[1, 2], None, [1], [2]])
def test_prelu_equals_keras_also_at_zero(shared_axes):
    values = np.random.default_rng(2).normal(size=(3, 4, 5, 6)).astype("float32")
    values[0, 0, 0] = 0.0  # exact zeros: Keras' gradient there is 0 for the input and for alpha
    inputs = tf.constant(values)
    results = []
    for fast in (False, True):
        layer = keras.layers.PReLU(
            shared_axes=shared_axes, alpha_initializer=keras.initializers.RandomUniform(-0.5, 1.5, seed=3)
        )
        layer.build(inputs.shape)

        def step(x, layer=layer):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x)
                loss = tf.reduce_sum(y * tf.cos(x))
            return [y, *tape.gradient(loss, [x, layer.alpha])]

        outputs, op_types = _traced(step, inputs, fast=fast)
        assert ("Relu" in op_types) == (not fast)  # Keras: relu(x) - alpha * relu(-x); fast: one select each way
        results.append(outputs)
    for keras_value, fast_value in zip(*results):  # output, input gradient, alpha gradient
        np.testing.assert_allclose(fast_value, keras_value, rtol=1e-6, atol=1e-6)
    assert np.all(results[1][1][0, 0, 0] == 0.0)


def _sgd_step(variables, optimizer):
    def step(*step_grads):
        optimizer.apply_gradients(zip(step_grads, variables))
        return [tf.identity(var) for var in variables]

    return step


def test_momentum_sgd_updates_equal_keras_and_nesterov_falls_back():
    rng = np.random.default_rng(4)
    start = [rng.normal(size=(3, 2)).astype("float32"), rng.normal(size=(2,)).astype("float32")]
    grads = [[rng.normal(size=value.shape).astype("float32") for value in start] for _ in range(3)]
    results = {}
    for name, nesterov, fast in [("keras", False, False), ("fast", False, True), ("nesterov", True, True)]:
        variables = [keras.Variable(value) for value in start]
        optimizer = keras.optimizers.SGD(0.1, momentum=0.9, nesterov=nesterov)
        optimizer.build(variables)

        step = _sgd_step(variables, optimizer)
        for step_grads in grads:
            values, op_types = _traced(step, *[tf.constant(grad) for grad in step_grads], fast=fast)
        assert ("ResourceApplyKerasMomentum" in op_types) == (name == "fast")
        results[name] = values
    for keras_value, fast_value in zip(results["keras"], results["fast"]):
        np.testing.assert_allclose(fast_value, keras_value, rtol=1e-6, atol=1e-7)
    expected = [value.copy() for value in start]  # by hand: m = 0.9 m - 0.1 g; w += m
    momentum = [np.zeros_like(value) for value in start]
    for step_grads in grads:
        momentum = [0.9 * mm - 0.1 * gg for mm, gg in zip(momentum, step_grads)]
        expected = [ww + mm for ww, mm in zip(expected, momentum)]
    for fast_value, hand in zip(results["fast"], expected):
        np.testing.assert_allclose(fast_value, hand, rtol=1e-5, atol=1e-6)


def test_outside_training_kernels_every_layer_runs_keras_code():
    layer = keras.layers.PReLU()
    layer.build((None, 3))
    _, op_types = _traced(lambda x: [layer(x)], tf.constant(np.ones((2, 3), "float32")), fast=False)
    assert "Relu" in op_types and not any("Xla" in op for op in op_types)


def test_a_model_saved_by_the_previous_release_loads_and_gives_the_same_outputs():
    """tests/data/legacy_release_full.keras was written by the release before the redesign (its NormDense lived in
    losses.py; BN and PReLU layers with trained-like statistics): loaded now, it gives the outputs saved with it."""
    import os

    from keras_insightface.models import zoo as models
    from keras_insightface.nn import optimizers

    data_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
    saved = np.load(os.path.join(data_dir, "legacy_release_outputs.npz"))
    full = models.load_model(os.path.join(data_dir, "legacy_release_full.keras"), compile=True)
    np.testing.assert_allclose(full(saved["images"])["arcface"], saved["cosines"], atol=1e-6)
    basic = models.extract_basic_model(full)
    np.testing.assert_allclose(basic(saved["images"]), saved["embeddings"], atol=1e-6)
    with fast_kernels.training_kernels():  # inference is Keras' own code, in or out of the block
        np.testing.assert_allclose(basic(saved["images"]), saved["embeddings"], atol=1e-6)
    restored = optimizers.restored_optimizer(full, "x.keras")  # a .keras file keeps the optimizer with its slots
    assert isinstance(restored, keras.optimizers.SGD) and restored is full.optimizer

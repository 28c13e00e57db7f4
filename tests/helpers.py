"""Helpers shared by tests and the subprocess jobs they start (plain functions: the jobs cannot use fixtures)."""

import keras
import numpy as np


def tiny_basic_model(input_shape=(32, 32, 3), emb=32):
    """A small conv net ending in a layer named ``embedding``: fast enough for tests."""
    inputs = keras.Input(input_shape)
    nn = keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(inputs)
    nn = keras.layers.BatchNormalization(momentum=0.9)(nn)
    nn = keras.layers.ReLU()(nn)
    nn = keras.layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False)(nn)
    nn = keras.layers.BatchNormalization(momentum=0.9)(nn)
    nn = keras.layers.ReLU()(nn)
    nn = keras.layers.GlobalAveragePooling2D()(nn)
    nn = keras.layers.Dense(emb, use_bias=False)(nn)
    nn = keras.layers.BatchNormalization(momentum=0.9, name="embedding")(nn)
    return keras.Model(inputs, nn, name="tiny")


# ---------------------------------------------------------------------------------------------- backend-neutral
def on_tensorflow():
    """True when the tests run on Keras' TensorFlow backend (``KERAS_BACKEND`` unset or ``tensorflow``)."""
    return keras.backend.backend() == "tensorflow"


def value_and_gradients(fn, *args, variables=()):
    """``(value, [d value / d arg for each arg] + [d value / d var for each of variables])`` as numpy arrays.

    ``fn(*args)`` must return a scalar. TensorFlow: a ``tf.GradientTape`` watching the args (a sparse
    ``IndexedSlices`` gradient is densified). JAX: ``jax.value_and_grad`` of a pure function of the args and the
    variables' values, ``fn`` running in a ``keras.StatelessScope`` that maps ``variables`` to those values; any
    state a loss assigns inside ``fn`` is discarded there.
    """
    if on_tensorflow():
        import tensorflow as tf

        args = [tf.convert_to_tensor(arg) for arg in args]
        with tf.GradientTape() as tape:
            tape.watch(args)
            value = fn(*args)
        gradients = tape.gradient(value, [*args, *variables])
        return np.asarray(value), [np.asarray(tf.convert_to_tensor(grad)) for grad in gradients]
    import jax

    def pure(arg_values, variable_values):
        with keras.StatelessScope(state_mapping=list(zip(variables, variable_values))):
            return fn(*arg_values)

    args = [keras.ops.convert_to_tensor(arg) for arg in args]
    value, (arg_grads, var_grads) = jax.value_and_grad(pure, argnums=(0, 1))(args, [var.value for var in variables])
    return np.asarray(value), [np.asarray(grad) for grad in [*arg_grads, *var_grads]]


def compiled(fn, state=(), jit_compile=True):
    """``fn`` compiled as a training step compiles it. TensorFlow: ``tf.function(fn, jit_compile=jit_compile)``
    (XLA or a plain graph). JAX: ``jax.jit`` (always XLA) of a pure function that runs ``fn`` in a
    ``keras.StatelessScope`` mapping the ``state`` variables (a loss's state) to their values and returns the values
    the call assigned; they are written back after each call, so consecutive calls see the updated state as eager
    calls do."""
    if on_tensorflow():
        import tensorflow as tf

        return tf.function(fn, jit_compile=jit_compile)
    import jax

    def pure(state_values, *args):
        with keras.StatelessScope(state_mapping=list(zip(state, state_values))) as scope:
            value = fn(*args)
        return value, [scope.get_current_value(variable) for variable in state]

    jitted = jax.jit(pure)

    def call(*args):
        value, new_values = jitted([variable.value for variable in state], *args)
        for variable, new_value in zip(state, new_values):
            variable.assign(new_value)
        return value

    return call


# ---------------------------------------------------------------------------------------------- numpy references
def np_softmax(logits):
    return np.exp(np_log_softmax(logits))


def np_log_softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def np_cross_entropy(labels, logits, label_smoothing=0.0):
    """Keras categorical cross entropy from logits, one-hot smoothed as ``y * (1 - ls) + ls / C``."""
    onehot = np.eye(logits.shape[-1])[labels]
    onehot = onehot * (1 - label_smoothing) + label_smoothing / logits.shape[-1]
    return -(onehot * np_log_softmax(logits)).sum(axis=-1)


def np_with_target(cosines, labels, target):
    out = cosines.astype("float64").copy()
    out[np.arange(len(labels)), labels] = target
    return out


def np_arcface(cosines, labels, m1, m2, m3, scale, ls=0.0):
    """Combined margin: cos(m1*acos(c) + m2) - m3, mirrored to (-1-m3)*2 - t at c <= cos((pi-m2)/m1)."""
    cos_y = cosines[np.arange(len(labels)), labels].astype("float64")
    target = np.cos(m1 * np.arccos(cos_y) + m2) - m3
    target = np.where(cos_y > np.cos((np.pi - m2) / m1), target, (-1 - m3) * 2 - target)
    return np_cross_entropy(labels, np_with_target(cosines, labels, target) * scale, ls)

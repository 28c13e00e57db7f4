"""Small tensor helpers shared by heads, losses and optimizers: Keras registration, float32 casts, label checks,
global-batch gathering, state variables and sparse row reads / updates.

Everything computes with ``keras.ops`` and runs on the TensorFlow and JAX backends. A few helpers have a
TensorFlow-only fast path (replica contexts of ``tf.distribute``, value asserts, sparse reads and writes of resource
variables); TensorFlow is imported only inside those branches, so a machine with JAX and no TensorFlow can import
this module.
"""

import keras

PACKAGE = "insightface"  # the Keras registration package: saved models name our objects "insightface>Name"


def on_tensorflow():
    """True when Keras runs on the TensorFlow backend (the only one with ``tf.distribute`` and ``IndexedSlices``)."""
    return keras.backend.backend() == "tensorflow"


def register(obj):
    """Register a layer / loss / function / optimizer under this library's Keras package name, so that a saved
    model reloads with plain ``keras.models.load_model(path)``."""
    return keras.saving.register_keras_serializable(package=PACKAGE)(obj)


def float32(tensor):
    """Cast to float32: heads and losses compute in full precision under any mixed-precision policy."""
    return keras.ops.cast(tensor, "float32")


def checked_labels(labels, num_classes):
    """``labels`` after asserting they lie in ``[0, num_classes)`` (a GPU gather would silently read zeros).

    TensorFlow only: the check is a ``tf.debugging`` assert that also runs inside a compiled step. JAX has no value
    checks inside ``jax.jit``, so there labels are returned unchecked and an out-of-range label is NOT detected:
    its target logit reads as NaN (so the loss is NaN) and a negative label wraps around like a numpy index.
    """
    if num_classes is None or not on_tensorflow():
        return labels
    import tensorflow as tf

    message = f"sparse labels must be in [0, {num_classes})"
    checks = [
        tf.debugging.assert_non_negative(labels, message=message),
        tf.debugging.assert_less(labels, tf.constant(num_classes, labels.dtype), message=message),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(labels)


def global_batch(*tensors):
    """``tensors`` over the whole global batch (one tensor, or a tuple for several).

    State updates computed from the global batch are the same on every replica, so mirrored state variables stay in
    sync instead of each replica applying its own stale view. On TensorFlow a ``tf.distribute`` replica context
    all-gathers them (identity with one replica or outside a replica context). On JAX data parallelism is SPMD
    (``keras.distribution.DataParallel``, ``jax.jit`` over globally sharded arrays): the code sees the global batch
    already, so the tensors come back unchanged.
    """
    if on_tensorflow():
        tensors = _all_gathered_over_replicas(tensors)
    return tensors if len(tensors) > 1 else tensors[0]


def _all_gathered_over_replicas(tensors):
    """TensorFlow only: ``tensors`` concatenated over the replicas of the current ``tf.distribute`` replica context."""
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return tensors
    return tuple(context.all_gather(tensor, axis=0) for tensor in tensors)


def state_variable(value, name):
    """A non-trainable float32 ``keras.Variable`` holding a loss's state, assigned with ``.assign`` inside ``call``.

    ``only_first_replica`` aggregation (TensorFlow's ``ONLY_FIRST_REPLICA``) lets a ``tf.distribute`` replica assign
    it; it is correct because every replica computes the identical update from the global batch. On JAX a training
    step calls the loss in a ``keras.StatelessScope`` and reads the new value with ``scope.get_current_value``.
    Never autocast: the state stays float32 under a mixed-precision policy.
    """
    return keras.Variable(
        value, dtype="float32", trainable=False, autocast=False, aggregation="only_first_replica", name=name
    )


def l2_normalize(tensor, axis):
    """L2-normalize with a floor of 1e-10 on the squared norm (a zero row stays zero instead of NaN)."""
    squared = keras.ops.sum(keras.ops.square(tensor), axis=axis, keepdims=True)
    return tensor * keras.ops.rsqrt(keras.ops.maximum(squared, 1e-10))


def gather_rows(variable, indices):
    """``variable[indices]`` (rows).

    TensorFlow: a sparse read of the resource (``ResourceGather``), whose gradient is an ``IndexedSlices`` over the
    rows; gathering from a Keras variable would first read the whole variable, which makes the next scatter into it
    copy the whole buffer. Other backends: a dense ``take`` (the gradient is dense).
    """
    if not on_tensorflow():
        return keras.ops.take(variable, indices, axis=0)
    import tensorflow as tf

    if isinstance(variable, keras.Variable):
        variable = variable.value
    return tf.gather(variable, indices)


def subtract_rows(variable, indices, values):
    """``variable[indices[i]] -= values[i]`` for every ``i``, summing the values of a repeated index.

    TensorFlow: ``scatter_sub`` of an ``IndexedSlices``, which touches only those rows and works on a mirrored
    variable inside a ``tf.distribute`` replica context. Other backends: the dense ``variable - segment_sum(values)``
    assigned with ``.assign`` (recorded by a ``keras.StatelessScope`` inside a JAX training step).
    """
    if not on_tensorflow():
        delta = keras.ops.segment_sum(values, indices, num_segments=variable.shape[0])
        variable.assign(variable - delta)
        return
    import tensorflow as tf

    variable.value.scatter_sub(tf.IndexedSlices(values, indices))

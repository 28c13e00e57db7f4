"""Small tensor helpers shared by heads, losses and optimizers: Keras registration, float32 casts, label checks,
global-batch gathering under ``tf.distribute``, state variables and sparse row reads.

TensorFlow-specific where the mechanism is (replica contexts, resource gathers); everything else is ``keras.ops``.
"""

import keras
import tensorflow as tf

PACKAGE = "insightface"  # the Keras registration package: saved models name our objects "insightface>Name"


def register(obj):
    """Register a layer / loss / function / optimizer under this library's Keras package name, so that a saved
    model reloads with plain ``keras.models.load_model(path)``."""
    return keras.saving.register_keras_serializable(package=PACKAGE)(obj)


def float32(tensor):
    """Cast to float32: heads and losses compute in full precision under any mixed-precision policy."""
    return tf.cast(tensor, tf.float32)


def checked_labels(labels, num_classes):
    """``labels`` after asserting they lie in ``[0, num_classes)`` (a GPU gather would silently read zeros)."""
    if num_classes is None:
        return labels
    message = f"sparse labels must be in [0, {num_classes})"
    checks = [
        tf.debugging.assert_non_negative(labels, message=message),
        tf.debugging.assert_less(labels, tf.constant(num_classes, tf.int32), message=message),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(labels)


def global_batch(*tensors):
    """Concatenate ``tensors`` over all replicas (identity with one replica or outside a replica context).

    State updates computed from the global batch are the same on every replica, so mirrored state variables
    stay in sync instead of each replica applying its own stale view.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return tensors if len(tensors) > 1 else tensors[0]
    gathered = tuple(context.all_gather(tensor, axis=0) for tensor in tensors)
    return gathered if len(gathered) > 1 else gathered[0]


def state_variable(value, name):
    """A non-trainable float32 state variable that may be assigned inside a replica context.

    ``ONLY_FIRST_REPLICA`` is correct because every replica computes the identical update (``global_batch``).
    """
    return tf.Variable(
        value, dtype=tf.float32, trainable=False, name=name, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA
    )


def l2_normalize(tensor, axis):
    """L2-normalize with a floor of 1e-10 on the squared norm (a zero row stays zero instead of NaN)."""
    squared = keras.ops.sum(keras.ops.square(tensor), axis=axis, keepdims=True)
    return tensor * keras.ops.rsqrt(keras.ops.maximum(squared, 1e-10))


def gather_rows(variable, indices):
    """``variable[indices]`` as a sparse read of the resource (``ResourceGather``): gathering from a Keras variable
    first reads the whole variable, which makes the next scatter into it copy the whole buffer."""
    if isinstance(variable, keras.Variable):
        variable = variable.value
    return tf.gather(variable, indices)

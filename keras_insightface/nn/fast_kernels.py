"""Faster training kernels for three Keras 3 building blocks on the TensorFlow backend: same numbers, same files.

On TensorFlow, Keras 3 computes a training step of

- ``BatchNormalization`` with separate ops for the batch moments and the normalization (legacy Keras used
  TensorFlow's fused batch-norm kernel: 2.4x faster forward and backward on a CPU);
- ``PReLU`` as ``relu(x) - alpha * relu(-x)``: about ten passes over a large activation in the forward and backward
  pass, 40 % of a MobileFaceNet step on a CPU;
- ``SGD`` with momentum as several small ops per variable.

Inside ``training_kernels()``, those layers and the optimizer are traced with one ``FusedBatchNormV3`` op (forward and
backward), one XLA-compiled elementwise kernel each way for PReLU (which XLA fuses into a single pass; alpha's
gradient is then summed by a matrix product with a row of ones), and one ``ResourceApplyKerasMomentum`` op per
variable. Everything else is Keras' own: weights, configs and saved files do not change, and outside the block
(evaluation, export) the layers run Keras' code. Results equal Keras' to float rounding (tested).
``runner.StepRunner`` traces its training step inside the block on the TensorFlow backend.
"""

import contextlib

import keras
import tensorflow as tf

_KERAS = {
    "batch_norm": keras.layers.BatchNormalization.call,
    "prelu": keras.layers.PReLU.call,
    "sgd": keras.optimizers.SGD.update_step,
}
_active = 0  # > 0 while a training step is traced inside training_kernels()


@contextlib.contextmanager
def training_kernels():
    """Layers and optimizers traced inside take the fast kernels (TensorFlow backend; no effect elsewhere)."""
    global _active
    if keras.backend.backend() != "tensorflow":
        yield
        return
    _install()
    _active += 1
    try:
        yield
    finally:
        _active -= 1


def _install():
    keras.layers.BatchNormalization.call = _batch_norm_call
    keras.layers.PReLU.call = _prelu_call
    keras.optimizers.SGD.update_step = _sgd_update_step


# ---------------------------------------------------------------------------------------------- batch norm
def _fusable(layer, inputs, training, mask):
    """The cases the fused kernel computes exactly as Keras: training a trainable layer on NHWC data."""
    plain = not (layer.synchronized or getattr(layer, "renorm", False))
    return (
        _active
        and training
        and layer.trainable
        and mask is None
        and plain
        and len(inputs.shape) == 4
        and (layer.axis in (-1, 3))
    )


def _batch_norm_call(self, inputs, training=None, mask=None):
    if not _fusable(self, inputs, training, mask):
        return _KERAS["batch_norm"](self, inputs, training=training, mask=mask)
    channels = inputs.shape[-1]
    gamma = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones([channels], tf.float32)
    beta = tf.cast(self.beta, tf.float32) if self.center else tf.zeros([channels], tf.float32)
    outputs, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=inputs,
        scale=gamma,
        offset=beta,
        mean=tf.zeros([0], tf.float32),
        variance=tf.zeros([0], tf.float32),
        epsilon=self.epsilon,
        exponential_avg_factor=1.0,
        data_format="NHWC",
        is_training=True,
    )
    count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:3]), tf.float32)
    variance = variance * (count - 1.0) / tf.maximum(count, 1.0)  # the op's variance is unbiased; Keras' is not
    momentum = self.momentum
    self.moving_mean.assign(tf.cast(self.moving_mean, tf.float32) * momentum + mean * (1.0 - momentum))
    self.moving_variance.assign(tf.cast(self.moving_variance, tf.float32) * momentum + variance * (1.0 - momentum))
    return tf.cast(outputs, self.compute_dtype)


# ---------------------------------------------------------------------------------------------- PReLU
@tf.function(jit_compile=True)
def _prelu_forward(inputs, alpha):
    return tf.where(inputs > 0, inputs, alpha * inputs)


@tf.function(jit_compile=True)
def _prelu_backward_parts(inputs, alpha, grad):
    """Gradients of Keras' ``relu(x) - alpha * relu(-x)`` in one pass: for the input ``g`` where x > 0, ``alpha * g``
    where x < 0, 0 at 0; and ``g * x`` where x < 0 (float32), whose sum over alpha's shared axes is alpha's."""
    negative = inputs < 0
    zeros = tf.zeros_like(grad)
    grad_inputs = tf.where(inputs > 0, grad, tf.where(negative, alpha * grad, zeros))
    return grad_inputs, tf.cast(tf.where(negative, grad * inputs, zeros), tf.float32)


def _sum_over(values, axes):
    """``values`` summed over ``axes``. Over leading axes the sum is a product with a row of ones: oneDNN's matrix
    product reads a large activation twice as fast as XLA's CPU reduction."""
    if tuple(axes) != tuple(range(len(axes))):
        return tf.reduce_sum(values, axis=axes)
    rows = tf.reshape(values, [-1, tf.reduce_prod(tf.shape(values)[len(axes) :])])
    return tf.matmul(tf.ones([1, tf.shape(rows)[0]], values.dtype), rows)


@tf.custom_gradient
def _prelu(inputs, alpha):
    alpha_axes = tuple([0] + [axis + 1 for axis, size in enumerate(alpha.shape) if size == 1])

    def gradient(grad):
        grad_inputs, negative_part = _prelu_backward_parts(inputs, alpha, grad)
        grad_alpha = tf.cast(_sum_over(negative_part, alpha_axes), alpha.dtype)
        return grad_inputs, tf.reshape(grad_alpha, tf.shape(alpha))

    return _prelu_forward(inputs, alpha), gradient


def _prelu_call(self, inputs):
    if not _active or len(self.alpha.shape) != len(inputs.shape) - 1:
        return _KERAS["prelu"](self, inputs)
    return _prelu(inputs, tf.cast(self.alpha, inputs.dtype))


# ---------------------------------------------------------------------------------------------- SGD
def _sgd_update_step(self, gradient, variable, learning_rate):
    """``m = momentum * m - lr * g; w += m`` (Keras' SGD with momentum) as one kernel per variable."""
    plain = _active and self.momentum and not self.nesterov and not isinstance(gradient, tf.IndexedSlices)
    if not plain:
        return _KERAS["sgd"](self, gradient, variable, learning_rate)
    momentum = self.momentums[self._get_variable_index(variable)]
    dtype = variable.dtype
    return tf.raw_ops.ResourceApplyKerasMomentum(
        var=variable.handle,
        accum=momentum.handle,
        lr=tf.cast(learning_rate, dtype),
        grad=tf.cast(gradient, dtype),
        momentum=tf.cast(self.momentum, dtype),
        use_nesterov=False,
    )

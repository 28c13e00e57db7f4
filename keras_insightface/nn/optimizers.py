"""Lazy optimizers for Partial FC heads: ``LazySGD`` / ``LazyAdam`` update only the rows of an ``IndexedSlices``
gradient and their slots (Keras' own momentum SGD and Adam touch every row: ``O(classes)`` work per step).

The lazy path is TensorFlow-only: ``IndexedSlices`` gradients are how TensorFlow represents a sparse row update (a
``PartialFCNormDense`` kernel read through ``tensor_utils.gather_rows``). On other backends gradients are dense and
both optimizers are exactly Keras' ``SGD`` / ``Adam``; TensorFlow is imported only where an ``IndexedSlices`` is
handled, so this module imports on a machine without TensorFlow.
"""

import keras

from keras_insightface.nn.tensor_utils import gather_rows, on_tensorflow, register


def _is_indexed_slices(gradient):
    """True for a TensorFlow ``IndexedSlices`` gradient (only the TensorFlow backend produces them)."""
    if not on_tensorflow():
        return False
    import tensorflow as tf

    return isinstance(gradient, tf.IndexedSlices)


def _unique_rows(gradient, dtype):
    """``(row indices, summed row gradients)`` of an ``IndexedSlices`` with every index once: an all-reduce over
    replicas concatenates the rows of each replica, and a scatter with repeated indices would keep only one."""
    import tensorflow as tf

    indices, positions = tf.unique(gradient.indices)
    values = tf.math.unsorted_segment_sum(tf.cast(gradient.values, dtype), positions, tf.shape(indices)[0])
    return indices, values


@register
class LazySGD(keras.optimizers.SGD):
    """Keras ``SGD`` that applies an ``IndexedSlices`` gradient (a Partial FC head) lazily: only the gradient's rows
    of the variable and of its momentum change. Keras' own SGD with momentum decays the momentum of every row and
    moves every row by it, i.e. ``O(classes)`` work per step. Dense gradients get Keras' update unchanged."""

    def update_step(self, gradient, variable, learning_rate):
        if not _is_indexed_slices(gradient):
            return super().update_step(gradient, variable, learning_rate)
        import tensorflow as tf

        lr = tf.cast(learning_rate, variable.dtype)
        indices, grad = _unique_rows(gradient, variable.dtype)
        if self.momentum == 0:
            return self.assign_sub(variable, tf.IndexedSlices(grad * lr, indices))
        momentum_var = self.momentums[self._get_variable_index(variable)]
        momentum = tf.cast(self.momentum, variable.dtype)
        rows = gather_rows(momentum_var, indices) * momentum - grad * lr
        self.assign(momentum_var, tf.IndexedSlices(rows, indices))
        step = rows * momentum - grad * lr if self.nesterov else rows
        return self.assign_add(variable, tf.IndexedSlices(step, indices))


@register
class LazyAdam(keras.optimizers.Adam):
    """Keras ``Adam`` that applies an ``IndexedSlices`` gradient lazily: only the gradient's rows of the variable
    and of its two moments change (the bias correction uses the global step, as TF1's ``LazyAdamOptimizer``).
    Dense gradients, and ``amsgrad=True``, get Keras' update unchanged."""

    def update_step(self, gradient, variable, learning_rate):
        if not _is_indexed_slices(gradient) or self.amsgrad:
            return super().update_step(gradient, variable, learning_rate)
        import tensorflow as tf

        dtype = variable.dtype
        indices, grad = _unique_rows(gradient, dtype)
        local_step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        alpha = tf.cast(learning_rate, dtype) * tf.sqrt(1 - beta_2**local_step) / (1 - beta_1**local_step)
        index = self._get_variable_index(variable)
        m_var, v_var = self._momentums[index], self._velocities[index]
        m_rows = gather_rows(m_var, indices) * beta_1 + grad * (1 - beta_1)
        v_rows = gather_rows(v_var, indices) * beta_2 + tf.square(grad) * (1 - beta_2)
        self.assign(m_var, tf.IndexedSlices(m_rows, indices))
        self.assign(v_var, tf.IndexedSlices(v_rows, indices))
        return self.assign_sub(variable, tf.IndexedSlices(alpha * m_rows / (tf.sqrt(v_rows) + self.epsilon), indices))


def lazy_optimizer(optimizer):
    """The lazy counterpart of a Keras ``SGD`` / ``Adam`` (same configuration), any other optimizer unchanged."""
    lazy = {keras.optimizers.SGD: LazySGD, keras.optimizers.Adam: LazyAdam}.get(type(optimizer))
    return optimizer if lazy is None else lazy.from_config(optimizer.get_config())


def holds_variables(optimizer, variables):
    """True when ``optimizer`` is built for exactly ``variables`` (the same objects in the same order): only then do
    its slots (momentum, moments) belong to them."""
    built_with = getattr(optimizer, "_trainable_variables", None) if optimizer.built else None
    return built_with is not None and [id(var) for var in built_with] == [id(var) for var in variables]


def built_for(optimizer, variables):
    """``optimizer`` ready to update ``variables``: as it is when it holds them already, else built for them (a fresh
    copy from its configuration when it was built for other variables)."""
    if optimizer.built and not holds_variables(optimizer, variables):
        optimizer = optimizer.__class__.from_config(optimizer.get_config())
    if not optimizer.built:
        optimizer.build(variables)
    return optimizer


def load_h5_slots(optimizer, path):
    """Copy the optimizer weights saved in a legacy ``.h5`` model file into ``optimizer`` (built for the model):
    Keras reloads only the step count and learning rate from such a file, though it holds every slot under the
    variable's path. Returns ``(restored, total)`` variable counts; a variable with no saved match keeps its value."""
    import h5py

    restored = 0
    with h5py.File(path, "r") as saved:
        weights = saved.get("optimizer_weights", {})
        for variable in optimizer.variables:
            value = weights.get(variable.path)
            if value is not None and tuple(value.shape) == tuple(variable.shape):
                variable.assign(value[()])
                restored += 1
    return restored, len(optimizer.variables)


def restored_optimizer(model, path):
    """The optimizer a loaded full model was compiled with, if it can continue: kept when it holds exactly the model's
    trainable variables (its slots are theirs); otherwise rebuilt for them from its configuration, keeping its step
    count and, from a ``.h5`` file (whose reloaded optimizer is built but holds none of the variables), its slots."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not optimizer.built:
        return None
    if holds_variables(optimizer, model.trainable_variables):
        return optimizer
    fresh = built_for(optimizer.__class__.from_config(optimizer.get_config()), model.trainable_variables)
    fresh.iterations.assign(optimizer.iterations)
    from_h5 = isinstance(path, str) and path.endswith((".h5", ".hdf5"))
    restored, total = load_h5_slots(fresh, path) if from_h5 else (0, len(fresh.variables))
    print(
        f">>>> The saved {type(optimizer).__name__} did not hold the model's variables: rebuilt from its config,",
        f"step {int(fresh.iterations.numpy())}, {restored} of {total} optimizer variables restored from {path}",
    )
    return fresh

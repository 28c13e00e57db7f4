"""Classification heads: the cosine head ``NormDense`` (sub-center ArcFace, MagFace / AdaFace norm column) and
``PartialFCNormDense`` with Partial FC class sampling (An et al. 2021).

A head maps embeddings to per-class cosines; the margin losses in ``losses`` turn those into logits. Code that
needs the class centers themselves (dataset cleaning) reads them through ``class_centers()``, whatever the layout
of the kernel.

Computed with ``keras.ops``: runs on the TensorFlow and JAX backends. TensorFlow-only fast path: the sparse read of
the sampled centers (``IndexedSlices`` gradient, see ``tensor_utils.gather_rows``) that the lazy optimizers apply.

Sharding (JAX, ``keras.distribution.ModelParallel``): when the active distribution's layout map splits a head's
``<name>/kernel`` along its class axis, the kernel holds a few padding classes so that every device gets the same
number of rows (a multiple of ``CLASS_PAD``, the same on 1, 2, 4 ... 128 devices, so a checkpoint and its optimizer
slots load on any of them), the padding is sliced off before any output, a saved model holds only the real classes,
and the cosines are laid out as the map's ``<name>/cosines`` entry says (classes split over the devices): the full
``batch x classes`` matrix never lives on one device. Without such a layout nothing changes.
"""

import math

import keras
import numpy as np

from keras_insightface.nn.tensor_utils import (
    checked_labels,
    float32,
    gather_rows,
    global_batch,
    l2_normalize,
    on_tensorflow,
    register,
)

CLASS_PAD = 128  # a class-sharded kernel holds a multiple of this many classes (and of its shard count)


class PaddedGlorotNormal(keras.initializers.Initializer):
    """The initializer of a padded kernel: the real classes' centers Glorot-normal as without padding (the standard
    deviation of the real shape), the padding classes zero. They stay zero (no gradient reaches them, so no update
    or weight decay moves them) and add nothing to a regularizer. Drawn at the padded shape and masked, elementwise:
    Keras initializes a big kernel on its devices, each drawing its own rows."""

    def __init__(self, real_shape, class_axis):
        self.real_shape, self.class_axis = tuple(real_shape), class_axis

    def __call__(self, shape, dtype=None):
        scale = sum(shape) / sum(self.real_shape)  # Glorot's fans are the shape's two sizes
        values = keras.initializers.VarianceScaling(scale, "fan_avg", "truncated_normal")(shape, dtype)
        real = keras.ops.arange(shape[self.class_axis]) < self.real_shape[self.class_axis]
        real = keras.ops.expand_dims(real, 1 - self.class_axis)
        return keras.ops.where(real, values, keras.ops.zeros((), values.dtype))


def head_layout(layer, tensor_name):
    """The active Keras distribution's layout of a head's ``<layer name>/<tensor_name>`` (``kernel``, ``cosines``), or
    None: no distribution, a data-parallel one, or a layout map without that entry."""
    distribution = keras.distribution.distribution()
    return None if distribution is None else distribution.get_tensor_layout(f"{layer.name}/{tensor_name}")


def laid_out_cosines(layer, cosines):
    """``cosines`` laid out as the distribution's ``<name>/cosines`` entry says (inside a jitted step: a sharding
    constraint, so the class axis stays split over the devices); unchanged without one."""
    layout = head_layout(layer, "cosines")
    return cosines if layout is None else keras.distribution.distribute_tensor(cosines, layout)


def padded_units(layer):
    """How many classes the head's kernel holds: ``units``, or, when the distribution's layout splits the kernel's
    class axis over ``n`` devices, ``units`` rounded up to a multiple of ``lcm(CLASS_PAD, n)``."""
    layout = head_layout(layer, "kernel")
    mesh_axis = None if layout is None else layout.axes[layer.class_axis]
    if mesh_axis is None:
        return layer.units
    mesh = layout.device_mesh
    multiple = math.lcm(CLASS_PAD, mesh.shape[mesh.axis_names.index(mesh_axis)])
    return -(-layer.units // multiple) * multiple


def fit_to_shape(value, shape, what="an array"):
    """``value`` (numpy) cut, or zero-padded, at the end of the one axis where its shape differs from ``shape``: a
    head's kernel or optimizer slot saved with more or fewer padding classes than the head it loads into has."""
    differ = [axis for axis, (have, want) in enumerate(zip(value.shape, shape)) if have != want]
    if len(value.shape) != len(shape) or len(differ) > 1:
        raise ValueError(f"{what} of shape {value.shape} does not fit {shape}")
    if not differ:
        return value
    axis, want = differ[0], shape[differ[0]]
    if value.shape[axis] > want:
        return np.take(value, np.arange(want), axis=axis)
    padding = [(0, 0)] * value.ndim
    padding[axis] = (0, want - value.shape[axis])
    return np.pad(value, padding)


@register
class NormDense(keras.layers.Layer):
    """Cosine classifier head: ``l2n(x) @ l2n(W, axis=0)`` with kernel ``(emb, units * loss_top_k)``.

    ``loss_top_k > 1`` is sub-center ArcFace (Deng et al. 2020): ``K`` centers per class, columns class-major,
    output the max over the K cosines. ``append_norm=True`` (MagFace / AdaFace) appends a last column holding
    ``-||x||``: negated so that argmax-based accuracy metrics never pick it; ``split_norm_column`` undoes it.
    Always computes in float32, also under a mixed-precision policy. Under a class-sharded layout (see the module
    docstring) the kernel holds padding classes, never seen outside the layer.
    """

    class_axis = 1  # the kernel's axis of the (sub-)class centers

    def __init__(self, units=1000, kernel_regularizer=None, loss_top_k=1, append_norm=False, **kwargs):
        kwargs.pop("dtype", None)
        super().__init__(dtype="float32", **kwargs)
        if int(units) < 1 or int(loss_top_k) < 1:
            raise ValueError(f"units and loss_top_k must be >= 1, got {units}, {loss_top_k}")
        self.units, self.loss_top_k, self.append_norm = int(units), int(loss_top_k), bool(append_norm)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)

    def build(self, input_shape):
        real_shape, shape = [input_shape[-1]] * 2, [input_shape[-1]] * 2
        real_shape[self.class_axis] = self.units * self.loss_top_k
        shape[self.class_axis] = padded_units(self) * self.loss_top_k
        self.kernel = self.add_weight(
            name="kernel",
            shape=tuple(shape),
            initializer="glorot_normal" if shape == real_shape else PaddedGlorotNormal(real_shape, self.class_axis),
            regularizer=self.kernel_regularizer,
            trainable=True,
        )

    @property
    def is_padded(self):
        return self.kernel.shape[self.class_axis] != self.units * self.loss_top_k

    def real_kernel(self):
        """The kernel without its padding classes (the kernel itself when it has none)."""
        if not self.is_padded:
            return self.kernel
        columns = self.units * self.loss_top_k
        return self.kernel[:, :columns] if self.class_axis == 1 else self.kernel[:columns]

    def call(self, inputs):
        inputs = keras.ops.cast(inputs, "float32")
        norm_inputs = l2_normalize(inputs, axis=1)
        norm_kernel = l2_normalize(self.real_kernel(), axis=0)
        return class_cosines(self, inputs, laid_out_cosines(self, keras.ops.matmul(norm_inputs, norm_kernel)))

    def class_centers(self):
        """The (sub-)class centers as a numpy array ``(units * loss_top_k, emb)``, class-major: row ``c * K + k`` is
        sub-center ``k`` of class ``c``. Not normalized."""
        return keras.ops.convert_to_numpy(self.real_kernel()).T

    def save_own_variables(self, store):
        """A padded kernel is saved without its padding: the file is the one an unsharded head writes."""
        if not self.is_padded:
            return super().save_own_variables(store)
        store["0"] = keras.ops.convert_to_numpy(self.real_kernel())

    def load_own_variables(self, store):
        """A saved kernel loads into a padded one (the padding classes start at zero: they are never used)."""
        saved = store["0"] if len(store.keys()) == 1 else None
        if saved is None or tuple(saved.shape) == tuple(self.kernel.shape):
            return super().load_own_variables(store)
        self.kernel.assign(fit_to_shape(saved[()], tuple(self.kernel.shape), f"{self.name}: the saved kernel"))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.units + int(self.append_norm))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "units": self.units,
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
                "loss_top_k": self.loss_top_k,
                "append_norm": self.append_norm,
            }
        )
        return config


def class_cosines(layer, inputs, center_cosines):
    """Per-class output of a cosine head from the cosines to each (sub-)center column (class-major, K per class):
    the max over a class's ``loss_top_k`` sub-centers, then the ``-||x||`` column when ``append_norm``."""
    if layer.loss_top_k > 1:
        center_cosines = keras.ops.max(
            keras.ops.reshape(center_cosines, (-1, center_cosines.shape[-1] // layer.loss_top_k, layer.loss_top_k)),
            axis=2,
        )
    if layer.append_norm:
        norm = keras.ops.sqrt(keras.ops.sum(keras.ops.square(inputs), axis=1, keepdims=True))
        center_cosines = keras.ops.concatenate([center_cosines, -norm], axis=-1)
    return center_cosines


def split_norm_column(y_pred):
    """Split ``NormDense(append_norm=True)`` output into cosines ``(B, C)`` and embedding norms ``(B,)``."""
    y_pred = float32(y_pred)
    return y_pred[:, :-1], -y_pred[:, -1]


# ---------------------------------------------------------------------------------------------- partial FC
def partial_fc_num_sampled(num_classes, sample_rate, global_batch=None):
    """How many classes Partial FC samples: ``ceil(sample_rate * num_classes)``, raised to the global batch size
    when that is larger (every positive must fit), never more than ``num_classes``."""
    if not 0 < sample_rate <= 1:
        raise ValueError(f"partial FC sample_rate must be in (0, 1], got {sample_rate}")
    num_sampled = math.ceil(sample_rate * num_classes)
    return min(int(num_classes), max(num_sampled, int(global_batch or 0)))


def partial_fc_sample(labels, num_classes, sample_rate, step, seed=0):
    """Sample the Partial FC classes of one step: ``(sampled, remapped)``.

    ``sampled`` (sorted int32 ``(S,)``) holds every class of the GLOBAL batch (``global_batch``: all-gathered over
    ``tf.distribute`` replicas, the whole SPMD batch on JAX) plus random negatives, ``S = partial_fc_num_sampled(...)``;
    ``remapped`` are this replica's labels as indices into ``sampled``. The negatives come from stateless random
    numbers that are a function of ``(seed, step)`` only, so every replica picks the same subset in a step (mirrored
    centers stay identical) and a rerun picks it again.
    """
    local = checked_labels(keras.ops.reshape(keras.ops.cast(labels, "int32"), (-1,)), num_classes)
    global_labels = global_batch(local)
    num_sampled = partial_fc_num_sampled(num_classes, sample_rate, global_labels.shape[0])
    if num_sampled >= num_classes:
        return keras.ops.arange(num_classes, dtype="int32"), local
    scores = _stateless_uniform(num_classes, seed, step)  # in [0, 1): positives (2.0) always win top_k
    positives = keras.ops.full(keras.ops.shape(global_labels), 2.0)
    scores = keras.ops.scatter_update(scores, keras.ops.expand_dims(global_labels, 1), positives)
    sampled = keras.ops.sort(keras.ops.cast(keras.ops.top_k(scores, num_sampled, sorted=False)[1], "int32"))
    return sampled, keras.ops.cast(keras.ops.searchsorted(sampled, local), "int32")


def _stateless_uniform(size, seed, step):
    """``(size,)`` float32 uniform numbers in [0, 1) determined by ``(seed, step)`` alone (no generator state).

    TensorFlow: ``tf.random.stateless_uniform`` seeded with ``(seed, step)``. JAX: ``jax.random.uniform`` with the
    key of ``seed`` folded with ``step``. The two backends draw different numbers for the same pair.
    """
    if on_tensorflow():
        import tensorflow as tf

        seeds = tf.stack([tf.cast(seed, tf.int64), tf.cast(step, tf.int64)])
        return tf.random.stateless_uniform([size], seed=seeds)
    if keras.backend.backend() == "jax":
        import jax

        key = jax.random.fold_in(jax.random.key(seed), keras.ops.cast(step, "uint32"))
        return jax.random.uniform(key, (size,), dtype="float32")
    raise NotImplementedError(f"Partial FC sampling needs the TensorFlow or JAX backend, not {keras.backend.backend()}")


def sub_center_columns(sampled, loss_top_k):
    """Kernel columns of the sampled classes: the ``loss_top_k`` class-major sub-centers of each, in order."""
    if loss_top_k == 1:
        return sampled
    offsets = keras.ops.arange(loss_top_k, dtype=sampled.dtype)
    return keras.ops.reshape(keras.ops.expand_dims(sampled, 1) * loss_top_k + offsets[None], (-1,))


def partial_fc_logits(layer, embeddings, labels, sample_rate, step, seed=0):
    """Partial FC (An et al. 2021) cosine logits of a ``NormDense`` head over a class sample of this step.

    Returns ``(cosines (B, S[+1]), remapped labels (B,))``: feed them to any cosine loss (``ArcfaceLoss`` etc.)
    in place of the full head output and labels. Only the sampled centers enter the matmul, so logits and their
    gradients cost ``O(B x S)``. With a ``PartialFCNormDense`` (class-major kernel) on TensorFlow the kernel gradient
    is an ``IndexedSlices`` over the sampled rows (``gather_rows``); on JAX, and with a plain ``NormDense`` (kernel
    ``(emb, classes)``), it is dense. ``sample_rate = 1`` (or ``S >= classes``) is exactly the full head.
    """
    sampled, remapped = partial_fc_sample(labels, layer.units, sample_rate, step, seed)
    if sampled.shape[0] == layer.units:
        return layer(embeddings), remapped
    columns = sub_center_columns(sampled, layer.loss_top_k)
    if getattr(layer, "class_major", False):
        centers = gather_rows(layer.kernel, columns)
    else:
        centers = keras.ops.transpose(keras.ops.take(layer.kernel, columns, axis=1))
    return cosines_of_centers(layer, embeddings, centers), remapped


def cosines_of_centers(layer, embeddings, centers):
    """The head's output over some of its (sub-)class centers, given as rows ``(S * K, emb)`` (class-major): the
    cosines of the embeddings to them, laid out like the head's cosines, then ``class_cosines``."""
    inputs = float32(embeddings)
    norm_centers = keras.ops.transpose(l2_normalize(centers, axis=1))
    cosines = keras.ops.matmul(l2_normalize(inputs, axis=1), norm_centers)
    return class_cosines(layer, inputs, laid_out_cosines(layer, cosines))


@register
class PartialFCNormDense(NormDense):
    """``NormDense`` for Partial FC: the kernel is stored class-major, ``(units * loss_top_k, emb)``, so gathering
    the sampled centers gives an ``IndexedSlices`` gradient touching only those rows.

    ``layer(x)`` is the full cosine head (evaluation, accuracy); ``layer.partial_call(x, labels, step)`` samples
    ``sample_rate`` of the classes (``partial_fc_logits``). ``seed`` fixes the sampling sequence.
    """

    class_major, class_axis = True, 0

    def __init__(self, units=1000, sample_rate=0.1, seed=0, **kwargs):
        super().__init__(units, **kwargs)
        partial_fc_num_sampled(self.units, sample_rate)  # validates the rate
        self.sample_rate, self.seed = float(sample_rate), int(seed)

    def call(self, inputs):
        return cosines_of_centers(self, inputs, self.real_kernel())

    def class_centers(self):
        return keras.ops.convert_to_numpy(self.real_kernel())  # stored class-major already

    def partial_call(self, embeddings, labels, step):
        """``(cosines over this step's sampled classes, labels remapped to them)``; see ``partial_fc_logits``."""
        return partial_fc_logits(self, embeddings, labels, self.sample_rate, step, self.seed)

    def partial_losses(self):
        """The regularization of the centers a Partial FC step trains (a training step that calls ``partial_call``
        instead of the layer adds it): the kernel regularizer's value, or nothing."""
        return [] if self.kernel_regularizer is None else [self.kernel_regularizer(self.kernel)]

    def get_config(self):
        config = super().get_config()
        config.update({"sample_rate": self.sample_rate, "seed": self.seed})
        return config

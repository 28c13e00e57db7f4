"""The sharded head (``Train(sharded_head=...)``, JAX only): the device mesh and layout that split the cosine head's
classes over the devices, and the lazy Partial FC update of such a head in the JAX step.

Mesh ``(batch, model)`` of every device: ``sharded_head=True`` is ``(1, N)``, an int ``n`` is ``(N / n, n)``. The
cosine head's kernel (``NormDense`` ``(emb, classes * K)``, or ``PartialFCNormDense`` ``(classes * K, emb)`` with
Partial FC) is split along its classes over the ``model`` axis, its optimizer slots with it (Keras lays a slot out
like its variable); every other variable is replicated; each global batch is split over all N devices (the backbone
is data parallel); the head's cosines are laid out ``(batch, model)``, so each device holds its classes' columns and
the softmax of the losses is reduced across the devices by the compiler. Memory for the head and its slots per
device: ``1 / n`` of the total.

With Partial FC (``partial_fc_rate < 1``) each shard samples its own slice of the classes
(``nn.sharded_partial_fc``); the step differentiates the gathered rows instead of the kernel and runs the stage's
optimizer on those rows and their slot rows (a copy of the optimizer built for them, see ``ShardedPartialFC``):
only the sampled rows of the kernel and of its slots change, as with the lazy optimizers on TensorFlow.

TensorFlow has no such path: ``check_backend`` refuses the option there in one line.
"""

import functools

import keras
import numpy as np

from keras_insightface.data import pipeline as data
from keras_insightface.nn import heads

HEAD = "arcface"  # the cosine head's layer name (training.outputs)
BATCH, MODEL = "batch", "model"  # the mesh axes


def check_backend(sharded_head):
    """The one-line error of the option on a backend other than JAX."""
    if sharded_head is not False and keras.backend.backend() != "jax":
        raise ValueError(
            f"sharded_head={sharded_head!r} needs the JAX backend (KERAS_BACKEND=jax); the "
            f"{keras.backend.backend()} backend replicates the head: leave sharded_head=False there"
        )


class HeadParallel(keras.distribution.ModelParallel):
    """``ModelParallel`` whose layout map splits the cosine head (``options``: the ``(sharded_head, partial FC)`` it
    was made for); a variable whose split axis does not divide over its devices (a head of the other kind, loaded
    from a checkpoint to be replaced) is replicated instead."""

    def __init__(self, options, **kwargs):
        super().__init__(**kwargs)
        self.options = options

    def get_variable_layout(self, variable):
        layout = super().get_variable_layout(variable)
        mesh = self.device_mesh
        for size, axis in zip(variable.shape, layout.axes):
            if axis is not None and size % mesh.shape[mesh.axis_names.index(axis)]:
                return keras.distribution.TensorLayout([None] * len(variable.shape), mesh)
        return layout


def head_distribution(sharded_head, partial_fc_rate=1.0, devices=None):
    """The ``HeadParallel`` of the option: mesh ``(N / n, n)`` over ``devices`` (default: all), layout map splitting
    the class axis of the head's kernel (the rows with Partial FC, the columns otherwise) and of its cosines."""
    devices = keras.distribution.list_devices() if devices is None else list(devices)
    split = len(devices) if sharded_head is True else int(sharded_head)
    if split < 1 or len(devices) % split:
        raise ValueError(f"sharded_head={sharded_head}: the {len(devices)} devices do not split into groups of {split}")
    mesh = keras.distribution.DeviceMesh((len(devices) // split, split), (BATCH, MODEL), devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[f"{HEAD}/kernel"] = (MODEL, None) if partial_fc_rate < 1 else (None, MODEL)
    layout_map[f"{HEAD}/cosines"] = (BATCH, MODEL)
    options = (split, partial_fc_rate < 1)
    return HeadParallel(options, layout_map=layout_map, batch_dim_name=BATCH)


def use_sharded_head(config):
    """Set the global Keras distribution for a ``Train`` with ``sharded_head`` (kept when it is that one already)."""
    current = keras.distribution.distribution()
    distribution = head_distribution(config.sharded_head, config.partial_fc_rate)
    if isinstance(current, HeadParallel) and current.options == distribution.options:
        return current
    if current is not None:
        print(f">>>> sharded_head: the {type(current).__name__} distribution is replaced by the sharded head's")
    keras.distribution.set_distribution(distribution)
    batch, model = distribution.device_mesh.shape
    print(f">>>> Sharded head: classes split over {model} devices ({batch} copies), each batch over {batch * model}")
    return distribution


# ---------------------------------------------------------------------------------------------- the JAX step
def batch_sharding(distribution, global_batch_size):
    """How a global batch is laid out: its first axis split over every device of the distribution's mesh."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    if isinstance(distribution, HeadParallel):
        mesh, axes = distribution.device_mesh.backend_mesh, (BATCH, MODEL)
    else:
        mesh, axes = Mesh(np.asarray(jax.devices()), ("batch",)), "batch"
    if global_batch_size % mesh.size:
        raise ValueError(f"the global batch {global_batch_size} does not divide over {mesh.size} devices")
    return NamedSharding(mesh, PartitionSpec(axes))


def placed(values):
    """Under a ``HeadParallel``: the values with those not laid out over its mesh (variables of a model built before
    the distribution was set) replicated over it, so that one jitted step sees one mesh. Otherwise unchanged."""
    import jax

    distribution = keras.distribution.distribution()
    if not isinstance(distribution, HeadParallel):
        return values
    mesh = distribution.device_mesh.backend_mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(value):
        sharding = getattr(value, "sharding", None)
        on_mesh = isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh == mesh
        return value if on_mesh else jax.device_put(value, replicated)

    return jax.tree.map(place, values)


def sharded_partial_fc(stage, distribution=None):
    """The ``ShardedPartialFC`` of a stage whose Partial FC head is split by a ``HeadParallel``, or None (no such
    head, or shards too small to sample from their own classes: the step then samples the whole head)."""
    distribution = distribution or keras.distribution.distribution()
    head = stage.partial_fc_head
    if head is None or not isinstance(distribution, HeadParallel):
        return None
    layout = heads.head_layout(head, "kernel")
    if layout is None or layout.axes[head.class_axis] != MODEL:
        return None
    num_shards = distribution.device_mesh.shape[1]
    per_shard = head.kernel.shape[0] // head.loss_top_k // num_shards
    count = heads.partial_fc_num_sampled(per_shard, head.sample_rate)
    smallest = head.units - (num_shards - 1) * per_shard  # real classes of the last shard
    return ShardedPartialFC(stage, distribution, per_shard, count) if count <= smallest else None


class ShardedPartialFC:
    """Partial FC of a class-sharded ``PartialFCNormDense`` in the JAX step (see the module docstring).

    ``wrap(step)`` turns the runner's jitted update ``(state, batches) -> (state, logs)`` into one that samples the
    classes of the update's batches on each shard, gathers their kernel and slot rows, runs ``step`` on a state in
    which those rows stand for the kernel and its slots (the model's kernel variable replaced by ``rows``, the
    optimizer by ``optimizer``, a copy built for ``rows``), and scatters the updated rows back. ``partial_call``
    is the head's step output from the gathered rows, with the labels that ``wrap`` remapped already.
    """

    def __init__(self, stage, distribution, classes_per_shard, count):
        self.head = stage.partial_fc_head
        self.mesh = distribution.device_mesh.backend_mesh
        self.num_shards = distribution.device_mesh.shape[1]
        self.classes_per_shard, self.count = classes_per_shard, count
        kernel = self.head.kernel
        shape = (self.num_shards * count * self.head.loss_top_k, kernel.shape[1])
        layout = keras.distribution.TensorLayout((MODEL, None), distribution.device_mesh)
        with distribution.scope():
            self.rows = keras.Variable("zeros", shape, dtype=kernel.dtype, name="sampled_centers", layout=layout)
        trainable = stage.model.trainable_variables
        self.kernel_index = [id(variable) for variable in trainable].index(id(kernel))
        self.optimizer = self._optimizer_for_rows(stage.optimizer, trainable, distribution)
        self.slot_indices = self._slot_indices(stage.optimizer, kernel)
        self.step_index = [id(variable) for variable in stage.optimizer.variables].index(id(stage.optimizer.iterations))

    def _optimizer_for_rows(self, optimizer, trainable, distribution):
        """A copy of ``optimizer`` (same class and configuration, weight decay skipped for the same variables) built
        for the trainable variables with ``rows`` in place of the kernel. In the step every one of its variables is
        mapped to the values of ``optimizer``'s (its slot rows for the kernel's slots), never read: their buffers are
        freed."""
        variables = [self.rows if index == self.kernel_index else var for index, var in enumerate(trainable)]
        copy = optimizer.__class__.from_config(optimizer.get_config())
        excluded = [new for old, new in zip(trainable, variables) if not _decays(optimizer, old)]
        if excluded:
            copy.exclude_from_weight_decay(var_list=excluded)
        with distribution.scope():
            copy.build(variables)
        for variable in copy.variables:
            if variable.shape:
                variable.value.delete()
        return copy

    def _slot_indices(self, optimizer, kernel):
        """Positions of the kernel's slots in ``optimizer.variables``: where the copy's variable has the rows' shape."""
        mine, theirs = optimizer.variables, self.optimizer.variables
        indices = [index for index, (old, new) in enumerate(zip(mine, theirs)) if old.shape != new.shape]
        if len(mine) != len(theirs) or any(mine[index].shape != kernel.shape for index in indices):
            raise ValueError(
                f"Partial FC on a sharded head needs an optimizer whose slots have their variable's shape (SGD, Adam, "
                f"...); {type(optimizer).__name__}'s do not"
            )
        return indices

    def variable_lists(self, lists):
        """The runner's ``(trainable, non-trainable, optimizer, loss-state)`` variable lists as the wrapped step sees
        them: ``rows`` in place of the kernel, the copy's optimizer variables."""
        trainable, non_trainable, _, loss_state = lists
        trainable = [self.rows if index == self.kernel_index else var for index, var in enumerate(trainable)]
        return trainable, non_trainable, self.optimizer.variables, loss_state

    def partial_call(self, embeddings, labels, step):
        """The head's output over this step's sampled classes (the ``rows``, already gathered); the labels were
        remapped by ``wrap``."""
        return heads.cosines_of_centers(self.head, embeddings, self.rows), labels

    def partial_losses(self):
        """The head's kernel regularizer on the gathered rows: weight decay of the sampled centers only."""
        regularizer = self.head.kernel_regularizer
        return [] if regularizer is None else [regularizer(self.rows)]

    def sample(self, labels, step):
        """``(columns, remapped labels)`` of the update's labels (see ``sharded_partial_fc.sample_shards``)."""
        if labels.shape[0] > self.count:
            raise ValueError(
                f"Partial FC on {self.num_shards} shards samples {self.count} classes per shard, fewer than the "
                f"{labels.shape[0]} labels of an update: raise partial_fc_rate or split the head over fewer devices"
            )
        from keras_insightface.nn import sharded_partial_fc as shards

        options = dict(classes_per_shard=self.classes_per_shard, mesh=self.mesh, axis=MODEL)
        return shards.sample_shards(
            labels, step, num_classes=self.head.units, count=self.count, seed=self.head.seed, **options
        )

    def wrap(self, step):
        """The update of the sampled rows around ``step`` (see the class docstring)."""
        from keras_insightface.nn import sharded_partial_fc as shards

        options = dict(classes_per_shard=self.classes_per_shard, loss_top_k=self.head.loss_top_k, mesh=self.mesh)
        gather = functools.partial(shards.gather_shard_rows, axis=MODEL, **options)
        scatter = functools.partial(shards.scatter_shard_rows, axis=MODEL, **options)

        def rows_step(state, batches):
            trainable, non_trainable, optimizer_values, loss_values = state
            columns, remapped = self.sample(_update_labels(batches), optimizer_values[self.step_index])
            kernel, slots = trainable[self.kernel_index], {i: optimizer_values[i] for i in self.slot_indices}
            rows_trainable = _replaced(trainable, {self.kernel_index: gather(kernel, columns)})
            rows_optimizer = _replaced(optimizer_values, {i: gather(slot, columns) for i, slot in slots.items()})
            state = (rows_trainable, non_trainable, rows_optimizer, loss_values)
            (rows_trainable, non_trainable, rows_optimizer, loss_values), logs = step(
                state, _with_labels(batches, remapped)
            )
            new_kernel = scatter(kernel, columns, rows_trainable[self.kernel_index])
            trainable = _replaced(rows_trainable, {self.kernel_index: new_kernel})
            optimizer_values = _replaced(
                rows_optimizer, {i: scatter(slot, columns, rows_optimizer[i]) for i, slot in slots.items()}
            )
            return (trainable, non_trainable, optimizer_values, loss_values), logs

        return rows_step


def _decays(optimizer, variable):
    """Whether ``optimizer`` applies its weight decay to ``variable`` (Keras keeps the exclusions privately)."""
    return optimizer._use_weight_decay(variable)


def _replaced(values, replacements):
    return [replacements.get(index, value) for index, value in enumerate(values)]


def _update_labels(batches):
    """The labels of every batch of an update, in one vector."""
    import jax.numpy as jnp

    return jnp.concatenate([jnp.reshape(targets[data.LABEL_KEY], (-1,)) for _, targets in batches])


def _with_labels(batches, labels):
    """``batches`` with their labels replaced by consecutive pieces of ``labels``."""
    out, start = [], 0
    for images, targets in batches:
        size = targets[data.LABEL_KEY].shape[0]
        out.append((images, dict(targets, **{data.LABEL_KEY: labels[start : start + size]})))
        start += size
    return tuple(out)

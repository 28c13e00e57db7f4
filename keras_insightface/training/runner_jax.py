"""The JAX step runner: trains a ``stages.Stage`` on the JAX backend with one jitted, stateless step.

The step takes the values of every variable (model weights, batch-norm statistics, optimizer slots, loss state such
as center-loss centers) and returns their new values; the runner reads them from the Keras variables before a call
of ``steps_per_execution`` steps and writes them back after it, so callbacks, evaluation and checkpoints see the
model as on TensorFlow. Data parallelism is JAX's SPMD: with several devices, set
``keras.distribution.set_distribution(keras.distribution.DataParallel())`` before building the model (variables are
replicated); each global batch is then laid out over the devices along its first axis, and the jitted step computes
the global-batch mean exactly as one device would. ``tf.data`` still feeds the step, as NumPy. With
``Train(sharded_head=...)`` the distribution splits the cosine head's classes over the devices instead of replicating
it (``sharding``); a Partial FC head so split updates only its sampled rows (``sharding.ShardedPartialFC``).
"""

import contextlib

import jax
import keras
import numpy as np

from keras_insightface.data import pipeline as data
from keras_insightface.nn import losses
from keras_insightface.training import sharding as head_sharding
from keras_insightface.training.loop import EpochLoop


def _add(first, second):
    return first + second


def _values(variables):
    return [variable.value for variable in variables]


def _optimizer(stage, partial_fc):
    """The optimizer the step runs: the stage's, or its copy for the sampled rows of a sharded Partial FC head."""
    return stage.optimizer if partial_fc is None else partial_fc.optimizer


def _assign(variables, values):
    for variable, value in zip(variables, values):
        variable.assign(value)


class JaxStepRunner(EpochLoop):
    """Runs the steps and epochs of training stages on JAX (see the module docstring). ``accumulation`` batches make
    one update (gradients summed); ``clip_norm`` clips the global gradient norm of each update."""

    def __init__(self, steps_per_execution=1, verbose=1, accumulation=1, clip_norm=None):
        self.steps_per_execution, self.verbose = max(1, int(steps_per_execution)), verbose
        self.accumulation, self.clip_norm = max(1, int(accumulation)), clip_norm
        self.replicas = 1  # one global batch: the devices share it along its first axis

    def scope(self):
        """Where models and optimizers are created: the global Keras distribution, if one is set."""
        distribution = keras.distribution.distribution()
        return distribution.scope() if distribution is not None else contextlib.nullcontext()

    def distribute(self, dataset, global_batch_size, make_worker_dataset=None):
        """NumPy batches of a ``tf.data`` dataset, laid out over the devices of the Keras distribution (if set).

        With several processes (``jax.distributed``) and ``make_worker_dataset(batch_size, shard)``, each process
        reads and decodes only its own share of the files, batches of ``global_batch_size / processes``, which
        become its rows of the global batch."""
        distribution, processes = keras.distribution.distribution(), jax.process_count()
        if processes > 1 and make_worker_dataset is not None:
            if global_batch_size % processes:
                raise ValueError(f"the global batch {global_batch_size} does not divide among {processes} processes")
            dataset = make_worker_dataset(global_batch_size // processes, (processes, jax.process_index()))
        batches = dataset.as_numpy_iterator()
        if distribution is None:
            return batches
        sharding = head_sharding.batch_sharding(distribution, global_batch_size)
        if processes > 1:  # each process holds its own rows: assemble the global array from them
            put = lambda array: jax.make_array_from_process_local_data(sharding, array)  # noqa: E731
        else:
            put = lambda array: jax.device_put(array, sharding)  # noqa: E731
        return (jax.tree.map(put, batch) for batch in batches)

    def any_process(self, flags):
        """Element-wise: whether any JAX process of the run set each of ``flags`` (booleans). A collective: every
        process calls it at the same point of the run."""
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(np.asarray(flags, np.float32)).sum(axis=0) > 0

    # ------------------------------------------------------------------------------------------ the step
    def _state_variables(self, stage, partial_fc=None):
        """``(trainable, non-trainable, optimizer, loss-state)`` variable lists, in the step's state order (as the
        sharded Partial FC's step sees them when ``partial_fc`` is given)."""
        loss_state = [variable for spec in stage.specs.values() for variable in losses.state_variables(spec.fn)]
        model = stage.model
        lists = model.trainable_variables, model.non_trainable_variables, stage.optimizer.variables, loss_state
        return lists if partial_fc is None else partial_fc.variable_lists(lists)

    def _forward(self, stage, values, images, targets, step, partial_fc=None):
        """The stage's outputs on a batch from the given variable values; a Partial FC head (or ``partial_fc``, the
        head's sharded sampling) computes cosines over this step's sampled classes only, with the labels remapped to
        them. Returns (outputs, targets, non-trainable values, regularization losses)."""
        model = stage.model if stage.partial_fc_head is None else stage.train_model
        by_id = dict(values)
        trainable = [by_id[id(variable)] for variable in model.trainable_variables]
        non_trainable = [by_id[id(variable)] for variable in model.non_trainable_variables]
        outputs, non_trainable, model_losses = model.stateless_call(
            trainable, non_trainable, images, training=True, return_losses=True
        )
        new_values = dict(zip(map(id, model.non_trainable_variables), non_trainable))
        if stage.partial_fc_head is not None:  # its regularizer too: the head is not part of ``train_model``
            head, outputs = partial_fc or stage.partial_fc_head, dict(outputs)
            cosines, sampled = head.partial_call(outputs.pop("partial_fc_embedding"), targets[data.LABEL_KEY], step)
            outputs, targets = dict(outputs, arcface=cosines), dict(targets, **{data.LABEL_KEY: sampled})
            model_losses = [*model_losses, *head.partial_losses()]
        return outputs, targets, new_values, model_losses

    def _loss_function(self, stage, classes, partial_fc=None):
        """``f(trainable values, state, images, targets) -> (scaled loss, (logs, non-trainable values, loss state))``
        for ``jax.value_and_grad``. Every variable is mapped to its traced value in a ``keras.StatelessScope``, so the
        loss's own state updates (``assign``) are recorded there instead of happening. ``partial_fc``: the sharded
        Partial FC of the stage, whose variable lists and optimizer the step uses."""
        trainable_vars, non_trainable_vars, optimizer_vars, loss_vars = self._state_variables(stage, partial_fc)
        specs, shares, optimizer = stage.specs, self.accumulation, _optimizer(stage, partial_fc)

        def loss_function(trainable, non_trainable, optimizer_values, loss_values, images, targets):
            mapping = list(zip(trainable_vars, trainable)) + list(zip(non_trainable_vars, non_trainable))
            mapping += list(zip(optimizer_vars, optimizer_values)) + list(zip(loss_vars, loss_values))
            with keras.StatelessScope(state_mapping=mapping) as scope:
                values = [(id(variable), value) for variable, value in mapping]
                outputs, targets, new_values, model_losses = self._forward(
                    stage, values, images, targets, optimizer.iterations, partial_fc
                )
                logs = {
                    name + "_loss": spec.value(targets, outputs[name], classes, shares) for name, spec in specs.items()
                }
                total = sum(specs[name].weight * logs[name + "_loss"] for name in specs)
                regular = (
                    sum(keras.ops.cast(loss, "float32") for loss in model_losses) / shares if model_losses else 0.0
                )
                logs["loss"], logs["regular_loss"] = total + regular, keras.ops.convert_to_tensor(regular, "float32")
                scaled = optimizer.scale_loss(logs["loss"])
                new_loss_values = [scope.get_current_value(variable) for variable in loss_vars]
            if stage.accuracy_output:
                predicted = keras.ops.argmax(outputs[stage.accuracy_output][:, :classes], axis=-1)
                hits = keras.ops.cast(predicted == keras.ops.cast(targets[data.LABEL_KEY], predicted.dtype), "float32")
                logs["accuracy"] = keras.ops.mean(hits) / shares
            non_trainable = [
                new_values.get(id(variable), value) for variable, value in zip(non_trainable_vars, non_trainable)
            ]
            return scaled, (logs, non_trainable, new_loss_values)

        return loss_function

    def _clipped(self, optimizer, gradients, optimizer_values):
        """Gradients scaled to a global norm of at most ``clip_norm``, measured on the unscaled gradient."""
        scale = 1.0
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            with keras.StatelessScope(state_mapping=list(zip(optimizer.variables, optimizer_values))):
                scale = keras.ops.convert_to_tensor(optimizer.dynamic_scale)
        norm = keras.ops.sqrt(sum(keras.ops.sum(keras.ops.square(grad / scale)) for grad in gradients))
        factor = keras.ops.minimum(1.0, self.clip_norm / keras.ops.maximum(norm, 1e-12))
        return [grad * factor for grad in gradients]

    def _step(self, stage, classes):
        """The jitted update: for each of the ``accumulation`` batches forward, losses and gradients, summed; then
        [clipping and] the optimizer's stateless update. ``state -> (new state, logs)``. A class-sharded Partial FC
        head updates only its sampled rows (``sharding.ShardedPartialFC``)."""
        partial_fc = head_sharding.sharded_partial_fc(stage)
        optimizer = _optimizer(stage, partial_fc)
        grad_function = jax.value_and_grad(self._loss_function(stage, classes, partial_fc), has_aux=True)

        def step(state, batches):
            trainable, non_trainable, optimizer_values, loss_values = state
            gradients, logs = None, None
            for images, targets in batches:
                (_, aux), batch_gradients = grad_function(
                    trainable, non_trainable, optimizer_values, loss_values, images, targets
                )
                batch_logs, non_trainable, loss_values = aux
                gradients = batch_gradients if gradients is None else jax.tree.map(_add, gradients, batch_gradients)
                logs = batch_logs if logs is None else jax.tree.map(_add, logs, batch_logs)
            if self.clip_norm:
                gradients = self._clipped(optimizer, gradients, optimizer_values)
            trainable, optimizer_values = optimizer.stateless_apply(optimizer_values, gradients, trainable)
            return (trainable, non_trainable, optimizer_values, loss_values), logs

        return jax.jit(step if partial_fc is None else partial_fc.wrap(step), donate_argnums=0)

    def train_function(self, stage, classes):
        """``run_steps(iterator, num_steps)``: that many updates (each on ``accumulation`` batches) from the current
        variable values, written back at the end; returns the mean logs of the updates."""
        variable_lists = self._state_variables(stage)
        step = self._step(stage, classes)

        def run_steps(iterator, num_steps):
            state = head_sharding.placed(tuple(_values(variables) for variables in variable_lists))
            sums = None
            try:
                for _ in range(num_steps):
                    batches = tuple(next(iterator) for _ in range(self.accumulation))
                    state, logs = step(state, batches)
                    sums = logs if sums is None else jax.tree.map(_add, sums, logs)
            finally:  # also on an interrupt: the variables' own buffers were donated to the first step
                for variables, values in zip(variable_lists, state):
                    _assign(variables, values)
            return {key: float(value) / num_steps for key, value in sums.items()}

        return run_steps

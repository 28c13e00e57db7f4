"""The TensorFlow step runner: trains a ``stages.Stage`` under the current ``tf.distribute`` strategy.

One loop serves one device, ``MirroredStrategy`` and ``MultiWorkerMirroredStrategy`` (Keras 3 ``model.fit`` does not
run under the latter): a ``tf.function`` runs ``steps_per_execution`` steps with ``strategy.run``; each replica
divides its mean loss by the replica count, so the all-reduce of the gradients is the gradient of the global-batch
mean, exactly as on one device. Keras callbacks are driven through a ``keras.callbacks.CallbackList`` with the same
events and logs as ``model.fit``. TensorFlow-only: this is the seam where a runner of another backend plugs in.
"""

import contextlib
import functools
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_insightface.data import pipeline as data
from keras_insightface.nn import fast_kernels
from keras_insightface.training.loop import EpochLoop


def num_workers(strategy):
    """Processes taking part in a multi-worker strategy (1 for single-machine strategies)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return 1
    cluster = resolver.cluster_spec().as_dict()
    return max(1, sum(len(cluster.get(job, ())) for job in ("chief", "worker")))


def _add(first, second):
    """Sum of two gradients of one variable; sparse ``IndexedSlices`` (a Partial FC head) stay sparse."""
    if isinstance(first, tf.IndexedSlices) and isinstance(second, tf.IndexedSlices):
        return tf.IndexedSlices(
            tf.concat([first.values, second.values], 0),
            tf.concat([first.indices, second.indices], 0),
            first.dense_shape,
        )
    if first is None:
        return second
    return first if second is None else tf.convert_to_tensor(first) + tf.convert_to_tensor(second)


class StepRunner(EpochLoop):
    """Runs the steps and epochs of training stages; see the module docstring.

    ``steps_per_execution`` steps run per ``tf.function`` call (fewer Python round trips); ``jit_compile`` compiles
    the replica step with XLA; ``fast`` traces it with ``fast_kernels`` (fused batch norm, PReLU and momentum SGD).
    """

    def __init__(
        self, strategy, steps_per_execution=1, jit_compile=False, verbose=1, accumulation=1, clip_norm=None, fast=True
    ):
        self.strategy, self.replicas = strategy, strategy.num_replicas_in_sync
        self.steps_per_execution, self.jit_compile = max(1, int(steps_per_execution)), jit_compile
        self.verbose, self.accumulation, self.clip_norm = verbose, max(1, int(accumulation)), clip_norm
        self.kernels = fast_kernels.training_kernels if fast else contextlib.nullcontext

    def scope(self):
        """Where models and optimizers are created: the strategy's scope (their variables are mirrored)."""
        return self.strategy.scope()

    # ------------------------------------------------------------------------------------------ input
    def distribute(self, dataset, global_batch_size, make_worker_dataset=None):
        """The per-replica input. With several workers and ``make_worker_dataset(batch_size, shard)``, each worker
        reads and decodes only its own shard of the files (tf.distribute's auto-sharding would decode everything on
        every worker); otherwise ``dataset`` is split over the replicas as it is."""
        if num_workers(self.strategy) == 1 or make_worker_dataset is None:
            return self.strategy.experimental_distribute_dataset(dataset)

        def worker_dataset(context):
            batch_size = context.get_per_replica_batch_size(global_batch_size)
            shard = (context.num_input_pipelines, context.input_pipeline_id)
            return make_worker_dataset(batch_size, shard)

        return self.strategy.distribute_datasets_from_function(worker_dataset)

    def any_process(self, flags):
        """Element-wise: whether any worker of the strategy set each of ``flags`` (booleans). A collective: every
        worker calls it at the same point of the run."""
        return self._summed_over_replicas(tf.constant(np.asarray(flags, np.float32))).numpy() > 0

    @functools.cached_property
    def _summed_over_replicas(self):
        """A traced all-reduce (an eager one takes twice as long: 5.5 against 2.4 ms on loopback)."""
        strategy = self.strategy
        return tf.function(lambda local: strategy.reduce("SUM", strategy.run(tf.identity, args=(local,)), axis=None))

    # ------------------------------------------------------------------------------------------ the step
    def _forward(self, stage, images, targets):
        """The stage model's outputs on a batch; a Partial FC head computes cosines over this step's sampled
        classes only, with the labels remapped to them."""
        if stage.partial_fc_head is None:
            return stage.model(images, training=True), targets
        outputs = dict(stage.train_model(images, training=True))
        cosines, sampled_labels = stage.partial_fc_head.partial_call(
            outputs.pop("partial_fc_embedding"), targets[data.LABEL_KEY], stage.optimizer.iterations
        )
        return dict(outputs, arcface=cosines), dict(targets, **{data.LABEL_KEY: sampled_labels})

    def _losses_and_gradients(self, stage, classes, images, targets):
        """One batch on this replica: ``(gradients of the optimizer-scaled loss, logs)``; losses are this replica's
        share of the global-batch mean, divided by the number of accumulated batches."""
        model, specs, shares = stage.model, stage.specs, self.replicas * self.accumulation
        with tf.GradientTape() as tape:
            outputs, targets = self._forward(stage, images, targets)
            logs = {name + "_loss": spec.value(targets, outputs[name], classes, shares) for name, spec in specs.items()}
            total = tf.add_n([specs[name].weight * logs[name + "_loss"] for name in specs])
            regular = tf.add_n([tf.cast(ll, tf.float32) for ll in model.losses]) / shares if model.losses else 0.0
            logs["loss"], logs["regular_loss"] = total + regular, tf.convert_to_tensor(regular, tf.float32)
            scaled = stage.optimizer.scale_loss(logs["loss"])
        if stage.accuracy_output:
            logits = outputs[stage.accuracy_output][:, :classes]
            hits = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), targets[data.LABEL_KEY])
            logs["accuracy"] = tf.reduce_mean(tf.cast(hits, tf.float32)) / self.accumulation
        return tape.gradient(scaled, model.trainable_variables), logs

    def _clipped(self, optimizer, gradients):
        """Gradients whose global norm, over the whole (all-replica) gradient, is at most ``clip_norm``.

        The replicas' gradients are summed here to measure the norm the update will have; each replica then hands on
        its share (1 / replicas) of the clipped sum, which the optimizer's own all-reduce adds up again. Under loss
        scaling the norm is measured on the unscaled gradient.
        """
        present = [index for index, grad in enumerate(gradients) if grad is not None]
        summed = [tf.convert_to_tensor(gradients[index]) for index in present]
        if self.replicas > 1:
            summed = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, summed)
        scale = optimizer.dynamic_scale if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) else 1.0
        clipped, _ = tf.clip_by_global_norm([grad / scale for grad in summed], self.clip_norm)
        gradients = list(gradients)
        for index, grad in zip(present, clipped):
            gradients[index] = grad * scale / self.replicas
        return gradients

    def _replica_step(self, stage, classes, autograph):
        """The function one replica runs per update: for each of its ``accumulation`` batches, one after the other,
        forward, losses and gradients, summed; then [clipping and] the optimizer update. Returns the update's logs."""
        optimizer, trainable = stage.optimizer, stage.model.trainable_variables

        def step(batches):
            gradients, logs = None, None
            for images, targets in batches:
                if gradients is not None:  # the next batch starts when this one's gradients exist: peak memory of one
                    with tf.control_dependencies([grad for grad in tf.nest.flatten(gradients) if grad is not None]):
                        images = tf.identity(images)
                batch_gradients, batch_logs = self._losses_and_gradients(stage, classes, images, targets)
                gradients = (
                    batch_gradients
                    if gradients is None
                    else [_add(aa, bb) for aa, bb in zip(gradients, batch_gradients)]
                )
                logs = batch_logs if logs is None else {key: logs[key] + batch_logs[key] for key in logs}
            if self.clip_norm:
                gradients = self._clipped(optimizer, gradients)
            optimizer.apply_gradients(zip(gradients, trainable))
            return logs

        return tf.function(step, jit_compile=self.jit_compile, autograph=autograph)

    def train_function(self, stage, classes):
        """``run_steps(iterator, num_steps)``: that many updates (each on ``accumulation`` batches); returns their mean
        logs. The step is traced without autograph, whose source conversion costs seconds per trace (a third of an
        r100 trace); a loss or layer whose Python code branches on tensor values gets a step traced with autograph."""
        compiled = self._steps_function(stage, classes, autograph=False)

        def run_steps(iterator, num_steps):
            nonlocal compiled
            try:
                return compiled(iterator, num_steps)
            except tf.errors.OperatorNotAllowedInGraphError as error:  # raised while tracing: no step has run
                warnings.warn(f"training step traced again with autograph (slower to trace): {error}", stacklevel=2)
                compiled = self._steps_function(stage, classes, autograph=True)
                return compiled(iterator, num_steps)

        return run_steps

    def _steps_function(self, stage, classes, autograph):
        """The ``tf.function(iterator, num_steps)`` behind ``train_function``; ``num_steps`` is a Python int (one
        trace per value; the steps are unrolled)."""
        strategy, accumulation, kernels = self.strategy, self.accumulation, self.kernels
        replica_step = self._replica_step(stage, classes, autograph)
        log_keys = ["loss", "regular_loss"] + [name + "_loss" for name in stage.specs]
        log_keys += ["accuracy"] if stage.accuracy_output else []
        reductions = {key: "MEAN" if key == "accuracy" else "SUM" for key in log_keys}  # losses are pre-divided

        @tf.function(autograph=autograph)
        def run_steps(iterator, num_steps):
            sums = {key: tf.constant(0.0) for key in log_keys}
            for _ in range(num_steps):
                batches = tuple(next(iterator) for _ in range(accumulation))
                with kernels():  # the step is traced here: with the fast kernels for BN, PReLU and SGD
                    per_replica = strategy.run(replica_step, args=(batches,))
                sums = {
                    key: sums[key] + strategy.reduce(reductions[key], per_replica[key], axis=None) for key in log_keys
                }
            return {key: value / num_steps for key, value in sums.items()}

        return run_steps

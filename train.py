"""``Train``: the scheduler that builds head, dataset and callbacks per stage and runs our own training loop.

One loop serves one device, ``MirroredStrategy`` and ``MultiWorkerMirroredStrategy`` (Keras 3 ``model.fit`` does
not run under the latter, SPEC §9): a ``tf.function`` step run with ``strategy.run``, losses averaged over the
global batch, Keras callbacks driven through ``keras.callbacks.CallbackList``.

    tt = train.Train(data_path, "mobilenet.keras", eval_paths, basic_model=models.buildin_models("MobileNet"))
    tt.train([{"loss": losses.ArcfaceLoss(), "optimizer": "adam", "epoch": 5}], 0)
"""

import argparse
import os
import re
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out of training logs

import keras
import numpy as np
import tensorflow as tf

import data
import evals
import losses
import models
import myCallbacks

CATEGORICAL_KERAS_LOSSES = (keras.losses.CategoricalCrossentropy, keras.losses.CategoricalFocalCrossentropy)
EMBEDDING_LAYER = "embedding"


class LossSpec:
    """One model output's loss: the function, its weight and which target it compares to ("label"/"embedding")."""

    def __init__(self, fn, weight=1.0, target="label"):
        self.fn, self.weight, self.target = fn, float(weight), target


def _head_type(loss, explicit_type=None):
    if explicit_type:
        return explicit_type
    return losses.get_head_type(loss)


def _needs_one_hot(loss_fn):
    """Keras' categorical losses want one-hot labels; we build them on the device, never on the host."""
    return isinstance(loss_fn, CATEGORICAL_KERAS_LOSSES)


def _resolve_save_path(save_path):
    """``name`` -> ``checkpoints/name.keras``; a path with a folder is kept; ``.h5`` is kept if asked for."""
    if not os.path.splitext(save_path)[1]:
        save_path += ".keras"
    if not os.path.dirname(save_path):
        save_path = os.path.join("checkpoints", save_path)
    return save_path


def extract_basic_model(model, layer=EMBEDDING_LAYER):
    """The input -> embedding sub-model of a full training model (layer name or index), sharing its weights."""
    output = model.get_layer(layer).output if isinstance(layer, str) else model.layers[layer].output
    return keras.Model(model.inputs[0], output, name=model.name + "_basic")


def _task_id(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    return getattr(resolver, "task_id", 0) or 0


def _num_workers(strategy):
    """Processes taking part in a multi-worker strategy (1 for single-machine strategies)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return 1
    cluster = resolver.cluster_spec().as_dict()
    return max(1, sum(len(cluster.get(job, ())) for job in ("chief", "worker")))


def _is_chief(strategy):
    """True unless this process is a non-chief worker of a multi-worker strategy (worker 0 is the chief)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().as_dict()
    )


def _partial_fc_head(model, specs):
    """The ``PartialFCNormDense`` head of ``model`` when the arcface output trains with Partial FC, else None."""
    if "arcface" not in specs:
        return None
    head = model.get_layer("arcface")
    return head if isinstance(head, losses.PartialFCNormDense) and head.sample_rate < 1 else None


def _lazy_optimizer(optimizer):
    """Partial FC: SGD/Adam that update only the sampled rows and their slots (Keras' own touch every row)."""
    lazy = {keras.optimizers.SGD: losses.LazySGD, keras.optimizers.Adam: losses.LazyAdam}.get(type(optimizer))
    return optimizer if lazy is None else lazy.from_config(optimizer.get_config())


class Train:
    """Multi-stage face-recognition trainer; see the README for every argument and scheduler key."""

    def __init__(
        self,
        data_path,
        save_path,
        eval_paths=(),
        basic_model=None,
        model=None,
        compile=True,
        output_weight_decay=0,
        custom_objects=None,
        batch_size=128,
        lr_base=0.001,
        lr_decay=0.05,
        lr_decay_steps=0,
        lr_min=0.0,
        lr_warmup_steps=0,
        eval_freq=1,
        random_status=0,
        random_crop=(100, 100, 3),
        image_per_class=0,
        mixup_alpha=0,
        random_cutout_mask_area=0.0,
        pretrained=None,
        steps_per_execution=1,
        jit_compile=False,
        mixed_precision=None,
        partial_fc_rate=1.0,
        resume=True,
        cache_dir=None,
        eval_batch_size=128,
        eval_image_scale=data.SEEDS_SCALE,
        verify_images=False,
        verbose=1,
        seed=None,
    ):
        self.strategy = tf.distribute.get_strategy()
        self.num_replicas = self.strategy.num_replicas_in_sync
        self.is_chief = _is_chief(self.strategy)
        self.save_path = _resolve_save_path(save_path)
        if not self.is_chief:  # other workers write their (identical) files aside, so the chief's are never clobbered
            self.save_path = os.path.join(
                os.path.dirname(self.save_path), f"worker_{_task_id(self.strategy)}", os.path.basename(self.save_path)
            )
        self.stem = os.path.splitext(os.path.basename(self.save_path))[0]
        self.save_dir = os.path.dirname(self.save_path)
        os.makedirs(self.save_dir, exist_ok=True)
        self.hist_path = os.path.join(self.save_dir, self.stem + "_hist.json")
        self.centers_path = os.path.join(self.save_dir, self.stem + "_centers.npy")
        self.eval_paths = list(eval_paths or [])
        self.batch_size, self.global_batch_size = batch_size, batch_size * self.num_replicas
        self.lr_base, self.lr_decay, self.lr_decay_steps = lr_base, lr_decay, lr_decay_steps
        self.lr_min, self.lr_warmup_steps, self.eval_freq = lr_min, lr_warmup_steps, eval_freq
        self.output_weight_decay, self.custom_objects = output_weight_decay, custom_objects or {}
        self.steps_per_execution, self.jit_compile, self.verbose = (
            max(1, int(steps_per_execution)),
            jit_compile,
            verbose,
        )
        self.eval_batch_size, self.eval_image_scale = eval_batch_size, eval_image_scale
        self.data_kwargs = dict(
            random_status=random_status,
            random_crop=random_crop,
            random_cutout_mask_area=random_cutout_mask_area,
            mixup_alpha=mixup_alpha,
            cache_dir=cache_dir or os.path.join(self.save_dir, ".cache"),
            verify_images=verify_images,
            seed=seed,
        )
        self.image_per_class = image_per_class
        if not 0 < partial_fc_rate <= 1:
            raise ValueError(f"partial_fc_rate must be in (0, 1], got {partial_fc_rate}")
        if partial_fc_rate < 1 and mixup_alpha > 0:
            raise ValueError("partial_fc_rate < 1 does not support mixup_alpha > 0")
        self.partial_fc_rate = partial_fc_rate
        self.optimizer, self.model, self.heads = None, None, {}
        self.center_loss, self.stop_reason = None, None
        self._datasets = {}

        self.history = myCallbacks.MyHistory(self.hist_path)
        self._resume_pending = resume and os.path.exists(self.save_path) and self.history.completed_epochs > 0
        self._first_train = True
        if self._resume_pending:
            print(f">>>> Resuming from checkpoint {self.save_path} (pass resume=False to start over)")
            basic_model, model = EMBEDDING_LAYER, self.save_path
        self._init_models(basic_model, model, compile, pretrained)
        if mixed_precision:
            self._use_mixed_precision(mixed_precision)
        self.reset_dataset(data_path)

    # ----------------------------------------------------------------------------------------------- models
    def _load(self, path, compile=False):
        return keras.models.load_model(path, custom_objects=self.custom_objects, compile=compile)

    def _init_models(self, basic_model, model, compile, pretrained):
        """The four combinations of the seeds' table: scratch, basic model file, full model file/structure."""
        with self.strategy.scope():
            if model is not None:
                self.model = self._load(model, compile=compile) if isinstance(model, str) else model
                self.basic_model = extract_basic_model(
                    self.model, basic_model if basic_model is not None else EMBEDDING_LAYER
                )
                restored = getattr(self.model, "optimizer", None)
                self.optimizer = restored if compile and restored is not None and restored.built else None
                if self.optimizer is not None:  # its slots belong to exactly these variables: keep them on resume
                    self.optimizer._insightface_var_ids = [id(var) for var in self.model.trainable_variables]
                for layer in self.model.layers[len(self.basic_model.layers) :]:
                    self.heads[layer.name] = layer
            elif isinstance(basic_model, str):
                self.basic_model = self._load(basic_model)
            elif isinstance(basic_model, keras.Model):
                self.basic_model = basic_model
            else:
                raise ValueError("give basic_model (a model or a saved basic model file) or model (a saved full model)")
            if pretrained:
                self.basic_model.load_weights(pretrained)
        self.img_shape = tuple(self.basic_model.input_shape[1:3])
        self.emb_shape = int(self.basic_model.output_shape[-1])

    def _use_mixed_precision(self, policy):
        """Compute the backbone in float16/bfloat16; the embedding, heads and losses stay float32."""
        keras.mixed_precision.set_global_policy(policy)
        with self.strategy.scope():
            self.basic_model = models.convert_to_mixed_float16(self.basic_model, policy)

    def reset_dataset(self, data_path):
        """Switch the training data (e.g. to a cleaned ``data_drop_top_k`` output); heads are rebuilt if classes change."""
        self.data_path = data_path
        self._datasets = {}
        self.train_ds = self._dataset(0)
        self.classes = self.train_ds.classes
        self.steps_per_epoch = self.train_ds.steps_per_epoch
        self.has_embeddings = self.train_ds.embedding_dim > 0

    def _dataset(self, image_per_class):
        if image_per_class not in self._datasets:
            if isinstance(self.data_path, data.TrainDataset):
                self._datasets[image_per_class] = self.data_path
            else:
                self._datasets[image_per_class] = self._prepare_dataset(self.global_batch_size, image_per_class)
        return self._datasets[image_per_class]

    def _prepare_dataset(self, batch_size, image_per_class, shard=None):
        return data.prepare_dataset(
            self.data_path,
            batch_size=batch_size,
            img_shape=self.img_shape,
            image_per_class=image_per_class,
            shard=shard,
            **self.data_kwargs,
        )

    def _distribute(self, train_ds, image_per_class):
        """The per-replica input. Several workers each read and decode only their own shard of the files; a single
        pipeline over all of them (tf.distribute's auto-sharding) would decode everything on every worker."""
        if _num_workers(self.strategy) == 1 or isinstance(self.data_path, data.TrainDataset):
            return self.strategy.experimental_distribute_dataset(train_ds.dataset)

        def worker_dataset(context):
            batch_size = context.get_per_replica_batch_size(self.global_batch_size)
            shard = (context.num_input_pipelines, context.input_pipeline_id)
            return self._prepare_dataset(batch_size, image_per_class, shard).dataset

        return self.strategy.distribute_datasets_from_function(worker_dataset)

    def _output_regularizer(self):
        """``output_weight_decay``: 0 none, (0, 1) that value, >= 1 a multiplier of the basic model's L2 (SPEC §7)."""
        wd = self.output_weight_decay
        if wd <= 0:
            return None
        if wd >= 1:
            basic_l2 = models.get_l2_regularizer_value(self.basic_model)
            return keras.regularizers.L2(basic_l2 * wd) if basic_l2 else None
        return keras.regularizers.L2(wd / 2)

    def _head_layer(self, name, make):
        """Reuse a head layer across stages (keeps its weights) unless its configuration changed."""
        layer = make()
        old = self.heads.get(name)
        if old is not None and old.get_config() == layer.get_config():
            return old
        self.heads[name] = layer
        return layer

    def _build_model(self, head_type, loss, loss_top_k, centerloss, triplet, distill):
        """Basic model + main head + optional center / triplet / distill outputs, as one dict-output model."""
        embedding = self.basic_model.output
        outputs = {}
        if head_type == "arcface":
            append_norm = getattr(loss, "append_norm", False)
            head_kwargs = dict(loss_top_k=loss_top_k, append_norm=append_norm, name="arcface")
            if self.partial_fc_rate < 1:  # only the sampled centers are computed and updated in training steps
                make_head = lambda: losses.PartialFCNormDense(  # noqa: E731
                    self.classes,
                    sample_rate=self.partial_fc_rate,
                    kernel_regularizer=self._output_regularizer(),
                    **head_kwargs,
                )
            else:
                make_head = lambda: losses.NormDense(self.classes, self._output_regularizer(), **head_kwargs)  # noqa: E731
            outputs["arcface"] = self._head_layer("arcface", make_head)(embedding)
        elif head_type == "softmax":
            activation = "linear" if getattr(loss, "from_logits", False) else "softmax"
            outputs["softmax"] = self._head_layer(
                "softmax",
                lambda: keras.layers.Dense(
                    self.classes,
                    activation=activation,
                    kernel_regularizer=self._output_regularizer(),
                    dtype="float32",
                    name="softmax",
                ),
            )(embedding)
        elif head_type == "distill":
            outputs["distill_embedding"] = self._distill_output(embedding)
        elif head_type in ("triplet", "center"):
            outputs[head_type + "_embedding"] = embedding
        else:
            raise ValueError(f"unknown head type {head_type!r}: use arcface, softmax, triplet, center or distill")
        if centerloss and head_type != "center":
            outputs["center_embedding"] = embedding
        if triplet and head_type != "triplet":
            outputs["triplet_embedding"] = embedding
        if distill and self.has_embeddings and head_type != "distill":
            outputs["distill_embedding"] = self._distill_output(embedding)
        return keras.Model(
            self.basic_model.inputs[0],
            outputs,
            name=re.sub(r"^[^A-Za-z0-9.]+|[^A-Za-z0-9_.-]", "", self.stem) or "model",
        )

    def _distill_output(self, embedding):
        """The student embedding, mapped by a Dense ``distill_emb_map_layer`` when the teacher's size differs."""
        teacher_dim = self.train_ds.embedding_dim
        if teacher_dim == self.emb_shape:
            return embedding
        return self._head_layer(
            "distill_emb_map_layer",
            lambda: keras.layers.Dense(teacher_dim, use_bias=False, dtype="float32", name="distill_emb_map_layer"),
        )(embedding)

    def _make_center_loss(self, alpha=0.5):
        initial = self.centers_path if os.path.exists(self.centers_path) else None
        return losses.CenterLoss(self.classes, self.emb_shape, alpha=alpha, initial_file=initial)

    def _loss_specs(self, head_type, loss, loss_weight, centerloss, triplet, alpha, distill):
        specs = {}
        main_name = head_type if head_type in ("arcface", "softmax") else head_type + "_embedding"
        if head_type == "center" and isinstance(loss, losses.CenterLoss):
            self.center_loss = loss
            if os.path.exists(self.centers_path):
                loss.centers.assign(np.load(self.centers_path, allow_pickle=False))
        target = "embedding" if head_type == "distill" else "label"
        specs[main_name] = LossSpec(loss, loss_weight, target)
        if centerloss and head_type != "center":
            if self.center_loss is None or self.center_loss.num_classes != self.classes:
                self.center_loss = self._make_center_loss()
            specs["center_embedding"] = LossSpec(self.center_loss, centerloss)
        if triplet and head_type != "triplet":
            specs["triplet_embedding"] = LossSpec(losses.BatchHardTripletLoss(alpha), triplet)
        if distill and self.has_embeddings and head_type != "distill":
            specs["distill_embedding"] = LossSpec(losses.distiller_loss_cosine, distill, "embedding")
        return specs

    # --------------------------------------------------------------------------------------------- optimizer
    def _prepare_optimizer(self, optimizer, model):
        """Stage optimizer (None keeps the last); a fresh copy when the trainable variables changed."""
        if optimizer is None:
            optimizer = self.optimizer if self.optimizer is not None else "adam"
        if isinstance(optimizer, str):
            optimizer = keras.optimizers.get({"class_name": optimizer, "config": {"learning_rate": self.lr_base}})
        if self.partial_fc_rate < 1:
            optimizer = _lazy_optimizer(optimizer)
        if keras.mixed_precision.global_policy().name == "mixed_float16" and not isinstance(
            optimizer, keras.optimizers.LossScaleOptimizer
        ):
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        trainable_ids = [id(var) for var in model.trainable_variables]
        if optimizer.built and getattr(optimizer, "_insightface_var_ids", None) != trainable_ids:
            optimizer = optimizer.__class__.from_config(optimizer.get_config())
        if not optimizer.built:
            with self.strategy.scope():
                optimizer.build(model.trainable_variables)
        optimizer._insightface_var_ids = trainable_ids
        self.optimizer = optimizer
        return optimizer

    # -------------------------------------------------------------------------------------------- train step
    def _make_step_fn(self, model, specs, optimizer):
        """A ``tf.function`` running ``n`` steps on a distributed iterator; returns the mean logs of those steps."""
        strategy, replicas = self.strategy, self.num_replicas
        trainable = model.trainable_variables
        classes = self.classes
        partial_head = _partial_fc_head(model, specs)
        if partial_head is not None:  # run everything but the full cosine head; it is computed on sampled classes
            step_outputs = {key: value for key, value in model.output.items() if key != "arcface"}
            model = keras.Model(model.inputs, dict(step_outputs, partial_fc_embedding=partial_head.input))
        acc_output = self._acc_output(specs)
        log_keys = ["loss", "regular_loss"] + [name + "_loss" for name in specs] + (["accuracy"] if acc_output else [])
        reductions = {key: "MEAN" if key == "accuracy" else "SUM" for key in log_keys}  # losses are pre-divided

        def replica_loss(fn, y_true, prediction, sample_weight=None):
            """This replica's mean loss divided by the replica count, so the sum over replicas is the global mean.

            Keras ``Loss`` objects are called through ``.call`` (per-sample values) and reduced here, the same way
            for every loss, instead of relying on each loss's own reduction and distribution scaling.
            """
            value = fn.call(y_true, prediction) if isinstance(fn, keras.losses.Loss) else fn(y_true, prediction)
            if sample_weight is not None:
                value = value * sample_weight
            return tf.reduce_mean(value) / replicas

        def loss_value(spec, targets, prediction):
            y_true = targets[spec.target]
            mix = targets.get("mix")
            if _needs_one_hot(spec.fn):
                y_true = tf.one_hot(y_true, classes)
            if mix is None or spec.target != "label":
                return replica_loss(spec.fn, y_true, prediction)
            y_other = tf.one_hot(targets["label_b"], classes) if _needs_one_hot(spec.fn) else targets["label_b"]
            return replica_loss(spec.fn, y_true, prediction, mix) + replica_loss(spec.fn, y_other, prediction, 1 - mix)

        def replica_step(images, targets):
            with tf.GradientTape() as tape:
                outputs = model(images, training=True)
                if partial_head is not None:
                    cosines, sampled_labels = partial_head.partial_call(
                        outputs.pop("partial_fc_embedding"), targets["label"], optimizer.iterations
                    )
                    outputs["arcface"], targets = cosines, dict(targets, label=sampled_labels)
                logs = {name + "_loss": loss_value(spec, targets, outputs[name]) for name, spec in specs.items()}
                total = tf.add_n([specs[name].weight * logs[name + "_loss"] for name in specs])
                regular = (
                    tf.add_n([tf.cast(ll, tf.float32) for ll in model.losses]) / replicas
                    if model.losses
                    else tf.constant(0.0)
                )
                scaled = optimizer.scale_loss(total + regular)
            grads = tape.gradient(scaled, trainable)
            optimizer.apply_gradients(zip(grads, trainable))
            logs["loss"], logs["regular_loss"] = total + regular, regular
            if acc_output:
                logits = outputs[acc_output][:, :classes]
                hits = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), targets["label"])
                logs["accuracy"] = tf.reduce_mean(tf.cast(hits, tf.float32))
            return logs

        replica_step = tf.function(replica_step, jit_compile=self.jit_compile)

        @tf.function
        def run_steps(iterator, num_steps):
            sums = {key: tf.constant(0.0) for key in log_keys}
            for _ in tf.range(num_steps):
                images, targets = next(iterator)
                per_replica = strategy.run(replica_step, args=(images, targets))
                sums = {
                    key: sums[key] + strategy.reduce(reductions[key], per_replica[key], axis=None) for key in log_keys
                }
            return {key: value / tf.cast(num_steps, tf.float32) for key, value in sums.items()}

        return run_steps

    @staticmethod
    def _acc_output(specs):
        return next((name for name in ("arcface", "softmax") if name in specs), None)

    # ------------------------------------------------------------------------------------------------ loops
    def _callbacks(self, model, history, center_loss):
        lr_scheduler = myCallbacks.build_lr_scheduler(
            self.lr_base, self.lr_decay, self.lr_decay_steps, self.lr_min, self.lr_warmup_steps, self.steps_per_epoch
        )
        eval_callbacks = self._eval_callbacks()
        checkpoint = myCallbacks.AtomicCheckpoint(self.save_path)
        center_saver = [CenterSaver(center_loss, self.centers_path)] if center_loss is not None else []
        self.nan_guard, self.gently_stop = myCallbacks.NanLossGuard(), myCallbacks.GentlyStop()
        callbacks = [
            lr_scheduler,
            self.nan_guard,
            *eval_callbacks,
            checkpoint,
            *center_saver,
            history,
            self.gently_stop,
        ]
        return keras.callbacks.CallbackList(callbacks, model=model, add_history=False, add_progbar=False)

    def _eval_callbacks(self):
        """One evaluator per bin, kept across stages so "previous max accuracy" and the best-model file persist."""
        if getattr(self, "_evaluators_for", None) is not self.basic_model:
            self._evaluators = [
                evals.eval_callback(
                    self.basic_model,
                    path,
                    batch_size=self.eval_batch_size,
                    save_model=os.path.join(self.save_dir, self.stem) if index == len(self.eval_paths) - 1 else None,
                    eval_freq=self.eval_freq,
                    image_scale=self.eval_image_scale,
                )
                for index, path in enumerate(self.eval_paths)
            ]
            self._evaluators_for = self.basic_model
        return self._evaluators

    def train_single_scheduler(
        self,
        loss,
        epoch,
        initial_epoch=0,
        optimizer=None,
        bottleneckOnly=False,
        lossTopK=1,
        centerloss=0,
        triplet=0,
        alpha=0.35,
        distill=7,
        type=None,
        lossWeight=1,
        history=None,
    ):
        """Train one stage: ``epoch`` epochs starting at ``initial_epoch`` with the given loss and options."""
        head_type = _head_type(loss, type)
        if head_type == "distill" and not self.has_embeddings:
            raise ValueError("a distill loss needs training data with teacher embeddings (data_distiller.py)")
        image_per_class = self.image_per_class or 4
        triplet_data = head_type == "triplet" or bool(triplet)
        train_ds = self._dataset(image_per_class if triplet_data else 0)
        with self.strategy.scope():
            self.basic_model.trainable = not bottleneckOnly
            model = self._build_model(head_type, loss, lossTopK, centerloss, triplet, distill)
            specs = self._loss_specs(head_type, loss, lossWeight, centerloss, triplet, alpha, distill)
            optimizer = self._prepare_optimizer(optimizer, model)
            model.compile(optimizer=optimizer)
        self.model = model
        center_loss = next((spec.fn for spec in specs.values() if isinstance(spec.fn, losses.CenterLoss)), None)
        history = history or self.history
        callbacks = self._callbacks(model, history, center_loss)
        run_steps = self._make_step_fn(model, specs, optimizer)
        iterator = iter(self._distribute(train_ds, image_per_class if triplet_data else 0))
        self._fit(model, run_steps, iterator, callbacks, initial_epoch, initial_epoch + epoch, train_ds.steps_per_epoch)
        self.basic_model.trainable = True

    def _fit(self, model, run_steps, iterator, callbacks, initial_epoch, end_epoch, steps_per_epoch):
        model.stop_training = False
        callbacks.on_train_begin()
        for epoch in range(initial_epoch, end_epoch):
            callbacks.on_epoch_begin(epoch)
            if self.verbose:
                print(f"Epoch {epoch + 1}/{end_epoch}")
            progbar = keras.utils.Progbar(steps_per_epoch, verbose=self.verbose)
            totals, seen, step, start = {}, 0, 0, time.time()
            while step < steps_per_epoch and not model.stop_training:
                num = min(self.steps_per_execution, steps_per_epoch - step)
                callbacks.on_train_batch_begin(step)
                logs = {key: float(value) for key, value in run_steps(iterator, tf.constant(num)).items()}
                step, seen = step + num, seen + num
                for key, value in logs.items():
                    totals[key] = totals.get(key, 0.0) + value * num
                callbacks.on_train_batch_end(step - 1, logs)
                progbar.update(step, [(key, logs[key]) for key in ("loss", "accuracy") if key in logs])
            epoch_logs = {key: value / max(seen, 1) for key, value in totals.items()}
            epoch_logs["lr"] = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
            if self.verbose:
                print(f"     {steps_per_epoch * self.global_batch_size / (time.time() - start):.1f} images/s")
            callbacks.on_epoch_end(epoch, epoch_logs)
            if model.stop_training:
                self.stop_reason = "nan" if self.nan_guard.nan_epoch is not None else "gently_stop"
                break
        callbacks.on_train_end()

    def train(self, train_schedule, initial_epoch=0):
        """Run every stage of ``train_schedule`` (a list of dicts).

        After a restart (``Train`` found a checkpoint and history of ``save_path``) the first call skips the epochs
        the previous run completed. Later calls append to the history, as the seeds did.
        ``bottleneckOnly`` stages do not advance the epoch counter. The caller's dicts are not modified.
        """
        if isinstance(train_schedule, dict):
            train_schedule = [train_schedule]
        schedule = [dict(stage) for stage in train_schedule]
        for stage in schedule:
            if "loss" not in stage or "epoch" not in stage:
                raise ValueError(f"each scheduler dict needs 'loss' and 'epoch': {stage}")
        history, done = self.history, 0
        if self._resume_pending:  # the first call after a restart skips what the killed run completed
            done = max(history.completed_epochs - initial_epoch, 0)
            history.truncate(initial_epoch + done)
            print(f">>>> {done} epochs already done after initial_epoch {initial_epoch}: resuming")
        elif self._first_train:  # a fresh run rewrites the history from initial_epoch on
            history.truncate(initial_epoch)
        self._resume_pending = self._first_train = False
        self.stop_reason = None
        for stage in schedule:
            epochs = int(stage.pop("epoch"))
            skip = min(done, epochs)
            done -= skip
            if 0 < skip < epochs and self.optimizer is not None:
                stage["optimizer"] = None  # resuming mid-stage: keep the restored optimizer and its slots
            if skip < epochs:
                self.train_single_scheduler(
                    epoch=epochs - skip, initial_epoch=initial_epoch + skip, history=history, **stage
                )
            if not stage.get("bottleneckOnly", False):
                initial_epoch += epochs
            if self.stop_reason:
                print(f">>>> Training stopped ({self.stop_reason}); remaining stages skipped.")
                break
        return history.history


class CenterSaver(keras.callbacks.Callback):
    """Save the center-loss centers to ``<stem>_centers.npy`` at each epoch end (atomically)."""

    def __init__(self, center_loss, path):
        super().__init__()
        self.center_loss, self.path = center_loss, path

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or np.isfinite(logs.get("loss", 0.0)):
            self.center_loss.save_centers(self.path)


# ---------------------------------------------------------------------------------------------------- demo
def run_demo(data_dir="datasets/demo", epochs=8, batch_size=64, seed=0):
    """The README's main job: build the demo dataset, train MobileFaceNet with ArcFace, print verification accuracy.

    Sized to finish in a few minutes on a 2-core CPU: 150 identities x 20 images of 48x48 pixels.
    """
    import demo_data

    keras.utils.set_random_seed(seed)
    paths = demo_data.make_demo_dataset(data_dir, seed=seed, **demo_data.DEMO_JOB)
    image_size = demo_data.DEMO_JOB["image_size"]
    basic_model = models.buildin_models(
        "mobilefacenet",
        dropout=0,
        emb_shape=128,
        input_shape=(image_size, image_size, 3),
        output_layer="GDC",
        bn_momentum=0.9,
    )  # bn_momentum 0.9: a short run must forget the initial moving variance of 1 (0.99**300 is still 5%)
    tt = Train(
        paths["train_dir"],
        "demo_mobilefacenet.keras",
        eval_paths=[paths["bin_path"]],
        basic_model=basic_model,
        batch_size=batch_size,
        lr_base=0.003,
        lr_decay=0.5,
        lr_decay_steps=epochs,
        lr_min=1e-5,
        random_status=0,
        resume=False,
        seed=seed,
    )
    optimizer = keras.optimizers.AdamW(0.003, weight_decay=5e-4)
    sch = [{"loss": losses.ArcfaceLoss(scale=16), "optimizer": optimizer, "epoch": epochs}]
    history = tt.train(sch, 0)
    name = os.path.splitext(os.path.basename(paths["bin_path"]))[0]
    print(f">>>> demo verification accuracy on unseen identities ({name}): {max(history[name]):.4f}")
    return history


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--demo", action="store_true", help="build the synthetic demo dataset and train on it")
    parser.add_argument("--data_dir", default="datasets/demo", help="where the demo dataset is written")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args(argv)
    if not args.demo:
        parser.error("use --demo, or import train in Python: tt = train.Train(...); tt.train(sch, 0)")
    run_demo(args.data_dir, args.epochs, args.batch_size)


if __name__ == "__main__":
    main()

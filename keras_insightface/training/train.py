"""``Train``: the multi-stage scheduler. For each stage of a schedule (a list of dicts) it asks the stage builder
(``stages``) for the model, the losses and the optimizer, hands them with the callbacks to the step runner
(``runner``), and keeps the run's files (``run_files``): checkpoint, history, centers, resume after a crash.

    tt = train.Train(data_path, "mobilenet.keras", eval_paths, basic_model=models.buildin_models("MobileNet"))
    tt.train([{"loss": losses.ArcfaceLoss(), "optimizer": "adam", "epoch": 5}], 0)
"""

import contextlib
import dataclasses
import os
import signal

import keras
import tensorflow as tf

from keras_insightface.data import pipeline as data
from keras_insightface.evaluation import evals
from keras_insightface.models import zoo as models
from keras_insightface.nn import optimizers
from keras_insightface.training import callbacks as run_callbacks
from keras_insightface.training import runner, stages
from keras_insightface.training.config import TrainConfig
from keras_insightface.training.preemption import Preemption, exit_status
from keras_insightface.training.run_files import RunFiles

EMBEDDING_LAYER = "embedding"


def make_runner(config):
    """The step runner of the Keras backend: ``runner_jax.JaxStepRunner`` on JAX, else ``runner.StepRunner`` under the
    current ``tf.distribute`` strategy (one device, Mirrored or MultiWorkerMirrored)."""
    options = dict(accumulation=config.gradient_accumulation_steps, clip_norm=config.gradient_clip_norm)
    if keras.backend.backend() == "jax":
        from keras_insightface.training import runner_jax, sharding

        if config.sharded_head:
            sharding.use_sharded_head(config)
        return runner_jax.JaxStepRunner(config.steps_per_execution, config.verbose, **options)
    strategy = tf.distribute.get_strategy()
    return runner.StepRunner(
        strategy, config.steps_per_execution, config.jit_compile, config.verbose, fast=config.fast_kernels, **options
    )


def _is_file(path):
    return isinstance(path, str | os.PathLike) and os.path.isfile(path)


class Train:
    """Multi-stage face-recognition trainer; see the README for every option and scheduler key.

    ``basic_model``: a model or a saved basic-model file; ``model``: a saved full model file or a full model (then
    ``basic_model`` is its embedding layer name or index). ``callbacks``: Keras callbacks that receive the events
    and logs of ``model.fit`` (also settable as ``tt.custom_callbacks``). ``**options``: ``TrainConfig`` fields.
    """

    def __init__(
        self,
        data_path,
        save_path,
        eval_paths=(),
        basic_model=None,
        model=None,
        compile=True,
        custom_objects=None,
        pretrained=None,
        callbacks=None,
        **options,
    ):
        self.config = config = TrainConfig.from_options(options)
        data.check_data_path(data_path)  # a wrong path is refused before any model or checkpoint is loaded
        self.runner = make_runner(config)
        self.strategy = getattr(self.runner, "strategy", None)  # tf.distribute's, on TensorFlow
        self.files = RunFiles(save_path, self.strategy)
        self.files.claim()  # one live run per save path; a killed run's temporary files are removed
        self.save_path, self.hist_path, self.is_chief = self.files.save_path, self.files.hist_path, self.files.is_chief
        self.eval_paths = [eval_paths] if isinstance(eval_paths, str | os.PathLike) else list(eval_paths or [])
        self.custom_callbacks, self.global_batch_size = list(callbacks or []), config.batch_size * self.runner.replicas
        self.history = run_callbacks.MyHistory(self.files.hist_path)
        self._resume_pending = bool(config.resume) and self.files.reconcile(self.history)
        self._first_train, self.stop_reason, self.model, self.optimizer = True, None, None, None
        self.stage_epochs, given_model = [], basic_model
        resumed = self.files.resume_state if self._resume_pending else None
        config.seed = (resumed or {}).get("seed", config.seed) if config.seed is None else config.seed
        config.seed = data.draw_seed() if config.seed is None else config.seed  # stored in every checkpoint
        if self._resume_pending:
            print(f">>>> Resuming from checkpoint {self.save_path} (pass resume=False to start over)")
            basic_model, model = EMBEDDING_LAYER, self.save_path
        with self.runner.scope():
            self._init_models(basic_model, model, compile, pretrained, custom_objects)
        if self._resume_pending and (isinstance(given_model, keras.Model) or _is_file(given_model)):
            given = models.load_model(given_model, custom_objects)
            self.files.check_resumed_model(self.basic_model, given, keep_checkpoint=config.resume == "checkpoint")
        self.evaluators = self._make_evaluators()  # reads and checks every eval bin before any training
        self.reset_dataset(data_path)

    # ------------------------------------------------------------------------------------------ setup
    def _init_models(self, basic_model, model, compile, pretrained, custom_objects):
        """The model sources: a basic model (object or file), or a full model (file or object) to continue."""
        full_model = models.load_model(model, custom_objects, compile=compile) if model is not None else None
        if full_model is not None:
            self.basic_model = models.extract_basic_model(
                full_model, EMBEDDING_LAYER if basic_model is None else basic_model
            )
        elif isinstance(basic_model, str | keras.Model):
            self.basic_model = models.load_model(basic_model, custom_objects)
        else:
            raise ValueError("give basic_model (a model or a saved basic model file) or model (a saved full model)")
        if pretrained:  # Keras weights, or a pretrained model of another tool copied layer by layer
            models.load_weights(self.basic_model, pretrained)
        if self.config.mixed_precision:  # backbone in float16 / bfloat16; embedding, heads and losses stay float32
            keras.mixed_precision.set_global_policy(self.config.mixed_precision)
            self.basic_model = models.convert_to_mixed_float16(self.basic_model, self.config.mixed_precision)
        self.builder = stages.StageBuilder(
            self.basic_model,
            classes=0,
            partial_fc_rate=self.config.partial_fc_rate,
            output_weight_decay=self.config.output_weight_decay,
            lr_base=self.config.lr_base,
            centers_path=self.files.centers_path,
            image_per_class=self.config.image_per_class or 4,
            name=self.files.stem,
        )
        if full_model is not None:
            self.builder.adopt_heads(full_model)
            self.builder.optimizer = self.optimizer = (
                optimizers.restored_optimizer(full_model, model) if compile else None
            )

    def _make_evaluators(self):
        """One evaluator per bin (the best basic model is kept on the last one); each bin is fully decoded now."""
        last = len(self.eval_paths) - 1
        return [
            evals.eval_callback(
                self.basic_model,
                path,
                batch_size=self.config.eval_batch_size,
                save_model=self.files.best_model_prefix if index == last else None,
                eval_freq=self.config.eval_freq,
                image_scale=self.config.eval_image_scale,
            )
            for index, path in enumerate(self.eval_paths)
        ]

    def reset_dataset(self, data_path):
        """Switch the training data (e.g. to a cleaned ``data_drop_top_k`` output); heads are rebuilt if classes change."""
        self.data_path, self._datasets = data_path, {}
        self.train_ds = self._dataset(0)
        self.classes, self.steps_per_epoch = self.train_ds.classes, self.train_ds.steps_per_epoch
        self.builder.set_data(self.classes, self.train_ds.embedding_dim)

    def _dataset(self, image_per_class, batch_size=None, shard=None):
        """The training input (plain or P x K batches), built once per layout; a user's ``TrainDataset`` as it is."""
        if isinstance(self.data_path, data.TrainDataset):
            return self.data_path
        if shard is not None or image_per_class not in self._datasets:
            options = dataclasses.replace(self.config, image_per_class=image_per_class)
            options.cache_dir = options.cache_dir or self.files.cache_dir
            img_shape = self.basic_model.input_shape[1:3]
            built = data.prepare_dataset(
                self.data_path, batch_size or self.global_batch_size, img_shape, shard, options
            )
            if shard is not None:
                return built
            self._datasets[image_per_class] = built
        return self._datasets[image_per_class]

    @property
    def center_loss(self):
        return self.builder.center_loss

    # ------------------------------------------------------------------------------------------ training
    def _callbacks(self, stage, nan_guard, gently_stop, train_ds, updates_per_epoch):
        """The stage's callbacks, in the order they run at an epoch end: the checkpoint is written before any
        evaluation (a failing evaluation cannot cost it), the history after (it records the evaluation), then the
        user's callbacks (they see the epoch's evaluation and learning rate in the logs)."""
        config = self.config
        lr_scheduler = run_callbacks.build_lr_scheduler(
            config.lr_base, config.lr_decay, config.lr_decay_steps, config.lr_min, config.lr_warmup_steps,
            updates_per_epoch, config.lr_decay_power,
        )  # fmt: skip
        callbacks = [
            lr_scheduler,
            nan_guard,
            *self.files.checkpoint_callbacks(self.history, stage.center_loss, config.seed),
            *self.evaluators,
        ]
        callbacks += [self.history, run_callbacks.UnreadableImagesReport(train_ds.skipped)]
        if config.plot_history and self.is_chief:
            callbacks.append(
                run_callbacks.HistoryPlot(self.files.hist_plot_path, self.history, lambda: self.stage_epochs)
            )
        callbacks += [*self.custom_callbacks, gently_stop]
        return keras.callbacks.CallbackList(callbacks, model=stage.model, add_history=False)

    def train_single_scheduler(self, loss, epoch, initial_epoch=0, start=None, **stage_options):
        """Train one stage: ``epoch`` epochs from ``initial_epoch`` with ``loss`` and the other scheduler keys;
        ``start = (update, totals)`` resumes the first epoch at that update (a checkpoint saved mid-epoch)."""
        stages.check_stage_keys(dict(stage_options, loss=loss, epoch=epoch))
        with self.runner.scope():
            stage = self.builder.build(loss, **stage_options)
        self.model, self.optimizer = stage.model, stage.optimizer
        train_ds = self._dataset(stage.image_per_class)
        accumulation = self.config.gradient_accumulation_steps
        updates_per_epoch = max(1, train_ds.steps_per_epoch // accumulation)  # each update takes that many batches
        first_batch = (start[0] if start else 0) * accumulation
        worker_ds = []  # with several workers: this worker's share of the input (it reports its skipped images)

        def make_worker_dataset(batch_size, shard):
            worker_ds.append(self._dataset(stage.image_per_class, batch_size, shard))
            return worker_ds[-1].at(initial_epoch, first_batch)

        positioned = train_ds.at(initial_epoch, first_batch)  # the data where an uninterrupted run would be
        iterator = iter(self.runner.distribute(positioned, self.global_batch_size, make_worker_dataset))
        nan_guard, gently_stop = run_callbacks.NanLossGuard(), run_callbacks.GentlyStop()
        callbacks = self._callbacks(stage, nan_guard, gently_stop, (worker_ds or [train_ds])[-1], updates_per_epoch)
        run_steps = self.runner.train_function(stage, self.classes)
        epochs, images_per_update = (initial_epoch, initial_epoch + epoch), self.global_batch_size * accumulation
        with self._preemption(stage) as preemption:
            self.runner.fit(
                stage.model, run_steps, iterator, callbacks, epochs, updates_per_epoch, images_per_update, start,
                preemption,
            )  # fmt: skip
        self.basic_model.trainable = True
        if preemption.received is not None:
            self.stop_reason = preemption.received.name
        elif stage.model.stop_training:
            self.stop_reason = "nan" if nan_guard.nan_epoch is not None else "gently_stop"

    def _preemption(self, stage):
        """SIGTERM / SIGINT and ``checkpoint_minutes`` saves for the stage; the processes of a multi-worker run agree
        on each decision, so that all save and stop at the same step."""

        def save(epoch, update, totals):
            self.files.save_mid_epoch(stage.model, self.history, stage.center_loss, self.config.seed, update, totals)

        agree = self.runner.any_process if self.files.processes > 1 else None
        return Preemption(save, self.config.checkpoint_minutes, agree=agree)

    def _epochs_done(self, initial_epoch):
        """Epochs after ``initial_epoch`` that an interrupted run completed (0 for a fresh run), with the history
        cut to what is kept."""
        if self._resume_pending:  # the first call after a restart skips what the killed run completed
            done = max(self.history.completed_epochs - initial_epoch, 0)
            self.history.truncate(initial_epoch + done)
            print(f">>>> {done} epochs already done after initial_epoch {initial_epoch}: resuming")
        else:
            done = 0
            if self._first_train:  # a fresh run rewrites the history from initial_epoch on
                self.history.truncate(initial_epoch)
        self._resume_pending = self._first_train = False
        return done

    def train(self, train_schedule, initial_epoch=0):
        """Run every stage of ``train_schedule`` (a list of dicts, or one dict); returns the history dict.

        Loss and optimizer names are resolved, and every stage checked, before any work. After a restart (``Train``
        found a checkpoint and history of ``save_path``) the first call skips the epochs the previous run completed,
        and goes on at the saved step of a checkpoint saved mid-epoch; later calls append to the history.
        ``bottleneckOnly`` stages do not advance the epoch counter. The caller's dicts are not modified. SIGTERM or
        SIGINT saves the run at the next step and ends it (``SystemExit(143)`` / ``KeyboardInterrupt``)."""
        schedule = stages.resolve_schedule(train_schedule)
        resumed = self.files.resume_state if self._resume_pending else None
        start = (int(resumed["step"]), resumed.get("totals", {})) if resumed and resumed.get("step") else None
        done, self.stop_reason = self._epochs_done(initial_epoch), None
        self.stage_epochs = ([initial_epoch] if initial_epoch else []) + [int(stage["epoch"]) for stage in schedule]
        for stage in schedule:
            epochs = int(stage.pop("epoch"))
            skip = min(done, epochs)
            done -= skip
            if (skip or start) and skip < epochs and self.optimizer is not None:
                stage["optimizer"] = None  # resuming mid-stage: keep the restored optimizer and its slots
            if skip < epochs:
                self.train_single_scheduler(
                    epoch=epochs - skip, initial_epoch=initial_epoch + skip, start=start, **stage
                )
                start = None
            initial_epoch += 0 if stage.get("bottleneckOnly", False) else epochs
            if self.stop_reason:
                print(f">>>> Training stopped ({self.stop_reason}); remaining stages skipped.")
                break
        if self.stop_reason in ("SIGTERM", "SIGINT"):
            self._end_stopped_run()
        return self.history.history

    def _end_stopped_run(self):
        """After a signal stopped the run (it is saved): give the save path back and end as the signal would."""
        self.files.release()
        print(f">>>> {self.save_path} saved; the same command or script resumes it")
        if self.stop_reason == "SIGINT":
            raise KeyboardInterrupt
        raise SystemExit(exit_status(signal.Signals[self.stop_reason]))


# ---------------------------------------------------------------------------------------------------- recipes
def run_recipe(loaded):
    """Train a loaded ``recipe.Recipe``; prints the best result on each evaluation bin and returns the history."""
    kwargs = dict(loaded.train_kwargs)
    data_path, save_path, eval_paths = kwargs.pop("data_path"), kwargs.pop("save_path"), kwargs.pop("eval_paths", ())
    trainer = Train(data_path, save_path, eval_paths, basic_model=loaded.build_basic_model(), **kwargs)
    history = trainer.train(loaded.schedule, 0)
    if loaded.after_training is not None:
        loaded.after_training(trainer, loaded)
    for name in (os.path.splitext(os.path.basename(path))[0] for path in trainer.eval_paths):
        scores = [score for score in trainer.history.history.get(name, []) if score is not None]
        if scores:
            print(f">>>> best accuracy on {name}: {max(scores):.4f} (epoch {scores.index(max(scores)) + 1})")
    return history


def distribution_scope(kind):
    """``--distribute``: ``mirrored`` trains on every GPU of this machine (TensorFlow ``MirroredStrategy``; JAX
    ``DataParallel``); ``multiworker`` on every machine of the cluster: ``TF_CONFIG`` and ``MultiWorkerMirroredStrategy``,
    or on JAX ``keras.distribution.initialize()`` from the ``KERAS_DISTRIBUTION_*`` variables. None: the default."""
    if kind is None:
        return contextlib.nullcontext()
    if keras.backend.backend() == "jax":
        if kind == "multiworker":
            keras.distribution.initialize()
        keras.distribution.set_distribution(keras.distribution.DataParallel())
        return contextlib.nullcontext()
    strategy = (
        tf.distribute.MultiWorkerMirroredStrategy() if kind == "multiworker" else tf.distribute.MirroredStrategy()
    )
    return strategy.scope()

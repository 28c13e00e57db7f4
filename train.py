"""``Train``: the multi-stage scheduler. For each stage of a schedule (a list of dicts) it asks the stage builder
(``stages``) for the model, the losses and the optimizer, hands them with the callbacks to the step runner
(``runner``), and keeps the run's files (``run_files``): checkpoint, history, centers, resume after a crash.

    tt = train.Train(data_path, "mobilenet.keras", eval_paths, basic_model=models.buildin_models("MobileNet"))
    tt.train([{"loss": losses.ArcfaceLoss(), "optimizer": "adam", "epoch": 5}], 0)
"""

import argparse
import dataclasses
import difflib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out of training logs

import keras
import tensorflow as tf

import data
import evals
import losses
import models
import myCallbacks
import optimizers
import runner
import stages
from run_files import RunFiles
from utils import run_main

EMBEDDING_LAYER = "embedding"


@dataclasses.dataclass
class TrainConfig(data.PipelineOptions):
    """Every ``Train`` option with its default (the input options come from ``data.PipelineOptions``)."""

    batch_size: int = 128  # per replica: the global batch is batch_size * replicas
    lr_base: float = 0.001
    lr_decay: float = 0.05
    lr_decay_steps: object = 0  # see myCallbacks.build_lr_scheduler
    lr_min: float = 0.0
    lr_warmup_steps: int = 0
    eval_freq: int = 1  # > 1 also evaluates every eval_freq batches
    eval_batch_size: int = 128
    eval_image_scale: float = data.SEEDS_SCALE
    output_weight_decay: float = 0  # L2 of the heads: 0 none, (0, 1) that value / 2, >= 1 x the basic model's L2
    steps_per_execution: int = 1
    jit_compile: bool = False
    mixed_precision: str | None = None  # "mixed_float16" / "mixed_bfloat16"
    partial_fc_rate: float = 1.0  # < 1: a Partial FC head samples this share of the classes per step
    resume: bool = True  # continue an interrupted run of the same save_path
    verbose: int = 1

    def __post_init__(self):
        if not 0 < self.partial_fc_rate <= 1:
            raise ValueError(f"partial_fc_rate must be in (0, 1], got {self.partial_fc_rate}")
        if self.partial_fc_rate < 1 and self.mixup_alpha > 0:
            raise ValueError("partial_fc_rate < 1 does not support mixup_alpha > 0")

    @classmethod
    def from_options(cls, options):
        """The config of ``Train(**options)``; a misspelled option is an error naming the closest ones."""
        known = [field.name for field in dataclasses.fields(cls)]
        for key in options:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=3)
                raise TypeError(f"Train got an unknown option {key!r}" + (f"; did you mean {close}?" if close else ""))
        return cls(**options)


def extract_basic_model(model, layer=EMBEDDING_LAYER):
    """The input -> embedding sub-model of a full training model (layer name or index), sharing its weights."""
    output = model.get_layer(layer).output if isinstance(layer, str) else model.layers[layer].output
    return keras.Model(model.inputs[0], output, name=model.name + "_basic")


def restored_optimizer(model, path):
    """The optimizer a loaded full model was compiled with, if it can continue: kept when it holds exactly the model's
    trainable variables (its slots are theirs); otherwise rebuilt for them from its configuration, keeping its step
    count and, from a ``.h5`` file (whose reloaded optimizer is built but holds none of the variables), its slots."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not optimizer.built:
        return None
    if optimizers.holds_variables(optimizer, model.trainable_variables):
        return optimizer
    fresh = optimizers.built_for(optimizer.__class__.from_config(optimizer.get_config()), model.trainable_variables)
    fresh.iterations.assign(optimizer.iterations)
    from_h5 = isinstance(path, str) and path.endswith((".h5", ".hdf5"))
    restored, total = optimizers.load_h5_slots(fresh, path) if from_h5 else (0, len(fresh.variables))
    print(
        f">>>> The saved {type(optimizer).__name__} did not hold the model's variables: rebuilt from its config,",
        f"step {int(fresh.iterations.numpy())}, {restored} of {total} optimizer variables restored from {path}",
    )
    return fresh


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
        self.strategy = tf.distribute.get_strategy()
        self.files = RunFiles(save_path, self.strategy)
        self.save_path, self.hist_path, self.is_chief = self.files.save_path, self.files.hist_path, self.files.is_chief
        self.eval_paths, self.custom_callbacks = list(eval_paths or []), list(callbacks or [])
        self.global_batch_size = config.batch_size * self.strategy.num_replicas_in_sync
        self.runner = runner.StepRunner(self.strategy, config.steps_per_execution, config.jit_compile, config.verbose)
        self.history = myCallbacks.MyHistory(self.files.hist_path)
        self._resume_pending = config.resume and self.files.can_resume(self.history)
        self._first_train, self.stop_reason, self.model, self.optimizer = True, None, None, None
        if self._resume_pending:
            print(f">>>> Resuming from checkpoint {self.save_path} (pass resume=False to start over)")
            basic_model, model = EMBEDDING_LAYER, self.save_path
        with self.strategy.scope():
            self._init_models(basic_model, model, compile, pretrained, custom_objects)
        self.evaluators = self._make_evaluators()  # reads and checks every eval bin before any training
        self.reset_dataset(data_path)

    # ------------------------------------------------------------------------------------------ setup
    def _init_models(self, basic_model, model, compile, pretrained, custom_objects):
        """The model sources: a basic model (object or file), or a full model (file or object) to continue."""
        full_model = models.load_model(model, custom_objects, compile=compile) if model is not None else None
        if full_model is not None:
            self.basic_model = extract_basic_model(full_model, EMBEDDING_LAYER if basic_model is None else basic_model)
        elif isinstance(basic_model, str | keras.Model):
            self.basic_model = models.load_model(basic_model, custom_objects)
        else:
            raise ValueError("give basic_model (a model or a saved basic model file) or model (a saved full model)")
        if pretrained:
            self.basic_model.load_weights(pretrained)
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
            self.builder.optimizer = self.optimizer = restored_optimizer(full_model, model) if compile else None

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
    def _callbacks(self, stage, history, nan_guard, gently_stop, train_ds):
        """The stage's callbacks, in the order they run at an epoch end: the checkpoint is written before any
        evaluation (a failing evaluation cannot cost it), the history after (it records the evaluation)."""
        config = self.config
        lr_scheduler = myCallbacks.build_lr_scheduler(
            config.lr_base, config.lr_decay, config.lr_decay_steps, config.lr_min, config.lr_warmup_steps,
            self.steps_per_epoch,
        )  # fmt: skip
        callbacks = [lr_scheduler, nan_guard, *self.files.checkpoint_callbacks(stage.center_loss), *self.evaluators]
        callbacks += [history, myCallbacks.UnreadableImagesReport(train_ds.skipped), *self.custom_callbacks]
        return keras.callbacks.CallbackList([*callbacks, gently_stop], model=stage.model, add_history=False)

    def train_single_scheduler(self, loss, epoch, initial_epoch=0, history=None, **stage_options):
        """Train one stage: ``epoch`` epochs from ``initial_epoch`` with ``loss`` and the other scheduler keys."""
        stages.check_stage_keys(dict(stage_options, loss=loss, epoch=epoch))
        with self.strategy.scope():
            stage = self.builder.build(loss, **stage_options)
        self.model, self.optimizer = stage.model, stage.optimizer
        train_ds = self._dataset(stage.image_per_class)
        nan_guard, gently_stop = myCallbacks.NanLossGuard(), myCallbacks.GentlyStop()
        callbacks = self._callbacks(stage, history or self.history, nan_guard, gently_stop, train_ds)
        make_worker_dataset = lambda batch_size, shard: self._dataset(stage.image_per_class, batch_size, shard).dataset  # noqa: E731
        iterator = iter(self.runner.distribute(train_ds.dataset, self.global_batch_size, make_worker_dataset))
        run_steps = self.runner.train_function(stage, self.classes)
        epochs = (initial_epoch, initial_epoch + epoch)
        self.runner.fit(
            stage.model, run_steps, iterator, callbacks, epochs, train_ds.steps_per_epoch, self.global_batch_size
        )
        self.basic_model.trainable = True
        if stage.model.stop_training:
            self.stop_reason = "nan" if nan_guard.nan_epoch is not None else "gently_stop"

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

        After a restart (``Train`` found a checkpoint and history of ``save_path``) the first call skips the epochs
        the previous run completed; later calls append to the history. ``bottleneckOnly`` stages do not advance
        the epoch counter. The caller's dicts are not modified.
        """
        schedule = [dict(stage) for stage in ([train_schedule] if isinstance(train_schedule, dict) else train_schedule)]
        for stage in schedule:
            stages.check_stage_keys(stage)
        done, self.stop_reason = self._epochs_done(initial_epoch), None
        for stage in schedule:
            epochs = int(stage.pop("epoch"))
            skip = min(done, epochs)
            done -= skip
            if 0 < skip < epochs and self.optimizer is not None:
                stage["optimizer"] = None  # resuming mid-stage: keep the restored optimizer and its slots
            if skip < epochs:
                self.train_single_scheduler(epoch=epochs - skip, initial_epoch=initial_epoch + skip, **stage)
            initial_epoch += 0 if stage.get("bottleneckOnly", False) else epochs
            if self.stop_reason:
                print(f">>>> Training stopped ({self.stop_reason}); remaining stages skipped.")
                break
        return self.history.history


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
    history = tt.train([{"loss": losses.ArcfaceLoss(scale=16), "optimizer": optimizer, "epoch": epochs}], 0)
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
    sys.exit(run_main(main))

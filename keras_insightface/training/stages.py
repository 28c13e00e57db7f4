"""The stage builder: one scheduler dict -> the training model, the loss of each of its outputs and the optimizer.

Pure construction, no training: ``StageBuilder.build(loss=..., epoch=..., ...)`` can be called and inspected in a
test. The builder keeps what carries over from one stage to the next: the head layers (a head whose configuration
did not change keeps its weights), the center-loss state and the optimizer (``optimizer=None`` keeps it).
"""

import dataclasses
import difflib
import functools
import os
import re

import keras

from keras_insightface.data import pipeline as data
from keras_insightface.models import zoo as models
from keras_insightface.nn import losses, optimizers
from keras_insightface.training import checks, outputs

# Keras' categorical losses want one-hot labels; the step builds them on the device, never on the host.
ONE_HOT_LOSSES = (keras.losses.CategoricalCrossentropy, keras.losses.CategoricalFocalCrossentropy)
STAGE_KEYS = {"loss", "epoch", "optimizer", "bottleneckOnly", "type", "lossWeight"}  # and the output kinds' keys


@dataclasses.dataclass
class LossSpec:
    """One model output's loss: the function, its weight and the key of the data targets it compares with."""

    fn: object
    weight: float = 1.0
    target: str = data.LABEL_KEY

    @property
    def needs_one_hot(self):
        return isinstance(self.fn, ONE_HOT_LOSSES)

    def value(self, targets, prediction, classes, shares=1):
        """This output's loss on a batch, divided by ``shares`` (replicas x accumulated batches: the sum of the shares
        is the mean over the global batch). One-hot labels are built on the device for Keras' categorical losses;
        with mixup the loss is the weighted sum of the losses on both labels of each image."""

        def labels(key):
            return keras.ops.one_hot(targets[key], classes) if self.needs_one_hot else targets[key]

        if self.target != data.LABEL_KEY or data.MIXUP_WEIGHT_KEY not in targets:
            return self._mean(labels(self.target), prediction, shares)
        weight = targets[data.MIXUP_WEIGHT_KEY]
        own = self._mean(labels(data.LABEL_KEY), prediction, shares, weight)
        return own + self._mean(labels(data.MIXUP_LABEL_KEY), prediction, shares, 1 - weight)

    def _mean(self, y_true, prediction, shares, sample_weight=None):
        """Keras ``Loss`` objects are called through ``.call`` (per-sample values) and reduced here, the same way for
        every loss, instead of relying on each loss's own reduction and distribution scaling."""
        fn = self.fn
        value = fn.call(y_true, prediction) if isinstance(fn, keras.losses.Loss) else fn(y_true, prediction)
        if sample_weight is not None:
            value = value * sample_weight
        return keras.ops.mean(value) / shares


@dataclasses.dataclass
class Stage:
    """What a training stage runs: ``model`` (images -> dict of outputs), ``specs`` (output name -> LossSpec),
    the optimizer, the P x K triplet layout of its batches (0: plain batches) and the outputs with special roles."""

    model: keras.Model
    specs: dict
    optimizer: object
    image_per_class: int
    accuracy_output: str | None
    partial_fc_head: object = None  # a PartialFCNormDense sampling classes in training steps
    center_loss: object = None

    @functools.cached_property
    def train_model(self):
        """What a Partial FC step runs: every output but the full cosine head, plus the head's input (the head is
        computed over the step's sampled classes only)."""
        kept = {key: value for key, value in self.model.output.items() if key != "arcface"}
        return keras.Model(self.model.inputs, dict(kept, partial_fc_embedding=self.partial_fc_head.input))


def check_stage_keys(stage):
    """A clear error for a scheduler dict with a missing or misspelled key."""
    missing = [key for key in ("loss", "epoch") if key not in stage]
    if missing:
        raise ValueError(f"scheduler dict {stage} misses {missing}: each stage needs 'loss' and 'epoch'")
    known = STAGE_KEYS | outputs.scheduler_keys()
    unknown = sorted(set(stage) - known)
    if unknown:
        raise ValueError(f"scheduler dict has unknown key(s) {unknown}; known keys: {sorted(known)}")
    checks.check_options(_stage_rules(), stage, what="scheduler key")


def resolve_schedule(schedule, where="schedule"):
    """The stage dicts of ``schedule`` (a list of dicts, or one dict), checked and with names resolved: a loss named
    by a string becomes the loss object, an optimizer name is checked; nothing is built. Errors name the stage and
    suggest the closest names. The caller's dicts are not modified."""
    stages = [schedule] if isinstance(schedule, dict) else schedule
    if not isinstance(stages, list | tuple) or not stages:
        raise ValueError(f"{where} must be a non-empty list of stage dicts")
    resolved = []
    for index, stage in enumerate(stages):
        at = f"{where}[{index}]"
        if not isinstance(stage, dict):
            raise ValueError(f"{at} is {type(stage).__name__}, expected a dict")
        try:
            check_stage_keys(stage)
        except ValueError as err:
            raise ValueError(f"{at}: {err}") from None
        stage = dict(stage, loss=resolve_loss(stage["loss"], at))
        if isinstance(stage.get("optimizer"), str):
            _check_optimizer_name(stage["optimizer"], at)
        resolved.append(stage)
    return resolved


def resolve_loss(loss, where):
    """A loss object for ``loss``: itself, or the ``losses`` class / Keras loss a string names."""
    if not isinstance(loss, str):
        return loss
    if isinstance(getattr(losses, loss, None), type):
        return getattr(losses, loss)()
    try:
        return keras.losses.get(loss)
    except ValueError:
        names = [name for name in dir(losses) if name[0].isupper() and name.endswith("Loss")]
        raise ValueError(f"{where}: unknown loss {loss!r}{_did_you_mean(loss, names)}") from None


def _check_optimizer_name(name, where):
    try:
        keras.optimizers.get({"class_name": name, "config": {}})
    except ValueError:
        known = [key for key, value in vars(keras.optimizers).items() if isinstance(value, type) and key[0].isupper()]
        known = sorted({*known, *(key.lower() for key in known)} - {"Optimizer", "optimizer"})
        raise ValueError(f"{where}: unknown optimizer {name!r}{_did_you_mean(name, known)}") from None


def _did_you_mean(name, known):
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(map(repr, close))}?" if close else ""


def _optimizer_or_name(value):
    if value is None or isinstance(value, str | keras.optimizers.Optimizer):
        return None
    return f"expected an optimizer or its name, got {type(value).__name__}"


def _loss_or_name(value):
    return None if isinstance(value, str) or callable(value) else f"expected a loss, got {type(value).__name__}"


def _stage_rules():
    """The type and range of the scheduler keys: auxiliary outputs' weights are numbers >= 0."""
    rules = {key: checks.number(0) for key in outputs.scheduler_keys()}
    head_types = [kind.head_type for kind in outputs.OUTPUT_KINDS]
    rules.update(
        loss=_loss_or_name,
        epoch=checks.integer(0),
        optimizer=_optimizer_or_name,
        bottleneckOnly=checks.boolean,
        type=checks.optional(checks.one_of(*head_types)),
        lossWeight=checks.number(0),
        lossTopK=checks.integer(1),
    )
    return rules


class StageBuilder:
    """Builds :class:`Stage` objects for one basic model and one training set (see the module docstring).

    ``classes`` and ``teacher_dim`` describe the data; ``partial_fc_rate < 1`` samples the classes of a cosine head;
    ``output_weight_decay``: 0 none, (0, 1) an L2 of that value / 2 on the heads, >= 1 a multiplier of the basic
    model's L2; ``centers_path`` is where center-loss centers of an earlier run are restored from.
    """

    def __init__(
        self,
        basic_model,
        classes,
        teacher_dim=0,
        partial_fc_rate=1.0,
        output_weight_decay=0,
        lr_base=0.001,
        centers_path=None,
        image_per_class=4,
        name="model",
    ):
        self.basic_model, self.classes, self.teacher_dim = basic_model, classes, teacher_dim
        self.partial_fc_rate, self.output_weight_decay, self.lr_base = partial_fc_rate, output_weight_decay, lr_base
        self.centers_path, self.image_per_class = centers_path, image_per_class
        self.name = re.sub(r"^[^A-Za-z0-9.]+|[^A-Za-z0-9_.-]", "", name) or "model"
        self.heads, self.center_loss, self.optimizer = {}, None, None

    def adopt_heads(self, model):
        """Keep the head layers of a restored full ``model`` (the layers after the basic model) for reuse."""
        for layer in model.layers[len(self.basic_model.layers) :]:
            self.heads[layer.name] = layer

    def set_data(self, classes, teacher_dim):
        """New training data (e.g. a cleaned subset): heads with another class count are rebuilt on next use."""
        self.classes, self.teacher_dim = classes, teacher_dim

    # ------------------------------------------------------------------------------------------ pieces
    def output_regularizer(self):
        """The heads' kernel regularizer from ``output_weight_decay``."""
        wd = self.output_weight_decay
        if wd <= 0:
            return None
        if wd >= 1:
            basic_l2 = models.get_l2_regularizer_value(self.basic_model)
            return keras.regularizers.L2(basic_l2 * wd) if basic_l2 else None
        return keras.regularizers.L2(wd / 2)

    def head_layer(self, make):
        """The head layer ``make()`` builds, or the one of an earlier stage with the same configuration (weights
        kept)."""
        layer = make()
        old = self.heads.get(layer.name)
        if old is not None and old.get_config() == layer.get_config():
            return old
        self.heads[layer.name] = layer
        return layer

    def adopt_center_loss(self, loss):
        """A user's ``CenterLoss`` as the main loss: it becomes the stage's center state (centers of an earlier run
        restored)."""
        if isinstance(loss, losses.CenterLoss):
            if self.centers_path and os.path.exists(self.centers_path):
                loss.restore_centers(self.centers_path)
            self.center_loss = loss
        return loss

    def center_loss_for_classes(self, alpha=0.5):
        """The center loss of the auxiliary output: kept across stages while the class count stays."""
        if self.center_loss is None or self.center_loss.num_classes != self.classes:
            initial = self.centers_path if self.centers_path and os.path.exists(self.centers_path) else None
            emb_shape = int(self.basic_model.output_shape[-1])
            self.center_loss = losses.CenterLoss(self.classes, emb_shape, alpha=alpha, initial_file=initial)
        return self.center_loss

    def optimizer_for(self, optimizer, model):
        """The stage optimizer (``None`` keeps the last one), lazy under Partial FC, loss-scaled under float16, and
        built for ``model``'s trainable variables (a copy from its config when it was built for other ones)."""
        if optimizer is None:
            optimizer = self.optimizer if self.optimizer is not None else "adam"
        if isinstance(optimizer, str):
            optimizer = keras.optimizers.get({"class_name": optimizer, "config": {"learning_rate": self.lr_base}})
        if self.partial_fc_rate < 1:
            optimizer = optimizers.lazy_optimizer(optimizer)
        if keras.mixed_precision.global_policy().name == "mixed_float16" and not isinstance(
            optimizer, keras.optimizers.LossScaleOptimizer
        ):
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer = optimizers.built_for(optimizer, model.trainable_variables)
        self.optimizer = optimizer
        return optimizer

    # ------------------------------------------------------------------------------------------ the stage
    def _outputs(self, head_type, loss, options, has_teacher):
        """``[(kind, loss, weight)]``: the main output first, then the auxiliary ones the options turn on."""
        main = outputs.output_kind(head_type)
        if main.needs_teacher and not has_teacher:
            raise ValueError("a distill loss needs training data with teacher embeddings (data_distiller.py)")
        if main.adopt_main_loss is not None:
            loss = main.adopt_main_loss(self, loss)
        chosen = [(main, loss, float(options.get("lossWeight", 1)))]
        for kind in outputs.OUTPUT_KINDS:
            weight = options.get(kind.aux_key, kind.aux_default) if kind.aux_key else 0
            if kind is not main and weight and (has_teacher or not kind.needs_teacher):
                chosen.append((kind, kind.aux_loss(self, options), float(weight)))
        return chosen

    def build(self, loss, optimizer=None, bottleneckOnly=False, type=None, **options):  # noqa: N803 (scheduler keys)
        """A :class:`Stage` from the keys of one scheduler dict (``epoch`` excluded)."""
        head_type = type or losses.get_head_type(loss)
        chosen = self._outputs(head_type, loss, options, has_teacher=self.teacher_dim > 0)
        self.basic_model.trainable = not bottleneckOnly
        embedding = self.basic_model.output
        model_outputs = {kind.name: kind.build(self, embedding, fn, options) for kind, fn, _ in chosen}
        model = keras.Model(self.basic_model.inputs[0], model_outputs, name=self.name)
        specs = {kind.name: LossSpec(fn, weight, kind.target) for kind, fn, weight in chosen}
        optimizer = self.optimizer_for(optimizer, model)
        model.compile(optimizer=optimizer)
        triplet = any(kind.head_type == "triplet" for kind, _, _ in chosen)
        accuracy_output = next((kind.name for kind, _, _ in chosen if kind.reports_accuracy), None)
        return Stage(
            model,
            specs,
            optimizer,
            self.image_per_class if triplet else 0,
            accuracy_output,
            self.heads.get("arcface") if _samples_classes(self.heads.get("arcface"), specs) else None,
            next((spec.fn for spec in specs.values() if isinstance(spec.fn, losses.CenterLoss)), None),
        )


def _samples_classes(head, specs):
    """True for a Partial FC head that samples classes and whose output is trained in this stage."""
    return "arcface" in specs and isinstance(head, losses.PartialFCNormDense) and head.sample_rate < 1

"""The stage builder without training: which outputs, losses, weights and optimizer a scheduler dict gives, what
carries over between stages, and that a new output kind is one table row (the README's example)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import tiny_basic_model

from keras_insightface.data import pipeline as data
from keras_insightface.nn import losses, optimizers
from keras_insightface.training import outputs, runner, stages


def builder(**kwargs):
    return stages.StageBuilder(tiny_basic_model(), classes=12, lr_base=0.01, **kwargs)


def test_arcface_with_center_and_triplet_outputs():
    stage = builder().build(losses.ArcfaceLoss(), centerloss=0.01, triplet=2, alpha=0.3, lossWeight=0.5)
    assert set(stage.model.output) == {"arcface", "center_embedding", "triplet_embedding"}
    assert {name: spec.weight for name, spec in stage.specs.items()} == {
        "arcface": 0.5,
        "center_embedding": 0.01,
        "triplet_embedding": 2.0,
    }
    assert stage.specs["triplet_embedding"].fn.alpha == 0.3
    assert stage.accuracy_output == "arcface" and stage.image_per_class == 4  # triplets need P x K batches
    assert isinstance(stage.center_loss, losses.CenterLoss) and stage.center_loss.centers.shape == (12, 32)
    assert stage.model.get_layer("arcface").kernel.shape == (32, 12)


def test_main_output_follows_the_loss_and_type():
    softmax = builder().build(keras.losses.CategoricalCrossentropy(from_logits=True))
    assert list(softmax.model.output) == ["softmax"] and softmax.specs["softmax"].needs_one_hot
    assert softmax.model.get_layer("softmax").activation.__name__ == "linear"  # the loss takes logits
    typed = builder().build(losses.BatchAllTripletLoss(), type="triplet")
    assert list(typed.model.output) == ["triplet_embedding"] and typed.accuracy_output is None
    with pytest.raises(ValueError, match="teacher embeddings"):
        builder().build(losses.distiller_loss_cosine)  # the data has no teacher embeddings
    with_teacher = builder(teacher_dim=16).build(losses.ArcfaceLoss())  # distill is on by default with teachers
    assert with_teacher.specs["distill_embedding"].weight == 7 and with_teacher.specs["distill_embedding"].target == (
        data.EMBEDDING_KEY
    )
    assert with_teacher.model.output["distill_embedding"].shape[-1] == 16  # mapped from the 32-d embedding


def test_heads_optimizer_and_centers_carry_over_between_stages():
    built = builder()
    first = built.build(losses.ArcfaceLoss(), optimizer=keras.optimizers.SGD(0.1, momentum=0.9), centerloss=0.1)
    second = built.build(losses.CosFaceLoss(), centerloss=0.2)  # optimizer None: keep it
    assert second.model.get_layer("arcface") is first.model.get_layer("arcface")  # same head, same weights
    assert second.optimizer is first.optimizer and second.center_loss is first.center_loss
    assert optimizers.holds_variables(second.optimizer, second.model.trainable_variables)
    sub_center = built.build(losses.ArcfaceLoss(), lossTopK=3)  # another configuration: a new head
    assert sub_center.model.get_layer("arcface").kernel.shape == (32, 36)
    frozen = built.build(losses.ArcfaceLoss(), bottleneckOnly=True)  # other trainable variables: a fresh copy
    assert frozen.optimizer is not first.optimizer and type(frozen.optimizer) is keras.optimizers.SGD
    assert optimizers.holds_variables(frozen.optimizer, frozen.model.trainable_variables)
    named = builder().build(losses.ArcfaceLoss(), optimizer="sgd")
    assert float(named.optimizer.learning_rate) == pytest.approx(0.01)  # lr_base


def test_partial_fc_makes_a_sampling_head_and_a_lazy_optimizer():
    stage = builder(partial_fc_rate=0.5).build(losses.ArcfaceLoss(), optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    assert isinstance(stage.partial_fc_head, losses.PartialFCNormDense) and stage.partial_fc_head.sample_rate == 0.5
    assert isinstance(stage.optimizer, optimizers.LazySGD) and stage.optimizer.momentum == 0.9
    assert "partial_fc_embedding" in stage.train_model.output and "arcface" not in stage.train_model.output


def test_scheduler_dicts_with_a_missing_or_misspelled_key_are_refused():
    with pytest.raises(ValueError, match=r"misses \['epoch'\]"):
        stages.check_stage_keys({"loss": losses.ArcfaceLoss()})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['centreloss'\]"):
        stages.check_stage_keys({"loss": losses.ArcfaceLoss(), "epoch": 1, "centreloss": 0.1})


def quality_loss(y_true, y_pred):
    """A made-up auxiliary loss on embeddings: the squared distance of their norm from 1."""
    return tf.square(tf.norm(tf.cast(y_pred, tf.float32), axis=-1) - 1.0)


def test_a_new_output_kind_is_one_table_row(monkeypatch):
    row = outputs.OutputKind(
        "quality",
        "quality_embedding",
        data.LABEL_KEY,
        outputs._the_embedding,
        aux_key="quality",
        aux_loss=lambda builder, options: quality_loss,
    )
    monkeypatch.setattr(outputs, "OUTPUT_KINDS", (*outputs.OUTPUT_KINDS, row))
    schedule_stage = {"loss": losses.ArcfaceLoss(scale=16), "quality": 0.25, "epoch": 1}
    stages.check_stage_keys(schedule_stage)  # the new key is known
    stage = builder().build(**{key: value for key, value in schedule_stage.items() if key != "epoch"})
    assert (
        set(stage.model.output) == {"arcface", "quality_embedding"} and stage.specs["quality_embedding"].weight == 0.25
    )
    images = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype("float32")
    batches = tf.data.Dataset.from_tensors((images, {data.LABEL_KEY: np.arange(8, dtype="int32")})).repeat()
    embeddings = stage.model(images, training=True)["quality_embedding"].numpy()  # what the step's loss will see
    expected_quality = np.mean((np.linalg.norm(embeddings, axis=-1) - 1) ** 2)
    step_runner = runner.StepRunner(tf.distribute.get_strategy())
    logs = step_runner.train_function(stage, classes=12)(iter(step_runner.distribute(batches, 8)), 1)
    assert float(logs["quality_embedding_loss"]) == pytest.approx(expected_quality, rel=1e-4)
    expected_total = float(logs["arcface_loss"]) + 0.25 * float(logs["quality_embedding_loss"])
    assert float(logs["loss"]) == pytest.approx(expected_total, rel=1e-5)

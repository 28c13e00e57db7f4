"""Learning-rate schedules (the README table and Keras_insightface's examples) and the optimizer golden numbers."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_insightface.data import pipeline as data
from keras_insightface.training import callbacks as myCallbacks
from keras_insightface.training import train


def _epoch_rates(scheduler, epochs):
    return np.array([scheduler.on_epoch_begin(ee) for ee in range(epochs)])


def _restarts(rates):
    return [ii for ii in range(1, len(rates)) if rates[ii] > rates[ii - 1] * (1 + 1e-9)]


def test_cosine_restarts_at_25_73_169():
    scheduler = myCallbacks.build_lr_scheduler(0.001, 0.5, 24, lr_min=1e-7, lr_warmup_steps=1)
    rates = _epoch_rates(scheduler, 200)
    assert _restarts(rates) == [25, 73, 169]
    assert (
        rates[1] == pytest.approx(0.001) and rates[25] == pytest.approx(0.0005) and rates[73] == pytest.approx(0.00025)
    )
    # mid-period value is the cosine formula with floor lr_min
    assert rates[13] == pytest.approx(1e-7 + (0.001 - 1e-7) * 0.5 * (1 + math.cos(math.pi * 12 / 24)))


def test_cosine_without_restart_when_lr_min_is_lr_base_times_decay():
    scheduler = myCallbacks.build_lr_scheduler(0.001, 1e-4, 24, lr_min=1e-7)
    rates = _epoch_rates(scheduler, 60)
    assert _restarts(rates) == []
    assert rates[0] == pytest.approx(0.001) and rates[24:] == pytest.approx(np.full(36, 1e-7))


def test_constant_decay_steps():
    scheduler = myCallbacks.build_lr_scheduler(0.1, 0.1, [3, 5, 7])
    rates = _epoch_rates(scheduler, 9)
    np.testing.assert_allclose(rates, [0.1, 0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4])


def test_exponential_formula_and_floor():
    scheduler = myCallbacks.build_lr_scheduler(0.001, 0.05, 0, lr_min=5e-4)
    rates = _epoch_rates(scheduler, 30)
    expected = [max(0.001 * math.exp(-0.05 * ee), 5e-4) for ee in range(30)]
    np.testing.assert_allclose(rates, expected)
    assert myCallbacks.exp_scheduler(3, 0.1, 0.5, warmup=2) == pytest.approx(0.1 * math.exp(0.5 * (2 - 3)))
    assert myCallbacks.exp_scheduler(1, 0.1, 0.5, warmup=2) == 0.1


def test_cosine_on_batch_restarts_and_linear_warmup():
    scheduler = myCallbacks.build_lr_scheduler(0.001, 0.5, 1000, lr_min=1e-7, lr_warmup_steps=100, steps_per_epoch=50)
    assert scheduler.on_batch
    rates = np.array([scheduler._rate(step) for step in range(3200)])
    np.testing.assert_allclose(rates[:100], 1e-7 + (0.001 - 1e-7) * np.arange(1, 101) / 100)  # from lr_min up
    assert _restarts(rates[100:]) == [1000, 3000]
    # inside a training loop the global step is epoch * steps_per_epoch + batch, and the optimizer gets the rate
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    scheduler.set_model(model)
    scheduler.on_epoch_begin(3)
    assert scheduler.on_train_batch_begin(7) == pytest.approx(rates[3 * 50 + 7])
    assert float(model.optimizer.learning_rate) == pytest.approx(rates[3 * 50 + 7])


def arcface_torch_poly(step, lr_base, warmup, total, power=2.0):
    """arcface_torch's ``PolyScheduler`` written from its formula: ``lr_base * (1 - (t - warmup) / (total - warmup))
    ** power`` after the warmup, whose linear ramp reaches ``lr_base`` on its last step as this library's does."""
    step = np.asarray(step, np.float64)
    ramp = lr_base * (step + 1) / warmup
    decay = lr_base * np.clip(1 - (step - warmup) / (total - warmup), 0, None) ** power
    return np.where(step < warmup, ramp, decay)


@pytest.mark.parametrize(
    "decay_steps, warmup_steps, steps_per_epoch", [(36, 4, 10), (3600, 400, 100)], ids=["epochs", "batches"]
)
def test_polynomial_decay_after_warmup_is_arcface_torch_s(decay_steps, warmup_steps, steps_per_epoch):
    """40 epochs, the first 4 warmup (the ViT recipe's shape), given in epochs (10 batches each) or in batches (100
    each): the rate of every batch of a training loop, and of the standalone object, is arcface_torch's."""
    scheduler = myCallbacks.build_lr_scheduler(
        0.001, 0, decay_steps, lr_warmup_steps=warmup_steps, steps_per_epoch=steps_per_epoch, lr_decay_power=2
    )
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.AdamW(0.5))
    scheduler.set_model(model)
    rates = []
    for epoch in range(40):
        scheduler.on_epoch_begin(epoch)
        rates += [scheduler.on_train_batch_begin(batch) for batch in range(steps_per_epoch)]
    total = 40 * steps_per_epoch
    expected = arcface_torch_poly(np.arange(total), 0.001, total // 10, total)
    np.testing.assert_allclose(rates, expected, rtol=1e-12)
    assert float(model.optimizer.learning_rate) == pytest.approx(expected[-1])
    assert rates[total // 10 - 1] == pytest.approx(0.001) and rates[total * 55 // 100] == pytest.approx(0.001 / 4)
    standalone = myCallbacks.PolynomialScheduler(0.001, 3600, 2, warmup_steps=400)
    assert [standalone.on_train_batch_begin(step) for step in (0, 2200, 5000)] == pytest.approx([2.5e-6, 2.5e-4, 0])
    with pytest.raises(ValueError, match="lr_decay_power > 0 decays over lr_decay_steps > 0 steps"):
        myCallbacks.build_lr_scheduler(0.001, 0.1, [10, 20], lr_decay_power=2)


def test_seed_standalone_scheduler_objects():
    aa = myCallbacks.CosineLrScheduler(0.001, first_restart_step=24, lr_min=1e-7, warmup_iters=1, m_mul=0.4)
    assert aa.on_epoch_begin(25) == pytest.approx(0.0004)
    dd = myCallbacks.ConstantDecayScheduler(0.001, lr_decay_steps=[10, 20], decay_rate=0.1)
    assert [dd.on_epoch_begin(ee) for ee in (9, 10, 20)] == pytest.approx([0.001, 1e-4, 1e-5])
    cc = myCallbacks.CosineLrScheduler(0.001, first_restart_step=21000, lr_min=1e-7, warmup_iters=4000, m_mul=0.5)
    assert cc.on_train_batch_begin(25000) == pytest.approx(0.0005)


# ------------------------------------------------------------------------------ golden numbers (hand-computed)
def half_square(y_true, y_pred):
    """``(w * 1 - 0)^2 / 2`` for the single-weight model."""
    return tf.reduce_mean(tf.square(y_pred)) / 2


half_square.head_type = "triplet"  # the loss works on the embedding output directly


def _single_weight_trainer(tmp_path, l2):
    inputs = keras.Input((1,))
    regularizer = keras.regularizers.L2(l2) if l2 else None
    outputs = keras.layers.Dense(
        1, use_bias=False, kernel_initializer="ones", kernel_regularizer=regularizer, name="embedding"
    )(inputs)
    basic_model = keras.Model(inputs, outputs)
    dataset = tf.data.Dataset.from_tensors((tf.ones([1, 1]), {"label": tf.zeros([1], tf.int32)})).repeat()
    source = data.TrainDataset(dataset, steps_per_epoch=1, classes=1, num_images=1)
    return train.Train(
        source, str(tmp_path / "single.keras"), basic_model=basic_model, lr_base=0.1, lr_decay=0.0, verbose=0
    )


@pytest.mark.parametrize(
    "l2, momentum, expected",
    [
        (0, 0.0, [0.9, 0.81, 0.729]),
        (0.01, 0.0, [0.898, 0.806404, 0.7241508]),
        (0.01, 0.9, [0.898, 0.714604, 0.47665802]),
    ],
)
def test_sgd_golden_numbers(tmp_path, l2, momentum, expected):
    tt = _single_weight_trainer(tmp_path, l2)
    weights = []
    for epoch in range(3):
        optimizer = keras.optimizers.SGD(0.1, momentum=momentum) if epoch == 0 else None
        tt.train([{"loss": half_square, "optimizer": optimizer, "epoch": 1}], epoch)
        weights.append(float(tt.basic_model.get_layer("embedding").kernel.numpy()[0, 0]))
    np.testing.assert_allclose(weights, expected, rtol=1e-6)

"""Helpers shared by tests and the subprocess jobs they start (plain functions: the jobs cannot use fixtures)."""

import keras


def tiny_basic_model(input_shape=(32, 32, 3), emb=32):
    """A small conv net ending in a layer named ``embedding``: fast enough for tests."""
    inputs = keras.Input(input_shape)
    nn = keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(inputs)
    nn = keras.layers.BatchNormalization(momentum=0.9)(nn)
    nn = keras.layers.ReLU()(nn)
    nn = keras.layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False)(nn)
    nn = keras.layers.BatchNormalization(momentum=0.9)(nn)
    nn = keras.layers.ReLU()(nn)
    nn = keras.layers.GlobalAveragePooling2D()(nn)
    nn = keras.layers.Dense(emb, use_bias=False)(nn)
    nn = keras.layers.BatchNormalization(momentum=0.9, name="embedding")(nn)
    return keras.Model(inputs, nn, name="tiny")

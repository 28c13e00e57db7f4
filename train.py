"""Checkout entry point: ``import train`` here is ``keras_insightface.training.train`` itself; ``python train.py ...`` is ``keras-insightface train ...``."""

from keras_insightface.cli import entry_point

entry_point(__name__, "keras_insightface.training.train", "train")

"""Checkout entry point: ``import myCallbacks`` here is ``keras_insightface.training.callbacks`` itself."""

from keras_insightface.cli import entry_point

entry_point(__name__, "keras_insightface.training.callbacks")

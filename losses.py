"""Checkout entry point: ``import losses`` here is ``keras_insightface.nn.losses`` itself."""

from keras_insightface.cli import entry_point

entry_point(__name__, "keras_insightface.nn.losses")

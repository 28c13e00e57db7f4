"""Checkout entry point: ``import data`` here is ``keras_insightface.data.pipeline`` itself."""

from keras_insightface.cli import entry_point

entry_point(__name__, "keras_insightface.data.pipeline")

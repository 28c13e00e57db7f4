"""Checkout entry point: ``import models`` here is ``keras_insightface.models.zoo`` itself."""

from keras_insightface.cli import entry_point

entry_point(__name__, "keras_insightface.models.zoo")

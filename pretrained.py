"""Checkout entry point: ``import pretrained`` here is ``keras_insightface.tools.pretrained`` itself; ``python pretrained.py ...`` is ``keras-insightface pretrained ...``."""

from keras_insightface.cli import entry_point

entry_point(__name__, "keras_insightface.tools.pretrained", "pretrained")

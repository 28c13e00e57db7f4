"""Checkout entry point: ``import prepare_data`` here is ``keras_insightface.tools.prepare_data`` itself; ``python prepare_data.py ...`` is ``keras-insightface prepare ...``."""

from keras_insightface.cli import entry_point

entry_point(__name__, "keras_insightface.tools.prepare_data", "prepare")

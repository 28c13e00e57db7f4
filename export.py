"""Checkout entry point: ``import export`` here is ``keras_insightface.tools.export`` itself; ``python export.py ...`` is ``keras-insightface export ...``."""

from keras_insightface.cli import entry_point

entry_point(__name__, "keras_insightface.tools.export", "export")

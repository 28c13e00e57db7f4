"""Checkout entry point: ``import data_distiller`` here is ``keras_insightface.tools.distiller`` itself; ``python data_distiller.py ...`` is ``keras-insightface distill ...``."""

from keras_insightface.cli import entry_point

entry_point(__name__, "keras_insightface.tools.distiller", "distill")

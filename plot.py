"""Checkout entry point: ``import plot`` here is ``keras_insightface.evaluation.plot`` itself; ``python plot.py ...`` is ``keras-insightface plot ...``."""

from keras_insightface.cli import entry_point

entry_point(__name__, "keras_insightface.evaluation.plot", "plot")

"""Checkout entry point: ``import IJB_evals`` here is ``keras_insightface.evaluation.ijb`` itself; ``python IJB_evals.py ...`` is ``keras-insightface ijb ...``."""

from keras_insightface.cli import entry_point

entry_point(__name__, "keras_insightface.evaluation.ijb", "ijb")

"""Checkout entry point: ``import evals`` here is ``keras_insightface.evaluation.evals`` itself; ``python evals.py ...`` is ``keras-insightface evals ...``."""

from keras_insightface.cli import entry_point

entry_point(__name__, "keras_insightface.evaluation.evals", "evals")

"""Checkout entry point: ``import data_drop_top_k`` here is ``keras_insightface.tools.drop_top_k`` itself; ``python data_drop_top_k.py ...`` is ``keras-insightface drop-top-k ...``."""

from keras_insightface.cli import entry_point

entry_point(__name__, "keras_insightface.tools.drop_top_k", "drop-top-k")

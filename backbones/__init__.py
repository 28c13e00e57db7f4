"""Checkout entry point: ``import backbones`` here is ``keras_insightface.models.backbones`` itself (its modules too: ``from backbones import resnet``)."""

from keras_insightface.cli import entry_point

entry_point(__name__, "keras_insightface.models.backbones")

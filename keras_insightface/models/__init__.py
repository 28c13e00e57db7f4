"""Models: the model zoo (``zoo.buildin_models``), the ``backbones``, and importers of other tools' models (ONNX, PyTorch, Keras_insightface ``.h5``)."""

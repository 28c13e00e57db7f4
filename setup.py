"""Installs the flat top-level modules (``import train, losses, models``) and ``backbones``."""

import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# Every top-level module of the repository is part of the library (users import them by name).
MODULES = sorted(name[:-3] for name in os.listdir(HERE) if name.endswith(".py") and name != "setup.py")

setup(
    name="keras_insightface",
    version="0.1.0",
    description="Face-recognition training with margin losses on TensorFlow / Keras 3",
    python_requires=">=3.10",
    py_modules=MODULES,
    packages=["backbones"],
    install_requires=[
        "tensorflow>=2.18",
        "keras>=3.6",
        "numpy>=1.26",
        "pandas",
        "tqdm",
        "scikit-image>=0.22",
        "scikit-learn",
        "matplotlib",
        "mtcnn>=1.0",  # face detector; its weights ship inside the wheel
        "tensorboard",  # keras.callbacks.TensorBoard needs it
        "google-crc32c",  # the checksums of TFRecord shards, in C
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "ruff", "tf2onnx", "onnxruntime", "jax[cpu]"],
        "onnx": ["onnxruntime", "tf2onnx"],
        "cv": ["opencv-python-headless"],
        "bench": ["tf-keras"],  # bench/keras2_reference.py: legacy Keras 2, the library users run today
    },
)

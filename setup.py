"""Installs the ``keras_insightface`` package (its recipes included) and the ``keras-insightface`` command.

The checkout's root scripts (``train.py``, ``evals.py``, ...) are entry points onto the package for users working in
a clone; they are not installed.
"""

import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    """``__version__`` of the package, read without importing it (its dependencies are not installed yet)."""
    with open(os.path.join(HERE, "keras_insightface", "__init__.py")) as ff:
        return re.search(r'^__version__ = "([^"]+)"', ff.read(), re.M).group(1)


setup(
    name="keras_insightface",
    version=read_version(),
    description="Face-recognition training with margin losses on Keras 3 (TensorFlow or JAX)",
    python_requires=">=3.10",
    packages=find_packages(include=["keras_insightface", "keras_insightface.*"]),
    package_data={"keras_insightface": ["recipes/*.py"]},
    entry_points={"console_scripts": ["keras-insightface = keras_insightface.cli:main"]},
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
        "h5py",  # reads Keras_insightface .h5 files and the weights inside a .keras checkpoint
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "pytest-xdist", "ruff", "tf2onnx", "onnxruntime", "jax[cpu]", "wheel"],
        "onnx": ["onnxruntime", "tf2onnx"],
        "cv": ["opencv-python-headless"],
        "bench": ["tf-keras"],  # bench/keras2_reference.py: legacy Keras 2, the library users run today
    },
)

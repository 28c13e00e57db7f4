"""Installs the flat top-level modules (``import train, losses, models``) and ``backbones``."""

from setuptools import setup

MODULES = [
    "data",
    "demo_data",
    "evals",
    "export",
    "IJB_evals",
    "losses",
    "models",
    "myCallbacks",
    "plot",
    "prepare_data",
    "data_drop_top_k",
    "data_distiller",
    "train",
    "utils",
]

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
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "ruff", "tf2onnx", "onnxruntime"],
        "onnx": ["onnxruntime", "tf2onnx"],
        "cv": ["opencv-python-headless"],
    },
)

"""Shared fixtures: small generated demo datasets (built once per session), quiet TensorFlow logs, and full float32
matrix products on GPUs, where JAX and TensorFlow otherwise multiply float32 in TF32 (10-bit mantissas): the tests
compare formulas with numpy at float32 tolerances."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_small(tmp_path_factory):
    """12 training identities x 10 images and a 200-pair bin of 20 unseen identities, 32x32 pixels."""
    from keras_insightface.data import demo as demo_data

    root = tmp_path_factory.mktemp("demo_small")
    return demo_data.make_demo_dataset(
        str(root),
        num_classes=12,
        images_per_class=10,
        num_eval_classes=20,
        eval_images_per_class=4,
        num_pairs=200,
        image_size=32,
        seed=1,
    )


def pytest_collection_modifyitems(config, items):
    """Slow tests first: with one test process per core (pytest-xdist, a module at a time) the modules with long tests
    start early and the short ones fill in at the end, instead of a long test starting last on an idle machine."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)

"""The demo dataset: deterministic, balanced, and hard for raw pixels."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from keras_insightface.data import demo as demo_data
from keras_insightface.data import pipeline as data


def _raw_pixel_best_accuracy(bin_path):
    """Cosine similarity of raw RGB pixels, best accuracy over every threshold (brute force)."""
    bins, issame = data.load_bin(bin_path)
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(bb)).convert("RGB"), np.float64).ravel() for bb in bins])
    pixels /= np.linalg.norm(pixels, axis=1, keepdims=True)
    scores = np.sum(pixels[0::2] * pixels[1::2], axis=1)
    candidates = np.concatenate([[-np.inf], np.sort(scores)])
    return max(np.mean((scores > tt) == issame) for tt in candidates)


@pytest.mark.slow
def test_raw_pixels_fail_on_the_main_job_bin(tmp_path):
    """The exact .bin of the README main job: raw-pixel cosine scores at most 0.75 (training reaches > 0.9)."""
    paths = demo_data.make_demo_dataset(str(tmp_path / "demo"), seed=0, **demo_data.DEMO_JOB)
    accuracy = _raw_pixel_best_accuracy(paths["bin_path"])
    assert 0.5 <= accuracy <= 0.75, accuracy
    assert len(os.listdir(paths["train_dir"])) == demo_data.DEMO_JOB["num_classes"]


def test_bin_is_balanced_and_of_unseen_identities(demo_small):
    bins, issame = data.load_bin(demo_small["bin_path"])
    assert len(issame) == 200 and issame.sum() == 100
    train_images = {
        open(os.path.join(root, name), "rb").read()
        for root, _, names in os.walk(demo_small["train_dir"])
        for name in names
    }
    assert not train_images & set(bins)  # eval images are rendered from identities outside the training set


def test_deterministic_for_a_seed(tmp_path):
    kwargs = dict(
        num_classes=2, images_per_class=2, num_eval_classes=3, eval_images_per_class=2, num_pairs=6, image_size=32
    )
    first = demo_data.make_demo_dataset(str(tmp_path / "a"), seed=3, **kwargs)
    second = demo_data.make_demo_dataset(str(tmp_path / "b"), seed=3, **kwargs)
    other = demo_data.make_demo_dataset(str(tmp_path / "c"), seed=4, **kwargs)
    read = lambda path: open(path, "rb").read()  # noqa: E731
    assert read(first["bin_path"]) == read(second["bin_path"]) != read(other["bin_path"])
    assert read(os.path.join(first["train_dir"], "1", "1.jpg")) == read(os.path.join(second["train_dir"], "1", "1.jpg"))


def test_identities_vary_within_and_differ_between(demo_small):
    """Images of one identity are not copies (pose, light, noise vary) and identities differ on average."""

    def load(cls, idx):
        return np.asarray(Image.open(os.path.join(demo_small["train_dir"], str(cls), f"{idx}.jpg")), np.float64)

    same = np.mean([np.abs(load(0, 0) - load(0, ii)).mean() for ii in range(1, 5)])
    assert same > 10  # clearly different pictures of the same identity
    assert len({load(cc, 0).tobytes() for cc in range(12)}) == 12


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="eval classes"):
        demo_data.make_demo_dataset(str(tmp_path), num_eval_classes=1)

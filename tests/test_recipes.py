"""Recipes and ``python train.py --config``: every shipped recipe loads and runs a smoke test, command-line
overrides, clear errors that name the recipe file and where, and a killed ``--config`` run that resumes."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from keras_insightface import utils
from keras_insightface.cli import train as train_cli
from keras_insightface.nn import losses
from keras_insightface.training import recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "keras_insightface", "recipes", "*.py")))
NEEDS_NO_DATA = [path for path in RECIPES if not path.endswith("demo.py")]  # the demo writes its data when loaded
SHARDED = {"webface42m_mbf_sharded_partial_fc.py"}  # sharded_head=True: JAX only


def refused_here(path):
    """A sharded recipe on a backend other than JAX: it must stop with the one-line error."""
    return os.path.basename(path) in SHARDED and keras.backend.backend() != "jax"


def _write(path, text):
    path.write_text(text)
    return str(path)


GOOD = """
import keras
from keras_insightface.nn import losses

def basic_model(input_shape=(32, 32, 3)):
    inputs = keras.Input(input_shape)
    nn = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    nn = keras.layers.GlobalAveragePooling2D()(nn)
    return keras.Model(inputs, keras.layers.Dense(16, name="embedding")(nn))

train_kwargs = dict(data_path="{data}", save_path="{save}", batch_size=16, lr_base=0.01, verbose=0)
schedule = [{{"loss": "ArcfaceLoss", "epoch": 2}}, {{"loss": losses.CosFaceLoss(), "epoch": 3}}]
"""


def test_shipped_recipes_load_with_their_names_and_losses():
    assert {os.path.basename(path) for path in RECIPES} >= {
        "demo.py",
        "ms1m_mobilenet_emb256.py",
        "casia_r34_mxnet_parity.py",
        "glint360k_r100_partial_fc.py",
        "casia_mobilenet_distill.py",
        "casia_mobilenet_subcenter_clean.py",
        *SHARDED,
        "wf42m_pfc03_40epoch_8gpu_vit_t.py",
    }
    for path in NEEDS_NO_DATA:
        if refused_here(path):
            with pytest.raises(recipe.RecipeError, match=r"train_kwargs: sharded_head=True needs the JAX backend"):
                recipe.load_recipe(path)
            continue
        loaded = recipe.load_recipe(path)
        assert loaded.schedule and all(isinstance(stage["loss"], keras.losses.Loss) for stage in loaded.schedule)
        assert loaded.train_kwargs["save_path"].endswith(".keras") and callable(loaded.basic_model)
    glint = recipe.load_recipe(os.path.join(ROOT, "recipes", "glint360k_r100_partial_fc.py"))
    assert glint.train_kwargs["partial_fc_rate"] == 0.1 and isinstance(glint.schedule[0]["loss"], losses.CosFaceLoss)
    vit = recipe.load_recipe(os.path.join(ROOT, "recipes", "wf42m_pfc03_40epoch_8gpu_vit_t.py"))
    optimizer, kwargs = vit.schedule[0]["optimizer"], vit.train_kwargs  # arcface_torch's config, as the recipe says
    assert (
        isinstance(optimizer, keras.optimizers.AdamW) and optimizer.weight_decay == 0.1 and kwargs["batch_size"] == 512
    )
    margin = vit.schedule[0]["loss"].get_config()["margin"]
    assert (kwargs["partial_fc_rate"], kwargs["lr_decay_power"], margin) == (0.3, 2, 0.4)


def test_overrides_and_epochs_scale(tmp_path):
    path = _write(tmp_path / "good.py", GOOD.format(data="/nowhere", save="x.keras"))
    loaded = recipe.load_recipe(path, {"data_path": str(tmp_path), "batch_size": 4, "lr_base": None})
    assert loaded.train_kwargs["data_path"] == str(tmp_path) and loaded.train_kwargs["batch_size"] == 4
    assert loaded.train_kwargs["lr_base"] == 0.01  # None keeps the recipe's value
    assert isinstance(loaded.schedule[0]["loss"], losses.ArcfaceLoss)  # named by a string
    scaled = recipe.scale_epochs(loaded, 2.5)
    assert [stage["epoch"] for stage in scaled.schedule] == [5, 8] and [s["epoch"] for s in loaded.schedule] == [2, 3]
    assert [stage["epoch"] for stage in scaled.rescheduled([{"loss": "CosFaceLoss", "epoch": 4}])] == [10]
    assert loaded.build_basic_model((48, 48, 3)).input_shape == (None, 48, 48, 3)


@pytest.mark.parametrize(
    "body, message",
    [
        ("train_kwargs = {}\nschedule = []", r"missing basic_model \(a recipe defines"),
        ("import losses\nbasic_model = None\ntrain_kwargs = {}\nschedule = [losses.ArcfaceLos()]", r"line 4: .*ArcfaceLos.*did you mean ArcfaceLoss"),
        ("basic_model = lambda: None\ntrain_kwargs = dict(data_path='d', save_path='s.keras')\nschedule = [{'loss': 'arcfase', 'epoch': 1}]", r"schedule\[0\]: unknown loss 'arcfase'"),
        ("basic_model = lambda: None\ntrain_kwargs = dict(data_path='d', save_path='s.keras', lr_bse=0.1)\nschedule = [{'loss': 'ArcfaceLoss', 'epoch': 1}]", r"train_kwargs: unknown Train option 'lr_bse'; did you mean 'lr_base'\?"),
        ("basic_model = lambda: None\ntrain_kwargs = dict(data_path='d', save_path='s.keras')\nschedule = [{'loss': 'ArcfaceLoss', 'epochs': 1}]", r"schedule\[0\]: .*misses \['epoch'\]"),
        ("basic_model = lambda: None\ntrain_kwargs = dict(save_path='s.keras')\nschedule = [{'loss': 'ArcfaceLoss', 'epoch': 1}]", r"misses 'data_path' \(or give --data_path"),
    ],
)  # fmt: skip
def test_recipe_mistakes_name_the_file_and_where(tmp_path, body, message):
    path = _write(tmp_path / "bad.py", body)
    with pytest.raises(recipe.RecipeError, match=re.escape(path) + ".*" + message):
        recipe.load_recipe(path)


def test_cli_reports_a_bad_recipe_in_one_line(tmp_path, capsys):
    path = _write(tmp_path / "bad.py", "import losses\nschedule = [losses.NoSuchLoss()]\n")
    assert utils.run_main(train_cli.main, ["--config", path]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{path}, line 2: AttributeError" in lines[0]
    assert utils.run_main(train_cli.main, ["--config", str(tmp_path / "missing.py")]) == 2
    assert "recipe not found" in capsys.readouterr().err


def test_config_finds_a_shipped_recipe_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ folder here
    shipped = os.path.join(recipe.RECIPES_DIR, "demo.py")
    assert (
        recipe.find_recipe("demo") == recipe.find_recipe("recipes/demo.py") == recipe.find_recipe("demo.py") == shipped
    )
    (tmp_path / "demo.py").write_text("# the user's own\n")
    assert recipe.find_recipe("demo.py") == "demo.py"  # a file that exists is the one meant
    with pytest.raises(
        FileNotFoundError, match=r"recipe not found: demoo \(shipped recipes: casia_mobilenet_distill, "
    ):
        recipe.find_recipe("demoo")
    assert sorted(recipe.shipped_recipes()) == sorted(os.path.basename(path)[:-3] for path in RECIPES)


@pytest.mark.slow  # the demo's smoke test runs as python train.py --demo --smoke (test_package)
@pytest.mark.parametrize("path", NEEDS_NO_DATA, ids=lambda path: os.path.basename(path)[:-3])
def test_every_shipped_recipe_runs_a_smoke_test(path, tmp_path, monkeypatch, capsys):
    """``--smoke``: each stage trains one epoch on demo data; the sub-center recipe then cleans the data and trains on.
    A sharded recipe on TensorFlow stops in one line naming the JAX backend (its JAX run is the test below)."""
    monkeypatch.chdir(tmp_path)
    if refused_here(path):
        assert utils.run_main(train_cli.main, ["--config", path, "--smoke"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "sharded_head=True needs the JAX backend (KERAS_BACKEND=jax)" in lines[0]
        assert not os.path.exists(tmp_path / "checkpoints" / "smoke" / "data")  # stopped before any work
        return
    try:
        train_cli.main(["--config", path, "--smoke"])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    stem = os.path.basename(path)[:-3]
    history = json.load(open(tmp_path / "checkpoints" / "smoke" / f"{stem}_hist.json"))
    stages_run = len(recipe.load_recipe(path).schedule)
    if stem == "casia_mobilenet_subcenter_clean":
        stages_run *= 2  # the schedule again, on the cleaned data
        assert glob.glob(str(tmp_path / "*topK3_deg75.npz"))
    assert len(history["loss"]) == stages_run and np.isfinite(history["loss"]).all()
    assert os.path.exists(tmp_path / "checkpoints" / "smoke" / f"{stem}_hist.png")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHARDED))
def test_a_sharded_recipe_passes_its_smoke_test_on_8_jax_host_devices(name, tmp_path):
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT,
    )
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--config", name, "--smoke"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Sharded head: classes split over 8 devices" in done.stdout
    history = json.load(open(tmp_path / "checkpoints" / "smoke" / f"{name[:-3]}_hist.json"))
    assert len(history["loss"]) == 1 and np.isfinite(history["loss"]).all()


@pytest.mark.slow
def test_a_killed_config_run_resumes_with_the_same_command(demo_small, tmp_path):
    path = _write(tmp_path / "tiny.py", GOOD.format(data=demo_small["train_dir"], save=str(tmp_path / "tiny.keras")))
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--config", path, "--batch_size", "8"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    killed = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    hist_path = tmp_path / "tiny_hist.json"
    deadline = time.time() + 300
    while not (hist_path.exists() and json.load(open(hist_path))["loss"]) and time.time() < deadline:
        time.sleep(0.2)  # until the first epoch is saved; then kill it in the second
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(60) == -signal.SIGKILL
    done_before = len(json.load(open(hist_path))["loss"])
    assert 1 <= done_before < 5
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{done_before} epochs already done" in resumed.stdout
    history = json.load(open(hist_path))
    assert len(history["loss"]) == 5 and None not in history["loss"]  # 2 + 3 epochs, each once


def test_the_readme_warns_that_a_recipe_runs_as_code():
    """``--config`` executes the file: the README must say so where it describes recipes."""
    with open(os.path.join(ROOT, "README.md")) as ff:
        readme = ff.read()
    section = readme[readme.index("### From the command line: recipes") :]
    section = section[: section.index("\n### ", 10)]
    assert "**A recipe is a Python program**" in section and "read a downloaded one before" in section

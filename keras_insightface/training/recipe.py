"""Recipes: a training run described in a small Python file and started from the command line,
``python train.py --config recipes/NAME.py [--data_path ... --save_path ... --batch_size ... --smoke]``.

A recipe file defines, at module level:

- ``basic_model``: a Keras model, or a function returning one (it may take ``input_shape``);
- ``train_kwargs``: the ``train.Train`` arguments (``data_path``, ``save_path``, ``eval_paths`` and any option);
- ``schedule``: the list of stage dicts (``{"loss": ..., "epoch": ...}``); a loss may be named by a string
  (``"ArcfaceLoss"``: a class of ``losses`` built with its defaults, or a Keras loss name);
- optionally ``after_training(trainer, recipe)``: run when the schedule is done (e.g. clean the data and train on;
  ``recipe.rescheduled(stages)`` gives further stages the epoch changes the command line made to the schedule).

``load_recipe`` runs the file, applies the command line's ``Train`` arguments and checks it all, naming the file
(and the line or the stage) of any mistake; ``scale_epochs`` stretches the schedule; ``smoke_test`` shrinks a recipe
to a few steps on the demo data so that every shipped recipe can be tested. The same command after a crash
resumes the run.
"""

import dataclasses
import difflib
import inspect
import os
import runpy
import traceback

import keras

from keras_insightface.nn import losses
from keras_insightface.training import stages
from keras_insightface.training.config import TrainConfig

TRAIN_ARGUMENTS = ("data_path", "save_path", "eval_paths", "model", "compile", "custom_objects", "pretrained")

OVERRIDE_KEYS = ("data_path", "save_path", "batch_size", "lr_base", "mixed_precision")  # what the command line sets
SMOKE_DATA = {
    "num_classes": 8,
    "images_per_class": 4,
    "num_eval_classes": 2,
    "eval_images_per_class": 2,
    "num_pairs": 2,
}


class RecipeError(ValueError):
    """A recipe file that cannot be run; the message names the file and where the mistake is."""


RECIPES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")


def shipped_recipes():
    """Names of the recipes that install with the package (``demo``, ``glint360k_r100_partial_fc``, ...)."""
    return sorted(name[:-3] for name in os.listdir(RECIPES_DIR) if name.endswith(".py"))


def shipped_recipe(name):
    """The path of the shipped recipe ``name``."""
    return os.path.join(RECIPES_DIR, name + ".py")


def find_recipe(config):
    """The recipe file ``--config`` names: an existing path, else the shipped recipe of that name (``demo``,
    ``recipes/demo.py`` and ``demo.py`` all find the shipped ``demo`` outside a checkout)."""
    if os.path.isfile(config):
        return config
    name = os.path.splitext(os.path.basename(config))[0]
    if name in shipped_recipes():
        return shipped_recipe(name)
    raise FileNotFoundError(f"recipe not found: {config} (shipped recipes: {', '.join(shipped_recipes())})")


@dataclasses.dataclass
class Recipe:
    """A loaded recipe: ``path``, the basic model source, the ``Train`` arguments and the schedule."""

    path: str
    basic_model: object
    train_kwargs: dict
    schedule: list
    after_training: object = None
    epochs_of: object = None  # epochs of a stage as the command line changed them (None: as written)

    def rescheduled(self, schedule):
        """``schedule`` (more stages, e.g. of ``after_training``) checked, with the epoch changes applied."""
        checked = _checked_schedule(schedule, self.path)
        return [dict(stage, epoch=self.epochs_of(stage["epoch"])) for stage in checked] if self.epochs_of else checked

    def build_basic_model(self, input_shape=None):
        """The recipe's basic model; a function is called (with ``input_shape`` when given and accepted)."""
        if isinstance(self.basic_model, keras.Model):
            return self.basic_model
        takes_shape = "input_shape" in inspect.signature(self.basic_model).parameters
        return self.basic_model(input_shape=input_shape) if input_shape and takes_shape else self.basic_model()


def _run_file(path):
    """The module namespace of the recipe file; an error in it names the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"recipe not found: {path}")
    try:
        return runpy.run_path(path, run_name="recipe")
    except Exception as err:  # noqa: BLE001 - any mistake in a recipe is reported as the recipe's
        own = os.path.abspath(path)
        frames = [frame for frame in traceback.extract_tb(err.__traceback__) if os.path.abspath(frame.filename) == own]
        where = f"{path}, line {frames[-1].lineno}" if frames else path
        raise RecipeError(f"{where}: {type(err).__name__}: {err}{_suggestion(err)}") from err


def _suggestion(err):
    """' (did you mean ...?)' for a misspelled attribute of a module, e.g. ``losses.ArcfaceLos``."""
    name, owner = getattr(err, "name", None), getattr(err, "obj", None)
    if not isinstance(err, AttributeError) or name is None or owner is None:
        return ""
    close = difflib.get_close_matches(name, dir(owner), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _checked_schedule(schedule, path):
    try:
        return stages.resolve_schedule(schedule, f"{path}: schedule")
    except ValueError as err:
        raise RecipeError(str(err)) from None


def _checked_train_kwargs(train_kwargs, path):
    if not isinstance(train_kwargs, dict):
        raise RecipeError(f"{path}: 'train_kwargs' must be a dict of Train arguments")
    for name in ("data_path", "save_path"):
        if name not in train_kwargs:
            raise RecipeError(f"{path}: train_kwargs misses {name!r} (or give --{name} on the command line)")
    try:
        TrainConfig.from_options({key: value for key, value in train_kwargs.items() if key not in TRAIN_ARGUMENTS})
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{path}: train_kwargs: {err}") from None
    return dict(train_kwargs)


def load_recipe(path, overrides=None):
    """Run and check a recipe file (see the module docstring); returns a :class:`Recipe`. ``overrides`` (``Train``
    arguments given on the command line) are applied before the checks, so they may supply a missing path."""
    namespace = _run_file(os.fspath(path))
    missing = [name for name in ("basic_model", "train_kwargs", "schedule") if name not in namespace]
    if missing:
        raise RecipeError(
            f"{path}: missing {', '.join(missing)} (a recipe defines basic_model, train_kwargs, schedule)"
        )
    basic_model, after_training = namespace["basic_model"], namespace.get("after_training")
    if not (isinstance(basic_model, keras.Model) or callable(basic_model)):
        raise RecipeError(f"{path}: 'basic_model' must be a Keras model or a function returning one")
    train_kwargs = dict(
        namespace["train_kwargs"], **{key: value for key, value in (overrides or {}).items() if value is not None}
    )
    train_kwargs = _checked_train_kwargs(train_kwargs, path)
    schedule = _checked_schedule(namespace["schedule"], path)
    return Recipe(os.fspath(path), basic_model, train_kwargs, schedule, after_training)


def scale_epochs(recipe, epochs_scale):
    """A copy of ``recipe`` with every stage's epochs multiplied by ``epochs_scale`` (at least one epoch each)."""
    if epochs_scale == 1:
        return recipe
    epochs_of = lambda epochs: max(1, round(epochs * epochs_scale))  # noqa: E731
    schedule = [dict(stage, epoch=epochs_of(stage["epoch"])) for stage in recipe.schedule]
    return dataclasses.replace(recipe, schedule=schedule, epochs_of=epochs_of)


def smoke_test(recipe, data_dir, save_dir, input_size=48):
    """The recipe shrunk to check that it runs: the demo data (written to ``data_dir``), ``input_size`` pixel faces,
    one epoch of 4 batches of 8 per stage, no evaluation (its bins are the recipe's data), no resume, files in
    ``save_dir``. A recipe that distills gets teacher
    embeddings made up from the labels, so it runs too."""
    from keras_insightface.data import demo as demo_data

    paths = demo_data.make_demo_dataset(data_dir, image_size=input_size, seed=0, **SMOKE_DATA)
    data_path = _smoke_distill_data(paths, data_dir) if _distills(recipe) else paths["train_dir"]
    save_path = os.path.join(save_dir, os.path.splitext(os.path.basename(recipe.path))[0] + ".keras")
    train_kwargs = dict(recipe.train_kwargs, data_path=data_path, save_path=save_path, eval_paths=[])
    per_class = min(train_kwargs.get("image_per_class") or 4, 4)
    train_kwargs.update(batch_size=8, image_per_class=per_class, resume=False, verbose=0, cache_dir=data_dir + "_cache")
    if train_kwargs.get("mixed_precision") == "mixed_float16" and not _has_gpu():
        print(">>>> smoke test: mixed_float16 runs in float32 on a CPU (float16 kernels are emulated, ~8x slower)")
        train_kwargs["mixed_precision"] = None
    schedule = [dict(stage, epoch=1) for stage in recipe.schedule]
    basic_model = recipe.build_basic_model((input_size, input_size, 3))
    smoke = dict(basic_model=basic_model, train_kwargs=train_kwargs, schedule=schedule, epochs_of=lambda epochs: 1)
    return dataclasses.replace(recipe, **smoke)


def _has_gpu():
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def _distills(recipe):
    """True when the recipe trains on teacher embeddings (a distillation TFRecord, a distill loss or key)."""
    data_path = str(recipe.train_kwargs["data_path"])
    distill_stage = any(
        losses.get_head_type(stage["loss"]) == "distill" or stage.get("distill") for stage in recipe.schedule
    )
    return data_path.endswith((".tfrecord", ".tfrecords")) or distill_stage


def _smoke_distill_data(paths, data_dir, emb_dim=32):
    """An image-list npz of the demo images with made-up teacher embeddings (one random vector per class)."""
    import numpy as np

    from keras_insightface.data import formats
    from keras_insightface.data import pipeline as data

    listing = data.pre_process_folder(paths["train_dir"], cache_dir=data_dir + "_cache")
    teacher = np.random.default_rng(0).normal(size=(int(listing["image_classes"].max()) + 1, emb_dim))
    embeddings = teacher[listing["image_classes"]].astype("float16")
    dest = os.path.join(data_dir, "smoke_distill.npz")
    return formats.save_distill_npz(dest, listing["image_names"], listing["image_classes"], embeddings)

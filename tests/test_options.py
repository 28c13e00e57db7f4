"""Every ``Train`` option and scheduler key is checked for type and range before any work: one line naming the
option, the value and, for a recipe, the file; the command line exits with status 2."""

import dataclasses
import re

import keras
import numpy as np
import pytest

from keras_insightface import utils
from keras_insightface.cli import train as train_cli
from keras_insightface.nn import losses
from keras_insightface.training import checks, config, recipe, stages, train
from keras_insightface.training.config import TrainConfig


def test_every_option_has_a_rule():
    assert sorted(field.name for field in dataclasses.fields(TrainConfig)) == sorted(config.OPTION_RULES)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"batch_size": "8"}, "batch_size='8': expected an int, got str"),
        ({"batch_size": -4}, "batch_size=-4: must be >= 1"),
        ({"batch_size": 8.0}, "batch_size=8.0: expected an int, got float"),
        ({"batch_size": True}, "batch_size=True: expected an int, got bool"),
        ({"lr_base": "0.1"}, "lr_base='0.1': expected a number, got str"),
        ({"lr_base": float("nan")}, "lr_base=nan: must be finite"),
        ({"random_status": -2}, "random_status=-2: must be >= -1"),
        ({"random_crop": (100, 0, 3)}, r"random_crop=\(100, 0, 3\): item 1: must be >= 1"),
        ({"random_crop": 100}, "random_crop=100: expected a list or tuple, got int"),
        ({"random_cutout_mask_area": 1.5}, "random_cutout_mask_area=1.5: must be <= 1"),
        ({"partial_fc_rate": 0}, "partial_fc_rate=0: must be > 0"),
        ({"partial_fc_rate": 1.1}, "partial_fc_rate=1.1: must be <= 1"),
        ({"mixed_precision": "float16"}, "mixed_precision='float16': must be one of None, 'mixed_float16'"),
        ({"lr_decay_steps": [10, "20"]}, r"lr_decay_steps=\[10, '20'\]: expected a number, got list"),
        ({"gradient_clip_norm": 0.0}, "gradient_clip_norm=0.0: must be > 0"),
        ({"resume": "no"}, "resume='no': must be one of True, False, 'checkpoint'"),
        ({"verbose": 3}, "verbose=3: must be <= 2"),
        ({"cache_dir": 5}, "cache_dir=5: expected a path, got int"),
    ],
)
def test_bad_option_values_are_refused_in_one_line(options, message):
    with pytest.raises(ValueError, match="^Train option " + message) as raised:
        TrainConfig.from_options(options)
    assert "\n" not in str(raised.value)


def test_good_option_values_pass():
    import numpy as np

    options = dict(batch_size=np.int64(8), lr_base=1, lr_decay_steps=[10, 20.5], random_crop=[90, 90], seed=None)
    options.update(resume=np.bool_(False), lr_min=np.float32(0.0))
    assert TrainConfig.from_options(options).batch_size == 8
    assert TrainConfig.from_options({"lr_decay_steps": 24, "gradient_clip_norm": None}).lr_decay_steps == 24


@pytest.mark.parametrize(
    "stage, message",
    [
        ({"loss": losses.ArcfaceLoss(), "epoch": "1"}, "scheduler key epoch='1': expected an int, got str"),
        ({"loss": losses.ArcfaceLoss(), "epoch": -1}, "scheduler key epoch=-1: must be >= 0"),
        ({"loss": losses.ArcfaceLoss(), "epoch": 1, "lossTopK": 0}, "lossTopK=0: must be >= 1"),
        ({"loss": losses.ArcfaceLoss(), "epoch": 1, "centerloss": "0.1"}, "centerloss='0.1': expected a number"),
        ({"loss": losses.ArcfaceLoss(), "epoch": 1, "triplet": -1}, "triplet=-1: must be >= 0"),
        ({"loss": losses.ArcfaceLoss(), "epoch": 1, "bottleneckOnly": 1}, "bottleneckOnly=1: expected True or False"),
        ({"loss": losses.ArcfaceLoss(), "epoch": 1, "type": "arcfac"}, "type='arcfac': must be one of 'arcface'"),
        ({"loss": losses.ArcfaceLoss(), "epoch": 1, "optimizer": 0.1}, "optimizer=0.1: expected an optimizer"),
        ({"loss": 3, "epoch": 1}, "scheduler key loss=3: expected a loss, got int"),
    ],
)
def test_bad_scheduler_values_are_refused(stage, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        stages.check_stage_keys(stage)


def test_good_scheduler_values_pass():
    for stage in (
        {"loss": "mse", "epoch": 0, "optimizer": keras.optimizers.SGD(0.1), "bottleneckOnly": True},
        {"loss": losses.ArcfaceLoss(), "epoch": 3, "triplet": 64, "alpha": 0.3, "lossTopK": 3, "type": "arcface"},
        {"loss": losses.distiller_loss_cosine, "epoch": 2, "optimizer": "adam", "centerloss": 0.01, "distill": 7},
    ):
        stages.check_stage_keys(stage)


def test_train_refuses_a_bad_stage_before_training_any_stage(demo_small, tmp_path):
    from helpers import tiny_basic_model

    tt = train.Train(demo_small["train_dir"], str(tmp_path / "x.keras"), basic_model=tiny_basic_model(), verbose=0)
    with pytest.raises(ValueError, match="scheduler key epoch='1'"):
        tt.train([{"loss": losses.ArcfaceLoss(), "epoch": 1}, {"loss": losses.ArcfaceLoss(), "epoch": "1"}], 0)
    assert tt.history.completed_epochs == 0 and tt.model is None


def test_loss_and_optimizer_names_are_resolved_before_any_work(demo_small, tmp_path, capsys):
    from helpers import tiny_basic_model

    tt = train.Train(demo_small["train_dir"], str(tmp_path / "x.keras"), basic_model=tiny_basic_model(), batch_size=8)
    with pytest.raises(ValueError, match=r"^schedule\[0\]: unknown loss 'ArcfaceLos'; did you mean 'ArcfaceLoss'"):
        tt.train([{"loss": "ArcfaceLos", "epoch": 1}], 0)
    late_typo = [{"loss": "ArcfaceLoss", "epoch": 1}, {"loss": "CosFaceLoss", "optimizer": "adamm", "epoch": 1}]
    with pytest.raises(ValueError, match=r"^schedule\[1\]: unknown optimizer 'adamm'; did you mean 'adam'"):
        tt.train(late_typo, 0)
    assert tt.model is None and "Epoch" not in capsys.readouterr().out  # refused before the first stage
    history = tt.train([{"loss": "ArcfaceLoss", "optimizer": "sgd", "epoch": 1}], 0)  # a valid name trains
    assert "arcface_loss" in history and np.isfinite(history["loss"]).all()  # the cosine head of a margin loss


RECIPE = """
import keras
basic_model = lambda: None
train_kwargs = dict(data_path="d", save_path="s.keras", batch_size={batch_size})
schedule = [{{"loss": "ArcfaceLoss", "epoch": {epoch}, "optimizer": {optimizer}}}]
"""


@pytest.mark.parametrize(
    "batch_size, epoch, optimizer, message",
    [
        ('"8"', 1, None, r"train_kwargs: Train option batch_size='8': expected an int, got str"),
        ("-4", 1, None, r"train_kwargs: Train option batch_size=-4: must be >= 1"),
        ("8", '"1"', None, r"schedule\[0\]: scheduler key epoch='1': expected an int, got str"),
        ("8", 1, '"adamm"', r"schedule\[0\]: unknown optimizer 'adamm'; did you mean 'adam'"),
    ],
)
def test_a_bad_recipe_value_names_the_file_and_exits_2(tmp_path, capsys, batch_size, epoch, optimizer, message):
    path = tmp_path / "bad_values.py"
    path.write_text(RECIPE.format(batch_size=batch_size, epoch=epoch, optimizer=optimizer))
    with pytest.raises(recipe.RecipeError, match=re.escape(str(path)) + ": " + message):
        recipe.load_recipe(str(path))
    assert utils.run_main(train_cli.main, ["--config", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and re.search(message, lines[0])


def test_rules_report_the_first_problem_of_a_value():
    assert checks.integer(1, 3)(4) == "must be <= 3" and checks.integer(1, 3)(2) is None
    assert checks.number(0, low_open=True)(0.0) == "must be > 0" and checks.number(0)(0.0) is None
    assert checks.either(checks.boolean, checks.path)("x") is None
    assert checks.optional(checks.integer())(None) is None

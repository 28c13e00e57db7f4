"""Tests for plot.py: rendered PNG/SVG files of synthetic histories, best-epoch tables, clear errors."""

import json
import os
import subprocess
import sys

import matplotlib.colors
import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest
from helpers import assert_drawn_png

from keras_insightface.evaluation import plot

EPOCHS = 12


def synthetic_history(seed=0, with_null_center=True):
    """A 12-epoch history in the _hist.json format: losses fall, accuracies rise, center loss logged from epoch 4."""
    rng = np.random.default_rng(seed)
    xx = np.arange(EPOCHS)
    hist = {
        "loss": list(10 * np.exp(-xx / 5) + rng.uniform(0, 0.1, EPOCHS)),
        "accuracy": list(1 - np.exp(-xx / 4)),
        "lr": list(0.1 * 0.5 ** (xx // 4)),
        "regular_loss": [0.01] * EPOCHS,
        "arcface_loss": list(9 * np.exp(-xx / 5)),
    }
    if with_null_center:
        hist["center_embedding_loss"] = [None] * 3 + list(np.linspace(1, 0.2, EPOCHS - 3))
    for name, peak in [("lfw", 0.99), ("agedb_30", 0.9)]:
        hist[name] = list(peak - 0.3 * np.exp(-xx / 3))
        hist[name + "_thresh"] = [0.3] * EPOCHS
        hist[name + "_10fold"] = list(np.array(hist[name]) - 0.01)
        hist[name + "_10fold_std"] = [0.01] * EPOCHS
        hist[name + "_val_far"] = [0.5] * EPOCHS
    return {key: [None if vv is None else float(vv) for vv in values] for key, values in hist.items()}


@pytest.fixture(autouse=True)
def close_figures():
    """Close every figure a test opened so memory stays flat."""
    yield
    plt.close("all")


@pytest.fixture
def hist_file(tmp_path):
    """The synthetic history written as a ``_hist.json`` file."""
    path = tmp_path / "run_a_hist.json"
    path.write_text(json.dumps(synthetic_history()))
    return str(path)


def count_colour_pixels(image, hex_colour, tolerance=0.08):
    """Pixels within ``tolerance`` of a line colour: the curves of one run are really drawn."""
    target = np.array(matplotlib.colors.to_rgb(hex_colour))
    return int(np.all(np.abs(image - target) < tolerance, axis=-1).sum())


def test_png_of_one_history(hist_file, tmp_path):
    save = str(tmp_path / "one.png")
    axes, pre_item = plot.hist_plot_split(hist_file, [4, 4, 4], names=["Softmax", "Arcface", "Triplet"], save=save)
    image = assert_drawn_png(save)
    assert count_colour_pixels(image, "C0") > 1000  # first run in the default colour cycle
    assert count_colour_pixels(image, "C1") == 0
    titles = [ax.get_title() for ax in axes if ax.get_visible()]
    assert titles == ["loss", "accuracy", "eval accuracy", "lr"]
    hist = synthetic_history()
    assert pre_item["epoch"] == EPOCHS
    assert pre_item["loss"] == pytest.approx(hist["loss"][-1])
    assert pre_item["agedb_30"] == pytest.approx(hist["agedb_30"][-1])
    # Plotted loss line: x is epochs 1..12, y the history values.
    loss_line = axes[0].get_lines()[0]
    np.testing.assert_array_equal(loss_line.get_xdata(), np.arange(1, EPOCHS + 1))
    np.testing.assert_allclose(loss_line.get_ydata(), hist["loss"])
    # Stage boundaries after epochs 4 and 8 (drawn between epochs, at 4.5 and 8.5).
    vlines = sorted({line.get_xdata()[0] for line in axes[0].get_lines()[1:]})
    assert vlines == [4.5, 8.5]
    assert {text.get_text() for text in axes[0].texts} >= {"Softmax", "Arcface", "Triplet"}
    # Eval panel: one curve per eval bin, best value of the last stage marked as text.
    eval_labels = [line.get_label() for line in axes[2].get_lines() if not line.get_label().startswith("_")]
    assert eval_labels == ["run_a_hist lfw", "run_a_hist agedb_30"]
    assert f"{max(hist['agedb_30']):.4f}" in {text.get_text() for text in axes[2].texts}


def test_two_runs_overlaid_and_continued(hist_file, tmp_path):
    save = str(tmp_path / "two.png")
    customs = ["center_embedding_loss", "agedb_30_10fold"]
    axes, pre_item = plot.hist_plot_split(hist_file, [4, 8], customs=customs, fig_label="run A")
    second = synthetic_history(seed=1)
    second["loss"] = [vv * 2 for vv in second["loss"]]
    limit = 15.0
    axes_2, _ = plot.hist_plot_split(
        second, [4], customs=customs, axes=axes, pre_item=pre_item, fig_label="run B", save=save, limit_loss_max=limit
    )
    assert axes_2 is not None and list(axes_2) == list(axes)
    image = assert_drawn_png(save)
    assert image.shape[1] > image.shape[0]  # 2 x 3 grid is wider than high
    titles = [ax.get_title() for ax in axes]
    assert titles == ["loss", "accuracy", "eval accuracy", "lr", "center_embedding_loss", "agedb_30_10fold"]
    run_a, run_b = [line for line in axes[0].get_lines() if line.get_label() in ("run A loss", "run B loss")]
    to_rgb = matplotlib.colors.to_rgb
    assert (to_rgb(run_a.get_color()), to_rgb(run_b.get_color())) == (to_rgb("C0"), to_rgb("C1"))
    assert count_colour_pixels(image, "C0") > 1000 and count_colour_pixels(image, "C1") > 1000
    # Run B continues run A: starts at A's last epoch and value, then epochs 13..24, loss clipped at limit.
    xb, yb = run_b.get_xdata(), run_b.get_ydata()
    np.testing.assert_array_equal(xb, np.arange(EPOCHS, 2 * EPOCHS + 1))
    assert yb[0] == pytest.approx(pre_item["loss"])
    np.testing.assert_allclose(yb[1:], np.minimum(second["loss"], limit))
    # Null (not logged) center loss of the first 3 epochs is NaN, later values are drawn.
    center = axes[4].get_lines()[0].get_ydata()
    assert np.isnan(center[:3]).all() and np.isfinite(center[3:]).all()


def test_list_of_files_is_one_continued_run(tmp_path):
    first, second = synthetic_history(), synthetic_history(seed=2, with_null_center=False)
    paths = []
    for idx, hist in enumerate([first, second]):
        paths.append(str(tmp_path / f"part_{idx}_hist.json"))
        with open(paths[-1], "w") as ff:
            json.dump(hist, ff)
    merged = plot.load_history(paths)
    assert len(merged["loss"]) == 2 * EPOCHS
    np.testing.assert_allclose(merged["loss"], first["loss"] + second["loss"])
    # A key missing from the second file stays aligned: NaN for its epochs.
    assert np.isnan(merged["center_embedding_loss"][EPOCHS:]).all()
    axes, pre_item = plot.hist_plot_split(paths, customs=["center_embedding_loss"], save=str(tmp_path / "c.png"))
    assert pre_item["epoch"] == 2 * EPOCHS
    assert pre_item["center_embedding_loss"] == pytest.approx(first["center_embedding_loss"][-1])


def test_svg_output(hist_file, tmp_path):
    save = str(tmp_path / "plot.svg")
    plot.hist_plot_split(hist_file, [6, 6], save=save)
    with open(save) as ff:
        text = ff.read()
    assert text.lstrip().startswith("<?xml") and "<svg" in text
    assert text.count("<path") > 20  # curves, markers and glyphs are drawn
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp.svg")]  # atomic: no temp left


def test_choose_accuracy_picks_best_epoch(tmp_path, capsys):
    hist_a = {
        "loss": [3.0, 2.0, 1.0, 0.5],
        "lfw": [0.90, 0.95, 0.99, 0.97],
        "lfw_thresh": [0.3] * 4,
        "agedb_30": [0.80, 0.88, 0.85, None],
        "agedb_30_thresh": [0.3] * 4,
    }
    path_a = tmp_path / "run_a_hist.json"
    path_a.write_text(json.dumps(hist_a))
    hist_b = {"loss": [1.0, 1.0], "lfw": [0.5, 0.7], "lfw_thresh": [0.1, 0.1], "agedb_30": [0.9, 0.6]}
    hist_b["agedb_30_thresh"] = [0.1, 0.1]
    table = plot.choose_accuracy([str(path_a), hist_b])
    assert list(table.index) == ["run_a_hist", "run_1"]
    # Run A: agedb_30 best at the 2nd epoch (0.88), lfw there is 0.95; run B: best at the 1st epoch.
    assert table.loc["run_a_hist", "epoch"] == 2
    assert table.loc["run_a_hist", "agedb_30"] == pytest.approx(0.88)
    assert table.loc["run_a_hist", "lfw"] == pytest.approx(0.95)
    assert table.loc["run_1", "epoch"] == 1 and table.loc["run_1", "lfw"] == pytest.approx(0.5)
    printed = capsys.readouterr().out
    assert ">>>> agedb_30 max:" in printed and ">>>> sum max:" in printed
    assert "0.9900, 3" in printed  # all max: lfw of run A peaks at epoch 3
    # Picking by lfw instead, sorted best first.
    by_lfw = plot.choose_accuracy([str(path_a), hist_b], key_pick="lfw", sort_metric=True, verbose=False)
    assert list(by_lfw.index) == ["run_a_hist", "run_1"]
    assert by_lfw.loc["run_a_hist", "epoch"] == 3 and by_lfw.loc["run_1", "epoch"] == 2


def test_missing_file_and_keys_give_clear_errors(tmp_path):
    missing = str(tmp_path / "nothing_hist.json")
    with pytest.raises(FileNotFoundError, match="nothing_hist.json"):
        plot.hist_plot_split(missing)
    with pytest.raises(FileNotFoundError, match="nothing_hist.json"):
        plot.choose_accuracy([missing])
    with pytest.raises(KeyError, match="'loss'"):
        plot.hist_plot_split({"accuracy": [0.1, 0.2]})
    with pytest.raises(KeyError, match="cfp_fp"):
        plot.choose_accuracy({"loss": [1.0], "lfw": [0.9], "lfw_thresh": [0.1]}, key_pick="cfp_fp")
    with pytest.raises(KeyError, match="no eval accuracy keys"):
        plot.choose_accuracy({"loss": [1.0], "accuracy": [0.5]})
    with pytest.raises(ValueError, match="extension"):
        plot.hist_plot_split(synthetic_history(), save=str(tmp_path / "plot.xyz"))
    _, small_axes = plt.subplots(1, 3)
    with pytest.raises(ValueError, match="No free subplot for 'lr'"):
        plot.hist_plot_split(synthetic_history(), axes=small_axes)
    assert not any(ax.get_lines() for ax in small_axes)  # nothing half-drawn
    with pytest.warns(UserWarning, match="triplet_embedding_loss"):
        plot.hist_plot_split(synthetic_history(), customs=["triplet_embedding_loss"])


def test_backend_agg_when_headless_unless_user_chose():
    assert matplotlib.get_backend().lower() == "agg"  # no display in the test environment
    code = "import matplotlib; matplotlib.use('svg'); import plot; print(matplotlib.get_backend())"
    env = {key: vv for key, vv in os.environ.items() if key not in ("MPLBACKEND", "DISPLAY", "WAYLAND_DISPLAY")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().lower() == "svg"

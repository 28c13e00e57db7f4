"""Figures: training-history plots and best-epoch tables (read from ``<stem>_hist.json`` files only), ROC curves
and photo-comparison grids. Imports nothing of the library but ``utils``, so every module may use it.

``hist_plot_split`` draws loss, accuracy, eval accuracies, learning rate and any extra history keys, with
vertical lines at scheduler stage boundaries; calling it again with the returned ``axes`` overlays another
run. ``choose_accuracy`` tabulates the best epoch of each run. ``plot_roc_curves`` draws the ROC of the IJB
and folder evaluations, ``plot_face_comparison`` what ``evals.py --compare`` compared.
"""

import json
import os
import sys
import warnings

import matplotlib
import numpy as np

from keras_insightface.utils import atomic_write

KNOWN_EVAL_NAMES = ("lfw", "cfp_fp", "cfp_ff", "agedb_30", "calfw", "cplfw", "vgg2_fp")
EVAL_LINE_STYLES = ("-", "--", "-.", ":")
LOSS_PANEL, ACCURACY_PANEL, EVAL_PANEL, LR_PANEL = "loss", "accuracy", "eval accuracy", "lr"


def _use_agg_without_display():
    """Select the non-interactive Agg backend on a headless Linux machine, unless the user chose a backend."""
    if "matplotlib.pyplot" in sys.modules or os.environ.get("MPLBACKEND"):
        return
    if not sys.platform.startswith("linux") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return
    try:
        chosen = matplotlib.get_backend(auto_select=False)
    except TypeError:  # matplotlib < 3.10 has no auto_select
        chosen = matplotlib.rcParams._get_backend_or_none()
    if chosen is None:
        matplotlib.use("Agg")


_use_agg_without_display()
import matplotlib.pyplot as plt  # noqa: E402


def _read_history(item):
    """Return one history dict from a ``_hist.json`` path or a dict, with a clear error for a missing file."""
    if isinstance(item, dict):
        return item
    path = os.fspath(item)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"History file not found: {path!r}")
    with open(path) as ff:
        history = json.load(ff)
    if not isinstance(history, dict):
        raise ValueError(f"{path!r} is not a history file: expected a JSON object of per-epoch lists")
    return history


def _as_float_array(values, length=None):
    """Per-epoch values as a float array, ``null`` -> NaN, padded with NaN (or cut) to ``length`` epochs."""
    array = np.array([np.nan if vv is None else vv for vv in values], dtype="float64")
    if length is not None and len(array) != length:
        array = np.concatenate([array, np.full(max(length - len(array), 0), np.nan)])[:length]
    return array


def load_history(history):
    """Load a path, a dict, or a list of them into one dict of float arrays (NaN where a key was not logged).

    Files in a list are one run split over several files (e.g. a continuation with a new loss), so they are
    concatenated epoch-wise; every file counts ``len(loss)`` epochs and keys absent from a file become NaN.
    """
    items = list(history) if isinstance(history, (list, tuple)) else [history]
    if not items:
        raise ValueError("Empty history list")
    histories = [_read_history(item) for item in items]
    for item, hist in zip(items, histories):
        if "loss" not in hist:
            name = item if not isinstance(item, dict) else "history dict"
            raise KeyError(f"{name!r} has no 'loss' key; available keys: {sorted(hist)}")
    keys = list(dict.fromkeys(key for hist in histories for key in hist))
    merged = {}
    for key in keys:
        parts = [_as_float_array(hist.get(key, []), len(hist["loss"])) for hist in histories]
        merged[key] = np.concatenate(parts)
    return merged


def eval_names_of(history):
    """Eval-bin keys of a history: keys with a ``<bin>_thresh`` companion, else the well-known bin names."""
    names = [key for key in history if key + "_thresh" in history]
    return names if names else [key for key in KNOWN_EVAL_NAMES if key in history]


def _accuracy_key(history):
    """``accuracy``, or the first ``*_accuracy`` key of a multi-output model, or None (e.g. triplet only)."""
    if "accuracy" in history:
        return "accuracy"
    return next((key for key in history if key.endswith("accuracy")), None)


def _custom_keys(history, customs, eval_names):
    """``customs`` keys that get a subplot of their own: not drawn anyway, and logged (else a warning)."""
    keys = []
    for key in dict.fromkeys(customs):
        if key in ("loss", "lr", "accuracy", *eval_names):
            continue
        if key in history:
            keys.append(key)
        else:
            warnings.warn(f"History has no {key!r} key; available keys: {sorted(history)}", stacklevel=3)
    return keys


def _panel_names(eval_names, custom_keys, eval_split):
    """Subplot titles in order: loss, accuracy, eval accuracies (one or one per bin), lr, extra keys."""
    panels = [LOSS_PANEL, ACCURACY_PANEL]
    panels += list(eval_names) if eval_split else [EVAL_PANEL]
    return panels + [LR_PANEL, *custom_keys]


def _new_axes(num_panels):
    """A new figure with a grid of at least ``num_panels`` subplots, returned flattened; extras hidden."""
    cols = 2 if num_panels == 4 else min(num_panels, 3)
    rows = -(-num_panels // cols)
    _, axes = plt.subplots(rows, cols, figsize=(7 * cols, 5 * rows), squeeze=False)
    axes = axes.flatten()
    for ax in axes[num_panels:]:
        ax.set_visible(False)
    return axes


def _panel_axis(axes, title):
    """The axis already titled ``title``, else the first untitled one (shown and titled now), else an error."""
    for ax in axes:
        if ax.get_title() == title:
            return ax
    for ax in axes:
        if not ax.get_title():
            ax.set_visible(True)
            ax.set_title(title)
            return ax
    titles = [ax.get_title() for ax in axes]
    raise ValueError(f"No free subplot for {title!r}: the given axes hold {titles}; pass axes=None or more axes")


def _stage_bounds(epochs, total):
    """``[(start, end), ...]`` epoch index ranges of each scheduler stage, covering ``total`` epochs."""
    if not epochs:
        return [(0, total)]
    ends = np.cumsum([int(ee) for ee in epochs])
    starts = np.concatenate([[0], ends[:-1]])
    bounds = [(int(ss), int(min(ee, total))) for ss, ee in zip(starts, ends) if ss < total]
    if bounds and bounds[-1][1] < total:  # epochs beyond the listed stages form one more stage
        bounds.append((bounds[-1][1], total))
    return bounds


def _plot_curve(ax, values, init_epoch, pre_value, style):
    """Plot ``values`` at epochs ``init_epoch + 1 ...``; a ``pre_value`` joins the curve to the previous run."""
    xx = np.arange(init_epoch + 1, init_epoch + 1 + len(values))
    if pre_value is not None and np.isfinite(pre_value):
        xx, values = np.concatenate([[init_epoch], xx]), np.concatenate([[pre_value], values])
    return ax.plot(xx, values, **style)[0]


def _mark_peaks(ax, values, bounds, init_epoch, pick_min, color):
    """Mark the best value (min for losses, max otherwise) of every stage with a triangle and its value."""
    for start, end in bounds:
        segment = values[start:end]
        if not np.isfinite(segment).any():
            continue
        best = start + int(np.nanargmin(segment) if pick_min else np.nanargmax(segment))
        xx, yy = init_epoch + 1 + best, values[best]
        ax.scatter(xx, yy, color=color, marker="v")
        ax.text(xx, yy, f"{yy:.4f}", va="bottom", ha="right", fontsize=8, rotation=-30)


def _draw_stages(ax, bounds, names, init_epoch):
    """Dotted vertical lines at stage boundaries and the stage names near the top of ``ax``."""
    ymax = ax.get_ylim()[1]
    for idx, (start, _) in enumerate(bounds):
        if idx > 0:
            ax.axvline(init_epoch + start + 0.5, color="gray", linestyle=":", linewidth=1)
        if names and idx < len(names) and names[idx]:
            ax.text(init_epoch + start + 1, ymax, names[idx], va="top", ha="left", fontsize=9, color="gray")


def _key_to_panel(history, eval_names, custom_keys, eval_split):
    """``[(panel title, history key, line style index), ...]`` for every curve this run draws."""
    pairs = [(LOSS_PANEL, "loss", 0)]
    accuracy_key = _accuracy_key(history)
    if accuracy_key:
        pairs.append((ACCURACY_PANEL, accuracy_key, 0))
    for idx, name in enumerate(eval_names):
        pairs.append((name if eval_split else EVAL_PANEL, name, idx))
    if "lr" in history:
        pairs.append((LR_PANEL, "lr", 0))
    return pairs + [(key, key, 0) for key in custom_keys]


def _save_figure(fig, save):
    """Write ``fig`` to ``save`` atomically, in the format given by its extension (png, svg, pdf ...)."""
    fmt = os.path.splitext(save)[1][1:].lower()
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(f"Cannot save a plot as {save!r}: extension must be one of {sorted(supported)}")
    with atomic_write(save) as tmp_path:
        fig.savefig(tmp_path, format=fmt)


def _draw_curves(curves, hist, bounds, init_epoch, pre_item, label):
    """Draw ``(axis, key, style index)`` curves of one run in one colour; returns the last finite value of each key
    and the run's end epoch (what a continuing run starts from)."""
    color, last_item = None, {"epoch": init_epoch + len(hist["loss"])}
    for ax, key, style_idx in curves:
        style = {"label": label + key, "linestyle": EVAL_LINE_STYLES[style_idx % len(EVAL_LINE_STYLES)]}
        if color is not None:
            style["color"] = color
        line = _plot_curve(ax, hist[key], init_epoch, pre_item.get(key), style)
        color = line.get_color()  # one colour per run, taken from the axes' cycle by the loss curve
        if key != "lr":
            _mark_peaks(ax, hist[key], bounds, init_epoch, pick_min="loss" in key, color=color)
        finite = hist[key][np.isfinite(hist[key])]
        if len(finite):
            last_item[key] = float(finite[-1])
    return last_item


def _finish_panel(ax, bounds, names, init_epoch):
    _draw_stages(ax, bounds, names, init_epoch)
    ax.set_xlabel("epoch")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def hist_plot_split(
    history,
    epochs=None,
    names=None,
    customs=[],  # noqa: B006 -- Keras_insightface's signature; never mutated
    axes=None,
    init_epoch=0,
    pre_item=None,
    fig_label=None,
    save=None,
    limit_loss_max=None,
    eval_split=False,
):
    """Plot one training run from a ``_hist.json`` path, a dict, or a list of files of one continued run.

    ``epochs`` lists the epochs of each scheduler stage (vertical lines at the boundaries, ``names`` written
    at the stage starts, best value of each stage marked). ``customs`` adds history keys as extra subplots.
    Pass the returned ``axes`` back to overlay another run; pass the returned ``pre_item`` (last values and
    epoch) as ``pre_item`` of a run that continues this one, so its curves start where this one ended
    (``init_epoch`` defaults to ``pre_item["epoch"]``). ``save``: a ``.png`` / ``.svg`` path, written
    atomically (``""`` or None: no file). ``limit_loss_max`` clips the loss curve for a readable scale.
    ``eval_split`` gives every eval bin its own subplot. Returns ``(axes, pre_item)``.
    """
    if isinstance(history, (str, os.PathLike)) and fig_label is None:
        fig_label = os.path.splitext(os.path.basename(history))[0]
    hist = load_history(history)
    if limit_loss_max is not None:
        hist["loss"] = np.minimum(hist["loss"], limit_loss_max)
    pre_item = dict(pre_item or {})
    if pre_item and not init_epoch:
        init_epoch = pre_item.get("epoch", 0)
    eval_names = eval_names_of(hist)
    custom_keys = _custom_keys(hist, customs, eval_names)
    bounds = _stage_bounds(epochs, len(hist["loss"]))
    if axes is None:
        axes = _new_axes(len(_panel_names(eval_names, custom_keys, eval_split)))
    axes = np.asarray(axes, dtype=object).flatten()

    panels = _key_to_panel(hist, eval_names, custom_keys, eval_split)
    curves = [(_panel_axis(axes, panel), key, idx) for panel, key, idx in panels]  # a too-small grid draws nothing
    last_item = _draw_curves(curves, hist, bounds, init_epoch, pre_item, f"{fig_label} " if fig_label else "")
    for ax in axes:
        if ax.get_visible() and ax.get_title():
            _finish_panel(ax, bounds, names if ax.get_title() == LOSS_PANEL else None, init_epoch)
    fig = axes[0].figure
    fig.tight_layout()
    if save:
        _save_figure(fig, os.fspath(save))
    return axes, last_item


def _run_name(item, index, skip_name_len):
    """Row name of a run: the file stem (minus ``skip_name_len`` leading characters) or ``run_<index>``."""
    if isinstance(item, dict):
        return f"run_{index}"
    return os.path.splitext(os.path.basename(os.fspath(item)))[0][skip_name_len:]


def _best_index(values, key, name):
    """Index of the largest logged value, with a clear error when ``key`` was never logged."""
    if not np.isfinite(values).any():
        raise ValueError(f"{name}: {key!r} has no logged values")
    return int(np.nanargmax(values))


def choose_accuracy(histories, key_pick=None, eval_names=None, skip_name_len=0, sort_metric=False, verbose=True):
    """Table of the best epoch of each run by ``key_pick`` with every eval accuracy at that epoch.

    ``histories``: a ``_hist.json`` path or dict, or a list of them (one row each). ``key_pick`` defaults to
    ``agedb_30`` when logged, else the last eval bin. ``epoch`` in the tables is 1-based, as in checkpoint
    names. With ``verbose`` it also prints, as Keras_insightface did, each bin's own maximum and the epoch with the
    best sum of all bins. Returns the ``key_pick`` table as a pandas DataFrame (``sort_metric``: sorted by it).
    """
    import pandas as pd

    items = list(histories) if isinstance(histories, (list, tuple)) else [histories]
    key_max, all_max, sum_max, pick = {}, {}, {}, key_pick
    for index, item in enumerate(items):
        name = _run_name(item, index, skip_name_len)
        hist = load_history(item)
        names = list(eval_names) if eval_names else eval_names_of(hist)
        missing = [key for key in names if key not in hist]
        if not names or missing:
            raise KeyError(f"{name}: no eval accuracy keys {missing or ''} in history; keys: {sorted(hist)}")
        pick = pick or ("agedb_30" if "agedb_30" in names else names[-1])  # the first run decides the default
        if pick not in hist:
            raise KeyError(f"{name}: history has no {pick!r} key; eval keys: {names}")
        best = _best_index(hist[pick], pick, name)
        key_max[name] = {**{key: hist[key][best] for key in names}, "epoch": best + 1}
        all_max[name] = {key: f"{np.nanmax(hist[key]):.4f}, {_best_index(hist[key], key, name) + 1}" for key in names}
        best_sum = _best_index(np.sum([hist[key] for key in names], axis=0), "sum", name)
        sum_max[name] = {**{key: hist[key][best_sum] for key in names}, "epoch": best_sum + 1}

    result = pd.DataFrame.from_dict(key_max, orient="index")
    if sort_metric:
        result = result.sort_values(pick, ascending=False)
    if verbose:
        tables = {f"{pick} max": result, "all max (value, epoch)": all_max, "sum max": sum_max}
        for title, table in tables.items():
            frame = table if isinstance(table, pd.DataFrame) else pd.DataFrame.from_dict(table, orient="index")
            print(f">>>> {title}:")
            print(frame.to_string(float_format="%.4f"))
    return result


# ---------------------------------------------------------------------------------------------------------
# Evaluation figures: ROC curves and photo comparisons.
# ---------------------------------------------------------------------------------------------------------
def plot_roc_curves(curves, save_path, title="ROC", xlim=(1e-6, 1), ylim=(0.3, 1.0)):
    """Plot ``{name: (fpr, tpr, auc)}`` ROC curves on a log FPR axis into a figure file, atomically."""
    fig, axis = plt.subplots(figsize=(8, 6))
    for name, (fpr, tpr, roc_auc) in curves.items():
        axis.plot(fpr, tpr, lw=1, label=f"{name} (AUC = {roc_auc * 100:.2f}%)")
    axis.set(xlim=xlim, ylim=ylim, xscale="log", xlabel="False Positive Rate", ylabel="True Positive Rate", title=title)
    axis.grid(linestyle="--", linewidth=0.5)
    axis.legend(loc="lower right")
    fig.tight_layout()
    _save_figure(fig, os.fspath(save_path))
    plt.close(fig)
    return save_path


def _score_cell(axis, score, threshold, diagonal):
    """One cell of the comparison grid: the score on green (same person), red (different) or grey."""
    if diagonal or threshold is None:
        color, verdict = "#e0e0e0", ""
    else:
        color, verdict = ("#b9e3b0", "same") if score > threshold else ("#f2b8b5", "different")
    axis.set(xticks=[], yticks=[], facecolor=color)
    axis.text(0.5, 0.5, f"{score:.3f}\n{verdict}", ha="center", va="center", fontsize=8, transform=axis.transAxes)


def plot_face_comparison(crops, names, similarity, threshold, save_path):
    """Save a grid of a photo comparison: the aligned crops along the top and the left side, and in each cell the
    cosine similarity of the two faces, green when called the same person (score > ``threshold``), red when not."""
    count = len(crops)
    size = 1.4 if count <= 6 else 0.9
    fig, axes = plt.subplots(count + 1, count + 1, figsize=(size * (count + 1), size * (count + 1)), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for index, (crop, name) in enumerate(zip(crops, names)):
        axes[0, index + 1].imshow(crop)
        axes[0, index + 1].set_title(name if len(name) <= 16 else name[:7] + "..." + name[-6:], fontsize=7)
        axes[index + 1, 0].imshow(crop)
    for row in range(count):
        for col in range(count):
            axes[row + 1, col + 1].axis("on")
            _score_cell(axes[row + 1, col + 1], similarity[row][col], threshold, row == col)
    rule = "no threshold" if threshold is None else f"same person when > {threshold:.3f}"
    fig.suptitle(f"cosine similarity ({rule})", fontsize=8)
    fig.tight_layout()
    _save_figure(fig, os.fspath(save_path))
    plt.close(fig)
    return save_path

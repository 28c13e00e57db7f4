"""keras_insightface: face-recognition training with margin losses on Keras 3 (TensorFlow or JAX).

The public API, for scripts and notebooks::

    import keras_insightface as kif

    basic_model = kif.buildin_models("MobileNet", dropout=0, emb_shape=256, output_layer="GDC")
    tt = kif.Train(data_path, "mobilenet.keras", eval_paths, basic_model=basic_model, batch_size=512)
    tt.train([{"loss": kif.ArcfaceLoss(), "optimizer": "adam", "epoch": 20}], 0)

Names are loaded on first use, so ``import keras_insightface`` (and the ``keras-insightface`` command's ``--help``)
does not import TensorFlow. The subpackages hold the rest: ``training`` (``Train``, stages, step runners, callbacks,
recipes), ``evaluation`` (``.bin`` / IJB / photo-folder evaluation, metrics, plots), ``models`` (the model zoo,
``backbones``, importers of other tools' models), ``nn`` (losses, heads, optimizers), ``data`` (formats, RecordIO,
shards, the ``tf.data`` pipeline), ``faces`` (detection, alignment), ``tools`` (data and export tools), ``cli``.
"""

import importlib

__version__ = "0.2.0"

_PUBLIC = {  # module: the names it gives the package top
    "keras_insightface.training.train": ("Train", "run_recipe"),
    "keras_insightface.training.recipe": ("load_recipe",),
    "keras_insightface.nn.losses": (
        "ArcfaceLoss",
        "ArcfaceLossSimple",
        "CosFaceLoss",
        "AdaCosLoss",
        "CurricularFaceLoss",
        "MagFaceLoss",
        "AdaFaceLoss",
        "MarginSoftmax",
        "scale_softmax",
        "CenterLoss",
        "BatchHardTripletLoss",
        "BatchAllTripletLoss",
        "BatchHardTripletLossEuclidean",
        "BatchAllTripletLossEuclidean",
        "OfflineTripletLoss",
        "distiller_loss_cosine",
        "distiller_loss_euclidean",
        "DistillKLDivergenceLoss",
    ),
    "keras_insightface.nn.heads": ("NormDense", "PartialFCNormDense"),
    "keras_insightface.nn.optimizers": ("LazySGD", "LazyAdam"),
    "keras_insightface.models.zoo": (
        "buildin_models",
        "print_buildin_models",
        "load_model",
        "load_weights",
        "add_l2_regularizer_2_model",
        "replace_ReLU_with_PReLU",
        "add_stochastic_depth",
        "convert_to_mixed_float16",
        "extract_basic_model",
    ),
    "keras_insightface.evaluation.evals": ("eval_callback", "evaluate_bins"),
    "keras_insightface.evaluation.plot": ("hist_plot_split", "plot_roc_curves"),
    "keras_insightface.training.callbacks": (
        "exp_scheduler",
        "ConstantDecayScheduler",
        "CosineLrScheduler",
        "PolynomialScheduler",
        "MyHistory",
        "GentlyStop",
        "NanLossGuard",
    ),
    "keras_insightface.data.pipeline": ("prepare_dataset", "TrainDataset", "pre_process_folder"),
    "keras_insightface.data.demo": ("make_demo_dataset",),
}
_WHERE = {name: module for module, names in _PUBLIC.items() for name in names}
__all__ = sorted(_WHERE) + ["__version__"]


def __getattr__(name):
    """Load a public name from its module on first use (see ``_PUBLIC``)."""
    if name not in _WHERE:
        raise AttributeError(f"module 'keras_insightface' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))

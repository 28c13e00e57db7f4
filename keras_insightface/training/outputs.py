"""The kinds of model outputs a training stage can have, in one table.

A stage's model maps images to a dict of outputs. Its *main* output is chosen by the loss's head type
(``losses.get_head_type``: a margin loss needs cosine logits, a Keras loss a softmax head, a triplet loss the
embedding ...); scheduler keys add *auxiliary* outputs beside it (``centerloss``, ``triplet``, ``distill``). Each
row of ``OUTPUT_KINDS`` says how its output is built on the embedding, which target of the data its loss compares
with, whether it measures the training accuracy, and, for an auxiliary output, which scheduler key turns it on and
which loss it gets. A new output kind is one more row (plus its loss in ``losses``).

The ``build`` and ``aux_loss`` functions receive the ``stages.StageBuilder`` (for the number of classes, reusable
head layers, the center-loss state) and the stage's options.
"""

import dataclasses
from collections.abc import Callable

import keras

from keras_insightface.data import pipeline as data
from keras_insightface.nn import heads, losses


@dataclasses.dataclass(frozen=True)
class OutputKind:
    """One kind of model output; see the module docstring."""

    head_type: str  # the loss head type for which this is the main output
    name: str  # output name in the model; its loss is logged as "<name>_loss"
    target: str  # key of the data targets its loss compares with
    build: Callable  # (builder, embedding, loss, options) -> the output tensor
    reports_accuracy: bool = False  # the argmax of its first `classes` columns is the training accuracy
    aux_key: str | None = None  # scheduler key whose non-zero value adds it beside another main output (its weight)
    aux_default: float = 0  # the weight when the scheduler dict does not give the key
    aux_loss: Callable | None = None  # (builder, options) -> the loss of the auxiliary output
    needs_teacher: bool = False  # only for data with teacher embeddings
    option_keys: tuple = ()  # further scheduler keys its build / aux_loss functions read
    adopt_main_loss: Callable | None = None  # (builder, loss) -> loss: hook for a user's loss of this kind


def _cosine_head(builder, embedding, loss, options):
    """``NormDense`` (``PartialFCNormDense`` when Partial FC samples classes), K sub-centers per class."""
    kwargs = dict(
        units=builder.classes,
        kernel_regularizer=builder.output_regularizer(),
        loss_top_k=options.get("lossTopK", 1),
        append_norm=getattr(loss, "append_norm", False),
        name="arcface",
    )
    if builder.partial_fc_rate < 1:
        return builder.head_layer(lambda: heads.PartialFCNormDense(sample_rate=builder.partial_fc_rate, **kwargs))(
            embedding
        )
    return builder.head_layer(lambda: heads.NormDense(**kwargs))(embedding)


def _softmax_head(builder, embedding, loss, options):
    """A float32 ``Dense`` over the classes; linear when the loss takes logits."""
    activation = "linear" if getattr(loss, "from_logits", False) else "softmax"
    regularizer = builder.output_regularizer()
    return builder.head_layer(
        lambda: keras.layers.Dense(
            builder.classes, activation=activation, kernel_regularizer=regularizer, dtype="float32", name="softmax"
        )
    )(embedding)


def _the_embedding(builder, embedding, loss, options):
    return embedding


def _distill_embedding(builder, embedding, loss, options):
    """The student embedding, mapped by a Dense ``distill_emb_map_layer`` when the teacher's size differs."""
    if builder.teacher_dim == embedding.shape[-1]:
        return embedding
    return builder.head_layer(
        lambda: keras.layers.Dense(builder.teacher_dim, use_bias=False, dtype="float32", name="distill_emb_map_layer")
    )(embedding)


OUTPUT_KINDS = (
    OutputKind("arcface", "arcface", data.LABEL_KEY, _cosine_head, reports_accuracy=True, option_keys=("lossTopK",)),
    OutputKind("softmax", "softmax", data.LABEL_KEY, _softmax_head, reports_accuracy=True),
    OutputKind(
        "center",
        "center_embedding",
        data.LABEL_KEY,
        _the_embedding,
        aux_key="centerloss",
        aux_loss=lambda builder, options: builder.center_loss_for_classes(),
        adopt_main_loss=lambda builder, loss: builder.adopt_center_loss(loss),
    ),
    OutputKind(
        "triplet",
        "triplet_embedding",
        data.LABEL_KEY,
        _the_embedding,
        aux_key="triplet",
        aux_loss=lambda builder, options: losses.BatchHardTripletLoss(options.get("alpha", 0.35)),
        option_keys=("alpha",),
    ),
    OutputKind(
        "distill",
        "distill_embedding",
        data.EMBEDDING_KEY,
        _distill_embedding,
        aux_key="distill",
        aux_default=7,
        aux_loss=lambda builder, options: losses.distiller_loss_cosine,
        needs_teacher=True,
    ),
)


def output_kind(head_type):
    """The table row of a head type; a clear error for an unknown one."""
    for kind in OUTPUT_KINDS:
        if kind.head_type == head_type:
            return kind
    known = ", ".join(kind.head_type for kind in OUTPUT_KINDS)
    raise ValueError(f"unknown head type {head_type!r}: use one of {known}")


def scheduler_keys():
    """The scheduler-dict keys the output kinds read: their ``aux_key`` and ``option_keys``."""
    return {kind.aux_key for kind in OUTPUT_KINDS if kind.aux_key} | {
        key for kind in OUTPUT_KINDS for key in kind.option_keys
    }

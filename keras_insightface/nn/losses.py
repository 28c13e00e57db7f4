"""Training losses: the ArcFace margin family, center, triplet and distillation losses.

Every loss takes labels as sparse integers of shape ``(B,)`` / ``(B, 1)`` (what ``data.py`` emits) or as one-hot
``(B, C)`` rows, computes in float32 whatever the input dtype, returns per-sample values (the Keras reduction
averages them) and is registered so that a saved model reloads without ``custom_objects``.

Each loss carries a class attribute ``head_type`` telling the trainer which model output it needs:
``"arcface"`` (cosine logits from ``NormDense``), ``"softmax"`` (a plain Dense/softmax head), ``"triplet"`` /
``"center"`` (embeddings), ``"distill"`` (teacher embeddings or logits). ``get_head_type(loss)`` answers it for
any loss, including plain Keras ones (``"softmax"``).

The heads (``NormDense``, ``PartialFCNormDense``) live in ``heads`` and the lazy optimizers in ``optimizers``; their
names are re-exported here because scripts written for earlier versions import them from ``losses``.

Everything computes with ``keras.ops`` and runs on the TensorFlow and JAX backends, with the same values. Stateful
losses (``AdaCosLoss``, ``CurricularFaceLoss``, ``AdaFaceLoss``, ``CenterLoss``) keep their state in non-trainable
``keras.Variable``s assigned inside ``call``; ``state_variables(loss)`` lists them, so a JAX training step can run
the loss in a ``keras.StatelessScope`` and read the new values back (Keras' own ``model.fit`` on JAX discards them:
the state keeps its initial value there). The TensorFlow-only mechanisms (``tf.distribute`` all-gathers, label range
asserts, the sparse center update) live in ``tensor_utils``, each with its JAX counterpart.
"""

import math
import os

import keras
import numpy as np

from keras_insightface import utils
from keras_insightface.nn.heads import (  # noqa: F401 (re-exported, see the module docstring)
    NormDense,
    PartialFCNormDense,
    partial_fc_logits,
    partial_fc_num_sampled,
    partial_fc_sample,
    split_norm_column,
)
from keras_insightface.nn.optimizers import LazyAdam, LazySGD  # noqa: F401 (re-exported)
from keras_insightface.nn.tensor_utils import (  # noqa: F401 (PACKAGE re-exported)
    PACKAGE,
    checked_labels,
    float32,
    gather_rows,
    global_batch,
    l2_normalize,
    on_tensorflow,
    register,
    state_variable,
    subtract_rows,
)

ACOS_GRAD_EPS = 1e-6  # gradients of acos are taken at cos clipped to [-1 + eps, 1 - eps]: finite at exactly +/-1


def get_head_type(loss):
    """The head a loss needs: its ``head_type`` attribute, ``"softmax"`` for losses that do not declare one."""
    return getattr(loss, "head_type", "softmax")


def state_variables(loss):
    """The ``keras.Variable``s holding a loss's state (centers, dynamic scale, EMA statistics), in attribute order;
    empty for a stateless loss or a plain function. A training step that runs the loss statelessly (JAX: inside a
    ``keras.StatelessScope``) maps these to their current values and stores the values the loss assigned."""
    attributes = vars(loss).values() if hasattr(loss, "__dict__") else ()
    return [value for value in attributes if isinstance(value, keras.Variable)]


@register
class FunctionLoss(keras.losses.Loss):
    """A per-sample loss function (``fn(y_true, y_pred) -> (B,)``) as a Keras ``Loss``: reduction, ``sample_weight``
    and serialization like the loss classes; keeps the function's ``head_type``."""

    def __init__(self, fn, **kwargs):
        if isinstance(fn, (str, dict)):
            fn = keras.saving.deserialize_keras_object(fn)
        if not callable(fn):
            raise ValueError(f"FunctionLoss needs a callable loss function, got {fn!r}")
        kwargs.setdefault("name", getattr(fn, "__name__", None))
        super().__init__(**kwargs)
        self.fn = fn
        self.head_type = get_head_type(fn)

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)

    def get_config(self):
        config = super().get_config()
        config["fn"] = keras.saving.serialize_keras_object(self.fn)
        return config


def as_loss(loss):
    """``loss`` if it is a Keras ``Loss`` already, else the function wrapped in ``FunctionLoss``."""
    return loss if isinstance(loss, keras.losses.Loss) else FunctionLoss(loss)


# ---------------------------------------------------------------------------------------------- label handling
def _flat_labels(labels):
    """Sparse labels of any shape ``(B,)`` / ``(B, 1)`` and dtype as int32 class indices ``(B,)``."""
    return keras.ops.reshape(keras.ops.cast(labels, "int32"), (-1,))


def _is_sparse(y_true):
    """Sparse labels have rank 1 or a last dimension of 1; everything else is treated as one-hot rows."""
    rank = len(y_true.shape)
    return rank == 1 or (rank == 2 and y_true.shape[-1] == 1)


def _labels_and_targets(y_true, num_classes):
    """Return ``(labels, targets)``: int32 class indices ``(B,)`` and the one-hot rows (``None`` when sparse).

    One-hot rows keep their values for the cross entropy (soft rows, e.g. from mixup, stay soft); the margin
    is applied to their argmax column.
    """
    y_true = keras.ops.convert_to_tensor(y_true)
    if _is_sparse(y_true):
        return checked_labels(_flat_labels(y_true), num_classes), None
    if len(y_true.shape) != 2:
        raise ValueError(f"labels must be sparse (B,) / (B, 1) or one-hot (B, C), got shape {y_true.shape}")
    if num_classes is not None and y_true.shape[-1] is not None and y_true.shape[-1] != num_classes:
        raise ValueError(f"one-hot labels have {y_true.shape[-1]} columns but the logits have {num_classes} classes")
    targets = float32(y_true)
    return keras.ops.cast(keras.ops.argmax(targets, axis=-1), "int32"), targets


def _sparse_labels(y_true, num_classes=None):
    """Class indices ``(B,)`` int32 from sparse or one-hot labels (range-checked when ``num_classes`` is given)."""
    return _labels_and_targets(y_true, num_classes)[0]


def _gather_target(logits, labels):
    """The logit of each sample's own class: ``logits[i, labels[i]]``. TensorFlow: one batched gather (labels are
    range-checked there); other backends: ``take_along_axis``."""
    if on_tensorflow():
        import tensorflow as tf

        return tf.gather(logits, labels, axis=1, batch_dims=1)
    return keras.ops.take_along_axis(logits, keras.ops.expand_dims(labels, 1), axis=1)[:, 0]


def _label_mask(labels, num_columns):
    """``(B, num_columns)`` bool, true at each sample's own class column (computed on the device from sparse labels)."""
    return keras.ops.expand_dims(labels, 1) == keras.ops.arange(num_columns, dtype=labels.dtype)[None]


def _replace_target(logits, labels, values):
    """``logits`` with ``logits[i, labels[i]]`` replaced by ``values[i]`` (gradient flows to both). TensorFlow: one
    scatter of B values (a select over a label mask costs another pass over the B x classes logits, 1.7x the time of
    ArcFace's loss and gradient at 20,000 classes); other backends: the select."""
    if on_tensorflow():
        import tensorflow as tf

        indices = tf.stack([tf.range(tf.shape(labels)[0]), tf.cast(labels, tf.int32)], axis=1)
        return tf.tensor_scatter_nd_update(logits, indices, tf.cast(values, logits.dtype))
    mask = _label_mask(labels, keras.ops.shape(logits)[-1])
    return keras.ops.where(mask, keras.ops.expand_dims(values, 1), logits)


def _log_probs(y_pred, from_logits):
    """Log-probabilities from logits, or from (unnormalized) probabilities as Keras' cross entropy treats them."""
    if from_logits:
        return keras.ops.log_softmax(y_pred, axis=-1)
    probs = y_pred / keras.ops.sum(y_pred, axis=-1, keepdims=True)
    return keras.ops.log(keras.ops.clip(probs, keras.config.epsilon(), 1.0 - keras.config.epsilon()))


def _cross_entropy(labels, targets, y_pred, from_logits=True, label_smoothing=0.0):
    """Per-sample categorical cross entropy with label smoothing ``y * (1 - ls) + ls / C``, sparse or one-hot.

    With sparse labels no ``(B, C)`` one-hot is built: ``-(1 - ls) * logp[y] - ls * mean(logp)``.
    """
    log_probs = _log_probs(y_pred, from_logits)
    if targets is None:
        loss = -_gather_target(log_probs, labels)
        if label_smoothing:
            loss = (1.0 - label_smoothing) * loss - label_smoothing * keras.ops.mean(log_probs, axis=-1)
        return loss
    if label_smoothing:
        num_classes = float32(keras.ops.shape(y_pred)[-1])
        targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
    return -keras.ops.sum(targets * log_probs, axis=-1)


# ---------------------------------------------------------------------------------------------- margins
def _safe_acos(cos_t):
    """``acos(c)`` with the exact value on [-1, 1] and a finite gradient also at ``c = +/-1``.

    The gradient is that of ``acos(clip(c, -1 + eps, 1 - eps))`` (zero beyond the clip), the value is exact.
    """
    exact = keras.ops.arccos(keras.ops.clip(cos_t, -1.0, 1.0))
    tight = keras.ops.arccos(keras.ops.clip(cos_t, -1.0 + ACOS_GRAD_EPS, 1.0 - ACOS_GRAD_EPS))
    return tight + keras.ops.stop_gradient(exact - tight)


def margin_target(cos_t, margin1=1.0, margin2=0.0, margin3=0.0, fallback="mirror", theta_clip=None):
    """The target-class logit of the ArcFace family: ``cos(m1 * theta + m2) - m3`` with ``theta = acos(c)``.

    This is the one place the margin is computed; the losses differ only in the branch used where the plain
    formula stops decreasing in theta (``c <= cos((pi - m2) / m1)``):

    - ``"mirror"`` (``ArcfaceLoss``, Keras_insightface): ``(-1 - m3) * 2 - t``, keeping the curve monotonic;
    - ``"linear"`` (MXNet loss-type 4 / arcface_torch ``easy_margin=False``, CurricularFace, MagFace; needs
      m1 = 1, m3 = 0): ``c - m2 * sin(pi - m2)``;
    - ``"none"``: no branch; with ``theta_clip=eps`` the angle ``m1 * theta + m2`` is clipped into
      ``[eps, pi - eps]`` first (AdaFace, Kim et al. 2022).

    ``margin2`` / ``margin3`` may be per-sample tensors (MagFace, AdaFace).
    """
    cos_t = float32(cos_t)
    theta = margin1 * _safe_acos(cos_t) + margin2
    if theta_clip is not None:
        theta = keras.ops.clip(theta, theta_clip, math.pi - theta_clip)
    target = keras.ops.cos(theta) - margin3
    if fallback == "none":
        return target
    threshold = keras.ops.cos((math.pi - margin2) / margin1)
    if fallback == "mirror":
        return keras.ops.where(cos_t > threshold, target, (-1.0 - margin3) * 2.0 - target)
    if fallback == "linear":
        return keras.ops.where(cos_t > threshold, target, cos_t - margin2 * keras.ops.sin(math.pi - margin2))
    raise ValueError(f"fallback must be 'mirror', 'linear' or 'none', got {fallback!r}")


class _CosineLoss(keras.losses.Loss):
    """Base of the losses on cosine logits: float32 casting, label parsing, scaled cross entropy, config.

    ``append_norm`` tells the trainer to build ``NormDense(..., append_norm=loss.append_norm)``.
    """

    head_type = "arcface"
    append_norm = False

    def __init__(self, scale=64.0, from_logits=True, label_smoothing=0.0, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.scale, self.from_logits, self.label_smoothing = float(scale), bool(from_logits), float(label_smoothing)

    def call(self, y_true, y_pred):
        cosines = float32(y_pred)
        labels, targets = _labels_and_targets(y_true, cosines.shape[-1])
        logits = self.margin_logits(cosines, labels)
        return _cross_entropy(labels, targets, logits, self.from_logits, self.label_smoothing)

    def margin_logits(self, cosines, labels):
        """Scaled logits with the margin applied to each sample's target column."""
        raise NotImplementedError

    def get_config(self):
        config = super().get_config()
        config.update({"scale": self.scale, "from_logits": self.from_logits, "label_smoothing": self.label_smoothing})
        return config


class _NormAwareLoss(_CosineLoss):
    """Base of MagFace / AdaFace: ``y_pred`` is ``NormDense(append_norm=True)`` output, last column ``-||x||``."""

    append_norm = True

    def call(self, y_true, y_pred):
        cosines, norms = split_norm_column(y_pred)
        labels, targets = _labels_and_targets(y_true, cosines.shape[-1])
        logits = self.margin_logits(cosines, labels, norms)
        loss = _cross_entropy(labels, targets, logits, self.from_logits, self.label_smoothing)
        return loss + self.norm_regularizer(norms)

    def margin_logits(self, cosines, labels, norms):
        """Scaled logits with a norm-dependent margin on each sample's target column."""
        raise NotImplementedError

    def norm_regularizer(self, norms):
        """Per-sample term added to the cross entropy (none by default)."""
        return 0.0


@register
class ArcfaceLoss(_CosineLoss):
    """Combined-margin ArcFace (InsightFace, Deng et al. 2019): target ``cos(m1*theta + m2) - m3``, times scale.

    Margin sets: norm softmax (1, 0, 0), SphereFace (1.5, 0, 0), CosFace (1, 0, 0.35), ArcFace (1, 0.5, 0),
    combined (1.2, 0.4, 0), (1.1, 0, 0.35), (1, 0.3, 0.2), (0.9, 0.4, 0.15). Below ``cos((pi - m2)/m1)`` the
    target is mirrored to ``(-1 - m3) * 2 - t`` so it keeps decreasing with theta.
    """

    def __init__(
        self, margin1=1.0, margin2=0.5, margin3=0.0, scale=64.0, from_logits=True, label_smoothing=0, **kwargs
    ):
        super().__init__(scale=scale, from_logits=from_logits, label_smoothing=label_smoothing, **kwargs)
        self.margin1, self.margin2, self.margin3 = float(margin1), float(margin2), float(margin3)

    def margin_logits(self, cosines, labels):
        target = margin_target(_gather_target(cosines, labels), self.margin1, self.margin2, self.margin3, "mirror")
        return _replace_target(cosines, labels, target) * self.scale

    def get_config(self):
        config = super().get_config()
        config.update({"margin1": self.margin1, "margin2": self.margin2, "margin3": self.margin3})
        return config


@register
class ArcfaceLossSimple(_CosineLoss):
    """ArcFace as MXNet loss-type 4 (old name ``ArcfaceLossT4``): target ``c*cos m - sqrt(1-c^2)*sin m`` where
    ``c > cos(pi - m)``, else ``c - m*sin(pi - m)`` (arcface_torch ``easy_margin=False``)."""

    def __init__(self, margin=0.5, scale=64.0, from_logits=True, label_smoothing=0, **kwargs):
        super().__init__(scale=scale, from_logits=from_logits, label_smoothing=label_smoothing, **kwargs)
        self.margin = float(margin)

    def margin_logits(self, cosines, labels):
        target = margin_target(_gather_target(cosines, labels), 1.0, self.margin, 0.0, "linear")
        return _replace_target(cosines, labels, target) * self.scale

    def get_config(self):
        config = super().get_config()
        config["margin"] = self.margin
        return config


ArcfaceLossT4 = ArcfaceLossSimple


@register
class CosFaceLoss(ArcfaceLoss):
    """CosFace / large-margin cosine loss (Wang et al. 2018): target ``c - m``, times scale.

    ``ArcfaceLoss(1, 0, m)``: the mirrored branch only starts at ``c = -1``, where it equals ``c - m``.
    """

    def __init__(self, margin=0.35, scale=64.0, from_logits=True, label_smoothing=0, **kwargs):
        for key in ("margin1", "margin2", "margin3"):
            kwargs.pop(key, None)
        super().__init__(1.0, 0.0, margin, scale, from_logits, label_smoothing, **kwargs)

    def get_config(self):
        config = super().get_config()
        config["margin"] = config.pop("margin3")
        config.pop("margin1")
        config.pop("margin2")
        return config


@register
def scale_softmax(y_true, y_pred, scale=64.0, from_logits=True, label_smoothing=0):
    """Cross entropy on ``scale * cos`` logits, no margin (Keras_insightface's ``scale_softmax``); per-sample values."""
    cosines = float32(y_pred)
    labels, targets = _labels_and_targets(y_true, cosines.shape[-1])
    return _cross_entropy(labels, targets, cosines * scale, from_logits, label_smoothing)


scale_softmax.head_type = "arcface"


@register
class AdaCosLoss(_CosineLoss):
    """AdaCos (Zhang et al. 2019): logits ``s * c``, no margin, scale fixed at ``sqrt(2) * log(C - 1)`` or dynamic.

    Dynamic: ``s = log(B_avg) / cos(min(max_median, theta_med))``, ``B_avg`` = batch mean over samples of
    ``sum_{j != y} exp(s_prev * c_j)``, ``theta_med`` = median target angle (the lower middle value for an even
    count, as ``torch.median``), computed from the global batch and used for this batch already. The scale is
    kept in a non-trainable variable (``scale_variable``); ``num_classes`` only seeds it (default: from logits).
    """

    def __init__(
        self,
        num_classes=None,
        is_dynamic=True,
        max_median=math.pi / 4,
        from_logits=True,
        label_smoothing=0,
        **kwargs,
    ):
        kwargs.pop("scale", None)
        super().__init__(scale=0.0, from_logits=from_logits, label_smoothing=label_smoothing, **kwargs)
        if num_classes is not None and num_classes < 3:
            raise ValueError(f"AdaCosLoss needs num_classes >= 3, got {num_classes}")
        self.num_classes, self.is_dynamic, self.max_median = num_classes, bool(is_dynamic), float(max_median)
        self.scale_variable = state_variable(0.0, "adacos_scale") if self.is_dynamic else None

    def fixed_scale(self, num_classes):
        """The AdaCos fixed scale ``sqrt(2) * log(C - 1)``."""
        return math.sqrt(2.0) * math.log((self.num_classes or num_classes) - 1)

    def margin_logits(self, cosines, labels):
        fixed = self.fixed_scale(cosines.shape[-1])
        if not self.is_dynamic:
            return cosines * fixed
        previous = keras.ops.convert_to_tensor(self.scale_variable)
        previous = keras.ops.where(previous > 0, previous, fixed)  # 0: not set yet, start from the fixed scale
        target_cos = _gather_target(cosines, labels)
        all_sum = keras.ops.sum(keras.ops.exp(previous * cosines), axis=-1)
        non_target_sum = keras.ops.stop_gradient(all_sum - keras.ops.exp(previous * target_cos))
        target_cos, non_target_sum = global_batch(keras.ops.stop_gradient(target_cos), non_target_sum)
        theta = keras.ops.sort(keras.ops.arccos(keras.ops.clip(target_cos, -1.0, 1.0)))
        theta_med = keras.ops.minimum(self.max_median, theta[(keras.ops.shape(theta)[0] - 1) // 2])
        scale = keras.ops.log(keras.ops.mean(non_target_sum)) / keras.ops.cos(theta_med)
        self.scale_variable.assign(scale)
        return cosines * scale

    def get_config(self):
        config = super().get_config()
        config.pop("scale")
        config.update({"num_classes": self.num_classes, "is_dynamic": self.is_dynamic, "max_median": self.max_median})
        return config


@register
class CurricularFaceLoss(ArcfaceLossSimple):
    """CurricularFace (Huang et al. 2020): ArcFace target (``ArcfaceLossSimple``'s) plus hard negatives
    re-weighted, ``c_j -> c_j * (t + c_j)`` where ``c_j > cos(theta_y + m)``; ``t`` is an EMA of the mean
    target cosine, ``t = momentum * mean(c_y) + (1 - momentum) * t`` (non-trainable, initial 0, global batch)."""

    def __init__(self, margin=0.5, scale=64.0, momentum=0.01, from_logits=True, label_smoothing=0, **kwargs):
        super().__init__(margin=margin, scale=scale, from_logits=from_logits, label_smoothing=label_smoothing, **kwargs)
        self.momentum = float(momentum)
        self.hard_scale = state_variable(0.0, "curricular_t")

    def margin_logits(self, cosines, labels):
        target_cos = _gather_target(cosines, labels)
        target = margin_target(target_cos, 1.0, self.margin, 0.0, "linear")
        target_with_margin = margin_target(target_cos, 1.0, self.margin, 0.0, "none")
        batch_mean = keras.ops.mean(global_batch(keras.ops.stop_gradient(target_cos)))
        hard_scale = self.momentum * batch_mean + (1.0 - self.momentum) * self.hard_scale
        self.hard_scale.assign(hard_scale)
        hard = cosines > keras.ops.expand_dims(target_with_margin, 1)
        cosines = keras.ops.where(hard, cosines * (hard_scale + cosines), cosines)
        return _replace_target(cosines, labels, target) * self.scale

    def get_config(self):
        config = super().get_config()
        config["momentum"] = self.momentum
        return config


@register
class MagFaceLoss(_NormAwareLoss):
    """MagFace (Meng et al. 2021), on ``NormDense(append_norm=True)`` output. With ``a = clip(||x||, l_a, u_a)``:
    margin ``m(a) = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m`` in the ``ArcfaceLossSimple`` target, plus
    ``lambda_g * g(a)`` with ``g(a) = a / u_a^2 + 1 / a``."""

    def __init__(
        self,
        min_feature_norm=10.0,
        max_feature_norm=110.0,
        min_margin=0.45,
        max_margin=0.8,
        scale=64.0,
        regularizer_loss_lambda=35.0,
        from_logits=True,
        label_smoothing=0,
        **kwargs,
    ):
        super().__init__(scale=scale, from_logits=from_logits, label_smoothing=label_smoothing, **kwargs)
        if not 0 < min_feature_norm < max_feature_norm:
            raise ValueError(
                f"need 0 < min_feature_norm < max_feature_norm, got {min_feature_norm}, {max_feature_norm}"
            )
        self.min_feature_norm, self.max_feature_norm = float(min_feature_norm), float(max_feature_norm)
        self.min_margin, self.max_margin = float(min_margin), float(max_margin)
        self.regularizer_loss_lambda = float(regularizer_loss_lambda)

    def _clipped_norms(self, norms):
        """Feature norms clipped to ``[min_feature_norm, max_feature_norm]`` (``a`` of the paper)."""
        return keras.ops.clip(norms, self.min_feature_norm, self.max_feature_norm)

    def margin_logits(self, cosines, labels, norms):
        slope = (self.max_margin - self.min_margin) / (self.max_feature_norm - self.min_feature_norm)
        margin = slope * (self._clipped_norms(norms) - self.min_feature_norm) + self.min_margin
        target = margin_target(_gather_target(cosines, labels), 1.0, margin, 0.0, "linear")
        return _replace_target(cosines, labels, target) * self.scale

    def norm_regularizer(self, norms):
        norms = self._clipped_norms(norms)
        return self.regularizer_loss_lambda * (norms / self.max_feature_norm**2 + 1.0 / norms)

    def get_config(self):
        config = super().get_config()
        for key in ("min_feature_norm", "max_feature_norm", "min_margin", "max_margin", "regularizer_loss_lambda"):
            config[key] = getattr(self, key)
        return config


@register
class AdaFaceLoss(_NormAwareLoss):
    """AdaFace (Kim et al. 2022), on ``NormDense(append_norm=True)`` output. With ``a = clip(||x||, 1e-3, 100)``
    (no gradient), EMA batch statistics ``mu, sigma`` (momentum ``mean_std_alpha``, initial 20 / 100, unbiased
    std, global batch) and ``z = clip(h * (a - mu) / (sigma + 1e-3), -1, 1)``: target
    ``cos(clip(theta - m*z, 1e-3, pi - 1e-3)) - (m + m*z)``, times scale."""

    def __init__(
        self,
        margin=0.4,
        margin_alpha=0.333,
        mean_std_alpha=0.01,
        scale=64.0,
        from_logits=True,
        label_smoothing=0,
        **kwargs,
    ):
        super().__init__(scale=scale, from_logits=from_logits, label_smoothing=label_smoothing, **kwargs)
        self.margin, self.margin_alpha, self.mean_std_alpha = float(margin), float(margin_alpha), float(mean_std_alpha)
        self.batch_mean = state_variable(20.0, "adaface_batch_mean")
        self.batch_std = state_variable(100.0, "adaface_batch_std")

    def _update_norm_statistics(self, norms):
        """EMA update of the norm mean / unbiased std from the global batch; returns the new values."""
        norms = global_batch(norms)
        count = float32(keras.ops.shape(norms)[0])
        mean = keras.ops.mean(norms)
        std = keras.ops.sqrt(keras.ops.sum(keras.ops.square(norms - mean)) / keras.ops.maximum(count - 1.0, 1.0))
        alpha = self.mean_std_alpha
        new_mean = alpha * mean + (1.0 - alpha) * self.batch_mean
        new_std = alpha * std + (1.0 - alpha) * self.batch_std
        self.batch_mean.assign(new_mean)
        self.batch_std.assign(new_std)
        return new_mean, new_std

    def margin_logits(self, cosines, labels, norms):
        norms = keras.ops.stop_gradient(keras.ops.clip(norms, 1e-3, 100.0))
        mean, std = self._update_norm_statistics(norms)
        scaler = keras.ops.clip(self.margin_alpha * (norms - mean) / (std + 1e-3), -1.0, 1.0)
        margin = self.margin * scaler
        target_cos = _gather_target(cosines, labels)
        target = margin_target(target_cos, 1.0, -margin, self.margin + margin, "none", theta_clip=1e-3)
        return _replace_target(cosines, labels, target) * self.scale

    def get_config(self):
        config = super().get_config()
        config.update({"margin": self.margin, "margin_alpha": self.margin_alpha, "mean_std_alpha": self.mean_std_alpha})
        return config


@register
class MarginSoftmax(keras.losses.Loss):
    """Margin softmax on softmax probabilities (Keras_insightface's ``margin_softmax``): the target probability ``p`` is
    replaced by ``(p**power + scale * p) / 2`` before the cross entropy (Keras semantics for probabilities)."""

    head_type = "softmax"

    def __init__(self, power=2.0, scale=0.4, from_logits=False, label_smoothing=0, **kwargs):
        super().__init__(**kwargs)
        self.power, self.scale = float(power), float(scale)
        self.from_logits, self.label_smoothing = bool(from_logits), float(label_smoothing)

    def call(self, y_true, y_pred):
        probs = float32(y_pred)
        labels, targets = _labels_and_targets(y_true, probs.shape[-1])
        target = _gather_target(probs, labels)
        probs = _replace_target(probs, labels, (target**self.power + self.scale * target) / 2.0)
        return _cross_entropy(labels, targets, probs, self.from_logits, self.label_smoothing)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "power": self.power,
                "scale": self.scale,
                "from_logits": self.from_logits,
                "label_smoothing": self.label_smoothing,
            }
        )
        return config


@register
def margin_softmax(y_true, y_pred):
    """Function form of ``MarginSoftmax()`` with its defaults, as Keras_insightface's schedules name it."""
    return MarginSoftmax(reduction=None)(y_true, y_pred)


margin_softmax.head_type = "softmax"


# ---------------------------------------------------------------------------------------------- center loss
@register
class CenterLoss(keras.losses.Loss):
    """Center loss (Wen et al. 2016) on embeddings: per sample ``sum((e - c_y)^2) / 2``.

    After computing the loss the centers (non-trainable, ``(num_classes, emb_shape)``) move towards the batch:
    ``c_y -= alpha * sum_{i: y_i = y} (c_y - e_i) / (1 + n_y)`` with ``n_y`` the count of class ``y`` in the
    batch (no gradient through the update). Under ``tf.distribute`` the update is computed from the global batch
    (labels and embeddings all-gathered), so every replica applies the same one. Create the loss inside the
    strategy scope. ``initial_file``: a ``.npy`` of centers to start from (e.g. ``<stem>_centers.npy``), used
    when it exists. The update is sparse on TensorFlow (only the batch's rows) and dense on JAX, where a training
    step runs the loss in a ``keras.StatelessScope`` and reads the new centers with ``scope.get_current_value``.
    """

    head_type = "center"

    def __init__(self, num_classes, emb_shape=512, alpha=0.5, initial_file=None, **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.emb_shape, self.alpha = int(num_classes), int(emb_shape), float(alpha)
        self.initial_file = None if initial_file is None else os.fspath(initial_file)
        self.centers = state_variable(self._initial_centers(), "centers")

    def _initial_centers(self):
        """Zeros, or the centers stored in ``initial_file`` when it exists."""
        if self.initial_file is None or not os.path.exists(self.initial_file):
            return np.zeros((self.num_classes, self.emb_shape), dtype="float32")
        return self._read_centers(self.initial_file)

    def _read_centers(self, path):
        """Centers from a ``.npy`` file (no pickle), checked against this loss's shape."""
        centers = np.load(path, allow_pickle=False)
        if centers.shape != (self.num_classes, self.emb_shape):
            expected = (self.num_classes, self.emb_shape)
            raise ValueError(f"centers in {path} have shape {centers.shape}, expected {expected}")
        return centers.astype("float32")

    def restore_centers(self, path):
        """Load the centers saved in ``path`` (e.g. by an interrupted run)."""
        self.centers.assign(self._read_centers(path))

    def call(self, y_true, y_pred):
        """Per-sample loss with the centers before this batch's update; the update follows (program order orders the
        read before the write in a ``tf.function`` and in a ``keras.StatelessScope``)."""
        embeddings = float32(y_pred)
        labels = _sparse_labels(y_true, self.num_classes)
        loss = keras.ops.sum(keras.ops.square(embeddings - gather_rows(self.centers, labels)), axis=-1) / 2.0
        self._update_centers(*global_batch(labels, keras.ops.stop_gradient(embeddings)))
        return loss

    def _update_centers(self, labels, embeddings):
        """Apply ``c_y -= alpha * (c_y - e) / (1 + n_y)`` for every sample of the (global) batch."""
        appear_times = _count(_same_label_mask(labels), axis=1)  # a static-shape (XLA) count of each sample's class
        moves = self.alpha * (gather_rows(self.centers, labels) - embeddings)
        subtract_rows(self.centers, labels, moves / keras.ops.expand_dims(1.0 + appear_times, 1))

    def save_centers(self, path):
        """Write the centers to ``path`` (``.npy``) atomically."""
        with utils.atomic_write(path, suffix=".npy") as tmp_path:
            np.save(tmp_path, self.centers.numpy())

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_classes": self.num_classes,
                "emb_shape": self.emb_shape,
                "alpha": self.alpha,
                "initial_file": self.initial_file,
            }
        )
        return config


# ---------------------------------------------------------------------------------------------- triplet losses
def _same_label_mask(labels):
    """``(B, B)`` bool, true where two samples share a label (the diagonal included)."""
    return keras.ops.expand_dims(labels, 0) == keras.ops.expand_dims(labels, 1)


def _count(mask, axis=None):
    """Number of true entries of a bool mask along ``axis``, as float32."""
    return keras.ops.sum(float32(mask), axis=axis)


def batch_hard_from_distances(labels, dists, alpha=0.35):
    """Per-anchor batch-hard triplet loss ``max(max_pos d - min_neg d + alpha, 0)`` from distances in [0, 2].

    With cosine distances ``d = 1 - s`` this is Keras_insightface's ``max_neg s - min_pos s + alpha``; a missing positive
    or negative counts as the bound of the range (as its fill values 1 / -1 for similarities).
    """
    labels, dists = _flat_labels(labels), float32(dists)
    positive = _same_label_mask(labels)
    hardest_pos = keras.ops.max(keras.ops.where(positive, dists, 0.0), axis=-1)
    hardest_neg = keras.ops.min(keras.ops.where(positive, 2.0, dists), axis=-1)
    return keras.ops.maximum(hardest_pos - hardest_neg + alpha, 0.0)


def batch_all_from_distances(labels, dists, alpha=0.35):
    """Per-anchor batch-all loss of Keras_insightface, from cosine distances ``d = 1 - s``:
    ``mean_pos d + sum_{valid neg} s / (n_valid + 1)``, valid negatives having ``d - max_pos d < alpha``."""
    labels, dists = _flat_labels(labels), float32(dists)
    positive = _same_label_mask(labels)
    pos_dists = keras.ops.where(positive, dists, 0.0)
    pos_loss = keras.ops.sum(pos_dists, axis=-1) / _count(positive, axis=-1)
    hardest_pos = keras.ops.max(pos_dists, axis=-1, keepdims=True)
    valid_neg = keras.ops.logical_and(keras.ops.logical_not(positive), dists - hardest_pos < alpha)
    neg_sum = keras.ops.sum(keras.ops.where(valid_neg, 1.0 - dists, 0.0), axis=-1)
    return pos_loss + neg_sum / (_count(valid_neg, axis=-1) + 1.0)


def batch_all_hermans_from_distances(labels, dists, alpha=0.35):
    """Batch-all of Hermans et al. 2017: mean of ``max(d_ap - d_an + alpha, 0)`` over the triplets where it is
    positive; returned per anchor (anchor sum scaled so that the batch mean is that value). Memory O(B^3)."""
    labels, dists = _flat_labels(labels), float32(dists)
    positive = _same_label_mask(labels)
    indices = keras.ops.arange(keras.ops.shape(labels)[0])
    pos_pairs = keras.ops.logical_and(positive, keras.ops.expand_dims(indices, 0) != keras.ops.expand_dims(indices, 1))
    valid = keras.ops.logical_and(
        keras.ops.expand_dims(pos_pairs, 2), keras.ops.expand_dims(keras.ops.logical_not(positive), 1)
    )
    triplets = keras.ops.maximum(keras.ops.expand_dims(dists, 2) - keras.ops.expand_dims(dists, 1) + alpha, 0.0)
    triplets = keras.ops.where(valid, triplets, 0.0)
    batch_size = float32(keras.ops.shape(labels)[0])
    return keras.ops.sum(triplets, axis=(1, 2)) * batch_size / keras.ops.maximum(_count(triplets > 0), 1.0)


def cosine_distances(embeddings):
    """``1 - cos`` between all rows of L2-normalized ``embeddings``, in [0, 2]."""
    return 1.0 - keras.ops.matmul(embeddings, keras.ops.transpose(embeddings))


def euclidean_distances(embeddings):
    """Euclidean distances between all rows of L2-normalized ``embeddings``, in [0, 2] (finite gradient at 0)."""
    squared = 2.0 - 2.0 * keras.ops.matmul(embeddings, keras.ops.transpose(embeddings))
    return keras.ops.sqrt(keras.ops.maximum(squared, 1e-12))


class _TripletLoss(keras.losses.Loss):
    """Base of the online triplet losses: labels + embeddings -> per-anchor loss on L2-normalized embeddings."""

    head_type = "triplet"
    distance_fn = staticmethod(cosine_distances)
    loss_fn = None

    def __init__(self, alpha=0.35, **kwargs):
        super().__init__(**kwargs)
        self.alpha = float(alpha)

    def call(self, y_true, y_pred):
        """Triplets are mined over the global batch, so the loss equals the one-device loss of the same global batch:
        under ``tf.distribute`` it is all-gathered (gradients flow back); a JAX SPMD step sees it whole already."""
        labels, embeddings = global_batch(_sparse_labels(y_true), float32(y_pred))
        embeddings = l2_normalize(embeddings, axis=-1)
        return self.loss_fn(labels, self.distance_fn(embeddings), self.alpha)

    def get_config(self):
        config = super().get_config()
        config["alpha"] = self.alpha
        return config


@register
class BatchHardTripletLoss(_TripletLoss):
    """Batch-hard triplet loss (Hermans et al. 2017) on cosine similarity: ``max(max_neg s - min_pos s + alpha, 0)``."""

    loss_fn = staticmethod(batch_hard_from_distances)


@register
class BatchAllTripletLoss(_TripletLoss):
    """Keras_insightface's batch-all loss on cosine similarity (see ``batch_all_from_distances``)."""

    loss_fn = staticmethod(batch_all_from_distances)


@register
class BatchHardTripletLossEuclidean(_TripletLoss):
    """Batch-hard triplet loss on Euclidean distances of L2-normalized embeddings: ``max(max_pos d - min_neg d + a, 0)``."""

    distance_fn = staticmethod(euclidean_distances)
    loss_fn = staticmethod(batch_hard_from_distances)


@register
class BatchAllTripletLossEuclidean(_TripletLoss):
    """Batch-all triplet loss of Hermans et al. 2017 on Euclidean distances of L2-normalized embeddings."""

    distance_fn = staticmethod(euclidean_distances)
    loss_fn = staticmethod(batch_all_hermans_from_distances)


@register
class OfflineTripletLoss(_TripletLoss):
    """Triplet loss on pre-mined triplets: the batch is ``[anchors; positives; negatives]`` (3 equal thirds),
    per triplet ``max(s_an - s_ap + alpha, 0)`` on cosine similarity; labels are ignored."""

    def call(self, y_true, y_pred):
        embeddings = l2_normalize(float32(y_pred), axis=-1)
        batch = embeddings.shape[0]
        if batch is not None and batch % 3:
            raise ValueError(
                f"OfflineTripletLoss needs a batch of 3 equal thirds (anchor, positive, negative), got {batch}"
            )
        anchor, positive, negative = keras.ops.split(embeddings, 3, axis=0)
        pos_sim = keras.ops.sum(anchor * positive, axis=-1)
        neg_sim = keras.ops.sum(anchor * negative, axis=-1)
        return keras.ops.maximum(neg_sim - pos_sim + self.alpha, 0.0)


# ---------------------------------------------------------------------------------------------- distillation
@register
def distiller_loss_cosine(true_emb, pred_emb):
    """Embedding distillation ``1 - cos(teacher, student)`` per sample."""
    true_emb = l2_normalize(float32(true_emb), axis=-1)
    pred_emb = l2_normalize(float32(pred_emb), axis=-1)
    return 1.0 - keras.ops.sum(true_emb * pred_emb, axis=-1)


@register
def distiller_loss_euclidean(true_emb, pred_emb):
    """Embedding distillation ``sum((l2n(teacher) - l2n(student))^2)`` per sample (Keras_insightface's distillation loss)."""
    true_emb = l2_normalize(float32(true_emb), axis=-1)
    pred_emb = l2_normalize(float32(pred_emb), axis=-1)
    return keras.ops.sum(keras.ops.square(true_emb - pred_emb), axis=-1)


distiller_loss_cosine.head_type = "distill"
distiller_loss_euclidean.head_type = "distill"


@register
class DistillKLDivergenceLoss(keras.losses.Loss):
    """Logit distillation (Hinton et al. 2015): ``KL(softmax(t / T) || softmax(s / T))`` per sample, with teacher
    logits as ``y_true`` and student logits as ``y_pred``; no ``T^2`` factor (as Keras_insightface)."""

    head_type = "distill"

    def __init__(self, temperature=10.0, **kwargs):
        super().__init__(**kwargs)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def call(self, y_true, y_pred):
        teacher_log = keras.ops.log_softmax(float32(y_true) / self.temperature, axis=-1)
        student_log = keras.ops.log_softmax(float32(y_pred) / self.temperature, axis=-1)
        return keras.ops.sum(keras.ops.exp(teacher_log) * (teacher_log - student_log), axis=-1)

    def get_config(self):
        config = super().get_config()
        config["temperature"] = self.temperature
        return config

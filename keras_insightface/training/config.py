"""``TrainConfig``: every option of ``train.Train`` with its default and meaning, declared once.

The input options (augmentation, sampling, caching) come from ``data.PipelineOptions``, which the data pipeline
reads; ``Train(..., **options)`` and a recipe's ``train_kwargs`` are checked against these fields, so a misspelled
option is an error that names the closest real ones.
"""

import dataclasses
import difflib

from keras_insightface.data import pipeline as data
from keras_insightface.training import checks, sharding
from keras_insightface.training.checks import boolean, either, integer, number, one_of, optional, path, sequence_of


@dataclasses.dataclass
class TrainConfig(data.PipelineOptions):
    """Every ``Train`` option with its default (the input options come from ``data.PipelineOptions``)."""

    batch_size: int = 128  # per replica: the global batch is batch_size * replicas
    lr_base: float = 0.001
    lr_decay: float = 0.05
    lr_decay_steps: object = 0  # see myCallbacks.build_lr_scheduler
    lr_min: float = 0.0
    lr_warmup_steps: int = 0
    lr_decay_power: float = 0  # > 0: polynomial decay over lr_decay_steps (arcface_torch's ViTs: 2)
    eval_freq: int = 1  # > 1 also evaluates every eval_freq batches
    eval_batch_size: int = 128
    eval_image_scale: float = data.SEEDS_SCALE
    output_weight_decay: float = 0  # L2 of the heads: 0 none, (0, 1) that value / 2, >= 1 x the basic model's L2
    steps_per_execution: int = 1
    jit_compile: bool = False
    mixed_precision: str | None = None  # "mixed_float16" / "mixed_bfloat16"
    partial_fc_rate: float = 1.0  # < 1: a Partial FC head samples this share of the classes per step
    sharded_head: bool | int = False  # JAX: split the cosine head's classes over all (True) or n devices
    fast_kernels: bool = True  # fused batch norm, PReLU and momentum SGD kernels in the step (TensorFlow)
    gradient_accumulation_steps: int = 1  # > 1: each update sums the gradients of that many batches
    gradient_clip_norm: float | None = None  # clip the global norm of each update's gradient (all replicas)
    plot_history: bool = True  # redraw <stem>_hist.png at each epoch end
    resume: object = True  # continue an interrupted run of the same save_path; "checkpoint": even with another model
    checkpoint_minutes: float | None = None  # also save the run every that many minutes, in the middle of epochs
    verbose: int = 1

    def __post_init__(self):
        checks.check_options(OPTION_RULES, dataclasses.asdict(self), what="Train option")
        if self.partial_fc_rate < 1 and self.mixup_alpha > 0:
            raise ValueError("partial_fc_rate < 1 does not support mixup_alpha > 0")
        sharding.check_backend(self.sharded_head)

    @classmethod
    def from_options(cls, options):
        """The config of ``Train(**options)``; a misspelled option is an error naming the closest ones."""
        known = [field.name for field in dataclasses.fields(cls)]
        for key in options:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=3, cutoff=0.75)
                hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
                raise TypeError(f"unknown Train option {key!r}{hint}")
        return cls(**options)


# The type and range of every option, checked when a ``TrainConfig`` is made: a bad value is refused before any model
# or data work, in one line naming the option and the value.
OPTION_RULES = {
    "random_status": integer(-1),
    "random_crop": sequence_of(integer(1), lengths=(2, 3)),
    "random_cutout_mask_area": number(0, 1),
    "mixup_alpha": number(0),
    "image_per_class": integer(0),
    "cache_dir": optional(path),
    "verify_images": boolean,
    "seed": optional(integer()),
    "shuffle_buffer": integer(1),
    "batch_size": integer(1),
    "lr_base": number(0),
    "lr_decay": number(0),
    "lr_decay_steps": either(number(0), sequence_of(number(0), lengths=None)),
    "lr_min": number(0),
    "lr_warmup_steps": integer(0),
    "lr_decay_power": number(0),
    "eval_freq": integer(1),
    "eval_batch_size": integer(1),
    "eval_image_scale": number(0, low_open=True),
    "output_weight_decay": number(0),
    "steps_per_execution": integer(1),
    "jit_compile": boolean,
    "mixed_precision": one_of(None, "mixed_float16", "mixed_bfloat16"),
    "partial_fc_rate": number(0, 1, low_open=True),
    "sharded_head": either(boolean, integer(1)),
    "fast_kernels": boolean,
    "gradient_accumulation_steps": integer(1),
    "gradient_clip_norm": optional(number(0, low_open=True)),
    "plot_history": boolean,
    "resume": one_of(True, False, "checkpoint"),
    "checkpoint_minutes": optional(number(0, low_open=True)),
    "verbose": integer(0, 2),
}

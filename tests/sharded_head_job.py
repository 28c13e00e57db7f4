"""Subprocess for test_sharded_head: the sharded head on JAX with host devices. Prints one JSON line after RESULT.

Run with ``KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=N``; ``python sharded_head_job.py
MODES OUT_DIR TRAIN_DIR BIN_PATH`` (modes separated by commas, each gets the three paths). Modes: ``step`` (one step
with the head sharded over the devices against the replicated step, and the memory of both), ``partial`` (Partial FC
on the shards against a one-device reference), ``demo`` (a short run on the demo data, sharded and replicated),
``kill`` / ``resume`` (a sharded run SIGKILLed in its second epoch; resumed, on other devices).
"""

import json
import os
import sys

import jax
import keras
import numpy as np
from helpers import tiny_basic_model

from keras_insightface.data import pipeline as data
from keras_insightface.models import zoo as models
from keras_insightface.nn import heads, losses
from keras_insightface.training import runner_jax, sharding, stages, train

EMB, SIZE = 32, 8


def basic_model():
    return tiny_basic_model((SIZE, SIZE, 3), emb=EMB)


def one_batch(batch, classes, seed):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, SIZE, SIZE, 3)).astype("float32")
    return images, {data.LABEL_KEY: rng.choice(classes, size=batch, replace=False).astype("int32")}


def built_stage(loss, classes, weights, partial_fc_rate=1.0, output_weight_decay=0, **options):
    """A stage of a fresh basic model with the given start weights (model, then optimizer), SGD with momentum."""
    keras.utils.set_random_seed(0)
    builder = stages.StageBuilder(
        basic_model(), classes=classes, partial_fc_rate=partial_fc_rate, output_weight_decay=output_weight_decay
    )
    stage = builder.build(loss, optimizer=keras.optimizers.SGD(0.1, momentum=0.9), **options)
    if weights is not None:
        head = stage.model.get_layer("arcface")
        for variable, value in zip(stage.model.weights, weights):
            variable.assign(value if variable is not head.kernel else _padded_like(value, head))
    return stage


def _padded_like(value, head):
    padding = [(0, 0), (0, 0)]
    padding[head.class_axis] = (0, head.kernel.shape[head.class_axis] - value.shape[head.class_axis])
    return np.pad(value, padding)


def run_one_step(stage, classes, batch):
    """One update by the runner's jitted step, compiled once; returns its logs and the compiled step's scratch
    memory per device. The variables hold the updated values afterwards."""
    runner = runner_jax.JaxStepRunner()
    distribution = keras.distribution.distribution()
    if distribution is not None:
        batch = jax.device_put(batch, sharding.batch_sharding(distribution, len(batch[0])))
    lists = runner._state_variables(stage)
    state = sharding.placed(tuple([variable.value for variable in variables] for variables in lists))
    compiled = runner._step(stage, classes).lower(state, (batch,)).compile()
    state, logs = compiled(state, (batch,))
    for variables, values in zip(lists, state):
        for variable, value in zip(variables, values):
            variable.assign(value)
    return {key: float(value) for key, value in logs.items()}, compiled.memory_analysis().temp_size_in_bytes


def head_arrays(stage):
    """The head's real kernel (classes * K columns or rows) and its SGD momentum, as numpy."""
    head = stage.model.get_layer("arcface")
    slot = next(var for var in stage.optimizer.variables if var.shape == head.kernel.shape)
    real = head.units * head.loss_top_k
    cut = (lambda x: x[:, :real]) if head.class_axis == 1 else (lambda x: x[:real])
    return cut(np.asarray(head.kernel.value)), cut(np.asarray(slot.value))


def relative(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-12))


def per_device_bytes(variable):
    return sorted({shard.data.nbytes for shard in variable.value.addressable_shards}), variable.value.nbytes


# ---------------------------------------------------------------------------------------------- step
STEP_CASES = {  # name: (loss, stage options, sharded_head)
    "arcface": (lambda: losses.ArcfaceLoss(scale=16), {}, True),
    "magface_subcenter": (lambda: losses.MagFaceLoss(scale=16), {"lossTopK": 3}, True),  # the norm column, 3 centers
    "arcface_groups_of_4": (lambda: losses.ArcfaceLoss(scale=16), {}, 4),  # mesh (2, 4): two copies of the head
}


def step_case(name, classes, batch):
    make_loss, options, sharded_head = STEP_CASES[name]
    keras.distribution.set_distribution(None)
    reference = built_stage(make_loss(), classes, None, **options)
    start = [np.asarray(variable.value) for variable in reference.model.weights]  # no padding without sharding
    want_logs, want_temp = run_one_step(reference, classes, batch)
    want_kernel, want_slot = head_arrays(reference)
    keras.distribution.set_distribution(sharding.head_distribution(sharded_head))
    try:
        sharded = built_stage(make_loss(), classes, start, **options)
        logs, temp = run_one_step(sharded, classes, batch)
        kernel, slot = head_arrays(sharded)
        head = sharded.model.get_layer("arcface")
        kernel_bytes = per_device_bytes(head.kernel)
        slot_bytes = per_device_bytes(next(v for v in sharded.optimizer.variables if v.shape == head.kernel.shape))
    finally:
        keras.distribution.set_distribution(None)
    return {
        "loss": [logs["loss"], want_logs["loss"]],
        "kernel_diff": relative(kernel, want_kernel),
        "slot_diff": relative(slot, want_slot),
        "kernel_bytes": kernel_bytes,
        "slot_bytes": slot_bytes,
        "temp": [temp, want_temp],
    }


def padded_head(classes=262_100):
    """A head too big for Keras to initialize on one device first (it then initializes it sharded, in a jitted
    function): 262,100 classes padded to 262,144; the real columns' spread, the padding columns."""
    keras.distribution.set_distribution(sharding.head_distribution(True))
    try:
        head = heads.NormDense(classes, name="arcface")
        head.build((None, EMB))
        kernel = np.asarray(head.kernel.value)
    finally:
        keras.distribution.set_distribution(None)
    return {
        "shape": list(kernel.shape),
        "per_device": per_device_bytes(head.kernel),
        "real_std": float(kernel[:, :classes].std()),
        "padding_max": float(np.abs(kernel[:, classes:]).max()),
    }


def step_mode(out_dir, train_dir, bin_path):
    classes, batch = 8192, one_batch(64, 8192, seed=1)
    cases = {name: step_case(name, classes, batch) for name in STEP_CASES}
    return {"devices": jax.device_count(), **cases, "padded_head": padded_head()}


# ---------------------------------------------------------------------------------------------- partial FC
def partial_reference(embeddings, remapped, kernel, slot, rows, top_k, lr, l2):
    """On one device, without the library's head: the ArcFace loss (scale 16) on the cosines of the sampled
    ``rows`` (max over each class's ``top_k``) plus their L2, its gradient by JAX, and SGD with momentum 0.9 applied
    in numpy to those rows only. Returns ``(loss, kernel, momentum)`` after the update."""
    import jax.numpy as jnp

    def loss_of_rows(centers):
        normalized = [x / jnp.linalg.norm(x, axis=1, keepdims=True) for x in (embeddings, centers)]
        cosines = (normalized[0] @ normalized[1].T).reshape(len(embeddings), -1, top_k).max(axis=2)
        return jnp.mean(losses.ArcfaceLoss(scale=16).call(remapped, cosines)) + l2 * jnp.sum(centers**2)

    loss, gradient = jax.value_and_grad(loss_of_rows)(kernel[rows])
    want_slot, want_kernel = slot.copy(), kernel.copy()
    want_slot[rows] = 0.9 * slot[rows] - lr * np.asarray(gradient)
    want_kernel[rows] = kernel[rows] + want_slot[rows]
    return float(loss), want_kernel, want_slot


def partial_mode(out_dir, train_dir, bin_path):
    """One Partial FC step on 8 shards (1024 classes, 2 sub-centers, rate 0.25: 32 classes per shard, the head's L2
    of 0.005) against a one-device computation of the same sampled classes: the loss, the gradient by JAX on one
    device, the momentum update in numpy on the sampled rows only."""
    classes, rate, top_k, lr, l2 = 1024, 0.25, 2, 0.1, 0.005
    images, targets = one_batch(16, classes, seed=2)
    keras.distribution.set_distribution(sharding.head_distribution(True, rate))
    options = dict(partial_fc_rate=rate, output_weight_decay=2 * l2, lossTopK=top_k)
    stage = built_stage(losses.ArcfaceLoss(scale=16), classes, None, **options)
    head = stage.partial_fc_head
    slot = next(var for var in stage.optimizer.variables if var.shape == head.kernel.shape)
    slot.assign(np.random.default_rng(3).normal(size=slot.shape).astype("float32"))  # a dense update would decay it
    kernel0, slot0 = np.asarray(head.kernel.value), np.asarray(slot.value)
    columns, remapped = (np.asarray(x) for x in sharding.sharded_partial_fc(stage).sample(targets["label"], 0))
    model = stage.train_model
    values = [
        [np.asarray(v.value) for v in variables] for variables in (model.trainable_weights, model.non_trainable_weights)
    ]
    logs = runner_jax.JaxStepRunner().train_function(stage, classes)(iter([(images, targets)]), 1)
    kernel1, slot1 = np.asarray(head.kernel.value), np.asarray(slot.value)
    keras.distribution.set_distribution(None)
    outputs = model.stateless_call(*values, [images], training=True)[0]
    rows = (columns[:, None] * top_k + np.arange(top_k)).reshape(-1)
    loss, want_kernel, want_slot = partial_reference(
        np.asarray(outputs["partial_fc_embedding"]), remapped, kernel0, slot0, rows, top_k, lr, l2
    )
    return {
        "columns": columns.tolist(),
        "remapped": remapped.tolist(),
        "labels": targets["label"].tolist(),
        "loss": [logs["loss"], loss],
        "kernel_diff": relative(kernel1, want_kernel),
        "slot_diff": relative(slot1, want_slot),
        "changed_rows": np.flatnonzero(np.abs(kernel1 - kernel0).sum(1)).tolist(),
        "changed_slot_rows": np.flatnonzero(np.abs(slot1 - slot0).sum(1)).tolist(),
    }


# ---------------------------------------------------------------------------------------------- runs
def demo_run(train_dir, bin_path, save_path, sharded_head, centers):
    """A short ArcFace run with center-loss and triplet outputs on the small demo set (no augmentation, seeded
    shuffling); its history. The head starts from ``centers`` when given (else they are recorded there): a padded
    head draws its own initial centers."""
    keras.utils.set_random_seed(0)
    tt = train.Train(
        train_dir, save_path, [bin_path], basic_model=tiny_basic_model(), batch_size=16, lr_base=0.01,
        random_status=-1, seed=0, verbose=0, plot_history=False, resume=False, sharded_head=sharded_head,
    )  # fmt: skip

    def same_start(logs):
        head = tt.model.get_layer("arcface")
        if not centers:
            centers.append(head.class_centers())
        head.kernel.assign(_padded_like(centers[0].T, head))

    tt.custom_callbacks.append(keras.callbacks.LambdaCallback(on_train_begin=same_start))
    stage = {"loss": losses.ArcfaceLoss(scale=16), "optimizer": "adam", "centerloss": 0.01, "triplet": 0.1}
    return tt.train([dict(stage, epoch=3)], 0)


def demo_mode(out_dir, train_dir, bin_path):
    """The demo run sharded over 8 devices (its 12 classes padded to 128), then replicated on one."""
    name, centers, runs = os.path.splitext(os.path.basename(bin_path))[0], [], {}
    for sharded_head in (True, False):
        history = demo_run(train_dir, bin_path, f"{out_dir}/demo_{sharded_head}.keras", sharded_head, centers)
        keras.distribution.set_distribution(None)
        keys = ("loss", "accuracy", "center_embedding_loss", "triplet_embedding_loss", name)
        runs["sharded" if sharded_head else "replicated"] = {key: history[key] for key in keys}
    return runs


def resumable_run(train_dir, save_path, kill_at_epoch=None):
    """Sub-center ArcFace on the demo set, 2 epochs, the head sharded over every device; optionally SIGKILLed in the
    second batch of an epoch (after the checkpoint of the one before)."""
    from resume_job import KillMidEpoch

    keras.utils.set_random_seed(0)
    tt = train.Train(
        train_dir, save_path, basic_model=tiny_basic_model(), batch_size=16, lr_base=0.01, random_status=-1,
        seed=0, verbose=1, plot_history=False, sharded_head=True,
    )  # fmt: skip
    if kill_at_epoch is not None:
        tt.custom_callbacks.append(KillMidEpoch(kill_at_epoch))
    start = {}
    tt.custom_callbacks.append(keras.callbacks.LambdaCallback(on_train_begin=lambda logs: start.update(state(tt))))
    stage = {"loss": losses.ArcfaceLoss(scale=16), "optimizer": keras.optimizers.SGD(0.1, momentum=0.9)}
    history = tt.train([dict(stage, lossTopK=2, epoch=2)], 0)
    return tt, history, start


def state(tt):
    """The head's real kernel, the optimizer's step count and the sum of its slots, and the kernel's layout."""
    head = tt.model.get_layer("arcface")
    slots = [var for var in tt.optimizer.variables if var.shape == head.kernel.shape]
    return {
        "kernel": np.asarray(head.class_centers()).tolist(),
        "iterations": int(tt.optimizer.iterations.value),
        "slots_sum": float(sum(np.abs(np.asarray(slot.value)).sum() for slot in slots)),
        "kernel_bytes": per_device_bytes(head.kernel),
    }


def kill_mode(out_dir, train_dir, bin_path):
    resumable_run(train_dir, f"{out_dir}/run.keras", kill_at_epoch=1)
    return {"error": "not killed"}


def resume_mode(out_dir, train_dir, bin_path):
    """Resume the killed run on this process's devices; the checkpoint it starts from (read with its optimizer),
    what the run started from, its history, and probe embeddings of the result."""
    save_path = f"{out_dir}/run.keras"
    with sharding.head_distribution(True).scope():
        saved = models.load_model(save_path, compile=True)
    head = saved.get_layer("arcface")
    slots = [var for var in saved.optimizer.variables if var.shape == head.kernel.shape]
    checkpoint = {
        "kernel": head.class_centers().tolist(),
        "iterations": int(saved.optimizer.iterations.value),
        "slots_sum": float(sum(np.abs(np.asarray(slot.value)).sum() for slot in slots)),
    }
    tt, history, start = resumable_run(train_dir, save_path)
    images = np.random.default_rng(5).normal(size=(4, 32, 32, 3)).astype("float32")
    np.save(f"{out_dir}/probe_images.npy", images)
    np.save(f"{out_dir}/probe_embeddings.npy", np.asarray(tt.basic_model(images)))
    return {
        "devices": jax.device_count(),
        "checkpoint": checkpoint,
        "start": start,
        "end": state(tt),
        "loss": history["loss"],
    }


MODES = {"step": step_mode, "partial": partial_mode, "demo": demo_mode, "kill": kill_mode, "resume": resume_mode}

if __name__ == "__main__":
    results = {mode: MODES[mode](*sys.argv[2:]) for mode in sys.argv[1].split(",")}
    print("RESULT" + json.dumps(results), flush=True)

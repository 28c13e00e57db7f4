"""MobileFaceNet on WebFace42M (2,059,906 identities, 42.5 M images) with the cosine head sharded over the devices
(JAX) and Partial FC: each device holds 1 / N of the class centers and their momentum, samples 20 % of its own
classes per step (every class of the global batch that falls in its slice, plus random negatives), and the softmax
runs across the devices. Replicated, the head and its momentum alone would take 8.4 GB on every device; sharded over
8, 1.1 GB (the README's "A sharded head: 10 M+ identities on JAX" has the table up to 100 M identities).

Settings after insightface's arcface_torch WebFace42M MobileFaceNet configuration: CosFace margin 0.4 (combined margin
(1, 0, 0.4)), embedding 512, Partial FC 0.2, SGD with momentum 0.9 and weight decay 1e-4 (coupled, as PyTorch's SGD:
an L2 of ``wd / 2``), 20 epochs after a 2-epoch warm-up, mixed precision; the learning rate scaled linearly to the
global batch (0.4 at 8,192 there, 0.05 at 1,024 here). JAX only: ``KERAS_BACKEND=jax keras-insightface train --config
webface42m_mbf_sharded_partial_fc`` on a machine with 8 GPUs (batch 128 per GPU: ``batch_size``
is the global batch on JAX). Data: WebFace42M's class folders converted to shards (``keras-insightface prepare
--to-shards``), or a ``.rec``. On the TensorFlow backend the recipe stops with a one-line error.
"""

import keras

import keras_insightface as kif

DATA = "/datasets/WebFace42M_shards"  # shards.json + shards (or a folder holding train.rec + train.idx)
BINS = "/datasets/faces_emore"  # lfw.bin, cfp_fp.bin, agedb_30.bin
EPOCHS = 20


def basic_model(input_shape=(112, 112, 3)):
    model = kif.buildin_models("mobilefacenet", dropout=0, emb_shape=512, output_layer="GDC", input_shape=input_shape)
    return kif.add_l2_regularizer_2_model(model, 1e-4)


train_kwargs = dict(
    data_path=DATA,
    save_path="mbf_webface42m_sharded_partial_fc.keras",
    eval_paths=[f"{BINS}/lfw.bin", f"{BINS}/cfp_fp.bin", f"{BINS}/agedb_30.bin"],
    batch_size=1024,  # the global batch on JAX: 128 per device on 8 devices
    lr_base=0.05,
    lr_decay=1e-4,
    lr_decay_steps=EPOCHS,  # one cosine down to lr_min over the run
    lr_min=5e-6,
    lr_warmup_steps=2,
    random_status=0,
    partial_fc_rate=0.2,
    sharded_head=True,
    output_weight_decay=1,
    mixed_precision="mixed_float16",
    checkpoint_minutes=60,  # a preempted or killed run loses at most an hour of a 6-hour epoch
)
schedule = [
    {"loss": kif.CosFaceLoss(margin=0.4), "optimizer": keras.optimizers.SGD(0.05, momentum=0.9), "epoch": EPOCHS},
]

"""IResNet-100 on Glint360K (360,232 identities) with the cosine head sharded over the devices (JAX) and Partial FC:
each device holds 1 / N of the class centers and their momentum, samples 10 % of its own classes per step (every
class of the global batch that falls in its slice plus random negatives), and the softmax runs across the devices.
The same recipe scales to WebFace42M (2 M identities) and beyond: set ``DATA`` and nothing else changes (see the
README's "A sharded head: 10 M+ identities on JAX" for the memory per device).

The settings are those of ``glint360k_r100_partial_fc.py`` (insightface's arcface_torch ``glint360k_r100``: CosFace
margin 0.4, SGD 0.1 with momentum 0.9 and weight decay 1e-4, 20 epochs, mixed precision) plus ``sharded_head=True``.
JAX only: ``KERAS_BACKEND=jax keras-insightface train --config glint360k_r100_sharded_partial_fc.py`` on a machine
with 8 GPUs (batch 128 per GPU: the global batch is ``batch_size`` = 1024, split over every device). On the
TensorFlow backend the recipe stops with a one-line error.
"""

import keras

import keras_insightface as kif

DATA = "/datasets/glint360k"  # train.rec + train.idx
BINS = "/datasets/glint360k"
EPOCHS = 20


def basic_model(input_shape=(112, 112, 3)):
    model = kif.buildin_models("r100", dropout=0, emb_shape=512, output_layer="E", input_shape=input_shape)
    return kif.add_l2_regularizer_2_model(model, 1e-4)


train_kwargs = dict(
    data_path=DATA,
    save_path="r100_glint360k_sharded_partial_fc.keras",
    eval_paths=[f"{BINS}/lfw.bin", f"{BINS}/cfp_fp.bin", f"{BINS}/agedb_30.bin"],
    batch_size=1024,  # the global batch on JAX: 128 per device on 8 devices
    lr_base=0.1,
    lr_decay=1e-4,
    lr_decay_steps=EPOCHS,  # one cosine down to lr_min over the run
    lr_min=1e-5,
    random_status=0,
    partial_fc_rate=0.1,
    sharded_head=True,
    output_weight_decay=1,
    mixed_precision="mixed_float16",
)
schedule = [
    {"loss": kif.CosFaceLoss(margin=0.4), "optimizer": keras.optimizers.SGD(0.1, momentum=0.9), "epoch": EPOCHS},
]

"""IResNet-100 on Glint360K (360,232 identities, 17.1 M images) with Partial FC: each step computes the cosine head
over 10 % of the classes (every class of the global batch plus random negatives), An et al. 2021.

Settings after insightface's arcface_torch ``glint360k_r100``: CosFace margin 0.4 (combined margin (1, 0, 0.4)),
SGD 0.1 with momentum 0.9 and weight decay 1e-4 (coupled, as PyTorch's SGD: an L2 of ``wd / 2``), 20 epochs,
mixed precision. With Partial FC, SGD becomes ``kif.LazySGD``: only the sampled centers and their momentum
change in a step. Batch 128 per GPU: ``keras-insightface train --config glint360k_r100_partial_fc.py --distribute
mirrored`` on 8 GPUs. Data: the insightface RecordIO folder, read as it is (or its shards, ``prepare_data.py
--to-shards``).
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
    save_path="r100_glint360k_partial_fc.keras",
    eval_paths=[f"{BINS}/lfw.bin", f"{BINS}/cfp_fp.bin", f"{BINS}/agedb_30.bin"],
    batch_size=128,
    lr_base=0.1,
    lr_decay=1e-4,
    lr_decay_steps=EPOCHS,  # one cosine down to lr_min over the run
    lr_min=1e-5,
    random_status=0,
    partial_fc_rate=0.1,
    output_weight_decay=1,
    mixed_precision="mixed_float16",
)
schedule = [
    {"loss": kif.CosFaceLoss(margin=0.4), "optimizer": keras.optimizers.SGD(0.1, momentum=0.9), "epoch": EPOCHS},
]

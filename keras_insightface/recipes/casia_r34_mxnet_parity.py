"""IResNet-34 on CASIA-WebFace with the settings that reproduce insightface's MXNet training.

MXNet's SGD with momentum and weight decay ``wd`` equals plain SGD + momentum on a loss with an L2 term of ``wd / 2``
on every weight (``kif.add_l2_regularizer_2_model``), the heads included (``output_weight_decay=1``). Step decay
by 10 at epochs 20 and 30, one warm-up epoch at ArcFace scale 32 first. Reference: MXNet r34 0.9933 / 0.9514 /
0.9448 (LFW / CFP-FP / AgeDB-30); Keras_insightface reached 0.9940 / 0.9466 / 0.9415 with these settings.
"""

import keras

import keras_insightface as kif

DATA = "/datasets/faces_casia_112x112_folders"
BINS = "/datasets/faces_casia"


def basic_model(input_shape=(112, 112, 3)):
    model = kif.buildin_models(
        "r34", dropout=0.4, emb_shape=512, output_layer="E", bn_momentum=0.9, bn_epsilon=2e-5, input_shape=input_shape
    )
    return kif.add_l2_regularizer_2_model(model, 5e-4, apply_to_batch_normal=True)  # MXNet wd 5e-4


train_kwargs = dict(
    data_path=DATA,
    save_path="resnet34_mxnet_parity_casia.keras",
    eval_paths=[f"{BINS}/lfw.bin", f"{BINS}/cfp_fp.bin", f"{BINS}/agedb_30.bin"],
    batch_size=512,
    lr_base=0.1,
    lr_decay=0.1,
    lr_decay_steps=[20, 30],
    random_status=0,
    output_weight_decay=1,  # the same L2 on the ArcFace head
)
schedule = [
    {"loss": kif.ArcfaceLoss(scale=32), "optimizer": keras.optimizers.SGD(0.1, momentum=0.9), "epoch": 1},
    {"loss": kif.ArcfaceLoss(scale=64), "epoch": 40},
]

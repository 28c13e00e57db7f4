"""MobileNet, embedding 256 (GDC), on MS1M (insightface's faces_emore): softmax + center loss, then ArcFace + triplet.

Keras_insightface's headline recipe; its model reached LFW 0.9960, CFP-FP 0.9517, AgeDB-30 0.9593, IJB-B 0.8871,
IJB-C 0.9117 (TAR at FAR 1e-4). Data: the insightface RecordIO folder (``train.rec``, ``train.idx``, the ``.bin``
files), read as it is; a class folder (``prepare_data.py -D``) works the same.
"""

import keras

import keras_insightface as kif

DATA = "/datasets/faces_emore"  # train.rec + train.idx
BINS = "/datasets/faces_emore"


def basic_model(input_shape=(112, 112, 3)):
    return kif.buildin_models("MobileNet", dropout=0, emb_shape=256, output_layer="GDC", input_shape=input_shape)


train_kwargs = dict(
    data_path=DATA,
    save_path="keras_mobilenet_emore.keras",
    eval_paths=[f"{BINS}/lfw.bin", f"{BINS}/cfp_fp.bin", f"{BINS}/agedb_30.bin"],
    batch_size=512,
    lr_base=0.001,
    lr_decay=0.05,  # exponential decay per epoch
    random_status=2,
)
schedule = [
    {
        "loss": keras.losses.CategoricalCrossentropy(label_smoothing=0.1),
        "centerloss": 0.01,
        "optimizer": keras.optimizers.AdamW(0.001, weight_decay=5e-5),
        "epoch": 20,
    },
    {"loss": kif.ArcfaceLoss(), "triplet": 64, "alpha": 0.3, "epoch": 20},
]

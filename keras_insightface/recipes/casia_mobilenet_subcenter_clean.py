"""Sub-center ArcFace, then cleaning, then training on the cleaned data (Deng et al. 2020), MobileNet on CASIA.

1. Train with 3 sub-centers per class (``lossTopK=3``): noisy images gather around non-dominant sub-centers.
2. ``data_drop_top_k`` keeps each class's dominant sub-center and drops the images more than 75 degrees from it.
3. Train on the cleaned image list with one center per class (the head is rebuilt for the new class count).
Keras_insightface's run: LFW / CFP-FP / AgeDB-30 0.9822 / 0.8694 / 0.8695 without sub-centers, 0.9838 / 0.8960 /
0.8768 after 3 -> 1.
"""

import keras

import keras_insightface as kif
from keras_insightface.tools.drop_top_k import data_drop_top_k

DATA = "/datasets/faces_casia_112x112_folders"
BINS = "/datasets/faces_casia"


def basic_model(input_shape=(112, 112, 3)):
    return kif.buildin_models("mobilenet", dropout=0, emb_shape=256, output_layer="E", input_shape=input_shape)


train_kwargs = dict(
    data_path=DATA,
    save_path="mobilenet_subcenter_casia.keras",
    eval_paths=[f"{BINS}/lfw.bin", f"{BINS}/cfp_fp.bin", f"{BINS}/agedb_30.bin"],
    batch_size=256,
    lr_base=0.1,
    lr_decay=0.1,
    lr_decay_steps=[20, 30],
    random_status=0,
    output_weight_decay=1,
)


def stages(top_k):
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9, weight_decay=5e-3)  # tfa SGDW(wd 5e-4) at lr 0.1
    return [
        {"loss": kif.ArcfaceLoss(scale=16), "optimizer": optimizer, "lossTopK": top_k, "epoch": 5},
        {"loss": kif.ArcfaceLoss(scale=32), "lossTopK": top_k, "epoch": 5},
        {"loss": kif.ArcfaceLoss(scale=64), "lossTopK": top_k, "epoch": 40},
    ]


schedule = stages(top_k=3)


def after_training(trainer, recipe):
    """Clean the data with the sub-center model, then train on with one center per class."""
    cleaned = data_drop_top_k(trainer.model, trainer.data_path, deg_thresh=75)
    trainer.reset_dataset(cleaned)
    trainer.train(recipe.rescheduled(stages(top_k=1)), initial_epoch=len(trainer.history.history["loss"]))

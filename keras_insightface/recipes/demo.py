"""The README's main job: synthetic demo faces, MobileFaceNet (GDC, emb 128) with ArcFace for 10 epochs.

Sized to finish in a few minutes on a 2-core CPU: 150 identities x 20 images of 48x48 pixels for training, and a
verification ``.bin`` of 50 identities that are not in the training set. ``python train.py --demo`` runs it.
"""

import keras

import keras_insightface as kif
from keras_insightface.data.demo import DEMO_JOB

SEED = 0
EPOCHS = 10
keras.utils.set_random_seed(SEED)
paths = kif.make_demo_dataset("datasets/demo", seed=SEED, **DEMO_JOB)
image_size = DEMO_JOB["image_size"]


def basic_model(input_shape=(image_size, image_size, 3)):
    # bn_momentum 0.9: a short run must forget the initial moving variance of 1 (0.99 ** 300 is still 5 %)
    return kif.buildin_models(
        "mobilefacenet", dropout=0, emb_shape=128, input_shape=input_shape, output_layer="GDC", bn_momentum=0.9
    )


train_kwargs = dict(
    data_path=paths["train_dir"],
    save_path="demo_mobilefacenet.keras",
    eval_paths=[paths["bin_path"]],
    batch_size=64,
    lr_base=0.003,
    lr_decay=0.5,
    lr_decay_steps=EPOCHS,  # cosine over the run
    lr_min=1e-5,
    random_status=0,
    resume=False,
    seed=SEED,
)
schedule = [
    {
        "loss": kif.ArcfaceLoss(scale=16),
        "optimizer": keras.optimizers.AdamW(0.003, weight_decay=5e-4),
        "epoch": EPOCHS,
    }
]

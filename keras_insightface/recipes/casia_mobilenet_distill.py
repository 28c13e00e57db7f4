"""Knowledge distillation: MobileNet (embedding 512) on CASIA-WebFace learns ArcFace and a teacher's embeddings.

First embed every training image with the teacher (any Keras or ONNX basic model):
``python data_distiller.py -M teacher.keras -D /datasets/faces_casia_112x112_folders --use_fp16``, which writes
``faces_casia_112x112_folders_shuffle_label_embs_normed_512_fp16.tfrecord``. Training on data with embeddings adds
a ``distill_embedding`` output with the cosine distillation loss (weight ``distill``, here 128); a Dense map layer
is added when the student's embedding size differs from the teacher's.
"""

import keras

import keras_insightface as kif

DATA = "faces_casia_112x112_folders_shuffle_label_embs_normed_512_fp16.tfrecord"
BINS = "/datasets/faces_casia"


def basic_model(input_shape=(112, 112, 3)):
    return kif.buildin_models("mobilenet", dropout=0.4, emb_shape=512, output_layer="E", input_shape=input_shape)


train_kwargs = dict(
    data_path=DATA,
    save_path="mobilenet_distill_casia.keras",
    eval_paths=[f"{BINS}/lfw.bin", f"{BINS}/cfp_fp.bin", f"{BINS}/agedb_30.bin"],
    batch_size=400,
    lr_base=0.1,
    lr_decay=0.1,
    lr_decay_steps=[20, 30],
    random_status=0,
)
optimizer = keras.optimizers.SGD(0.1, momentum=0.9, weight_decay=5e-3)  # tfa SGDW(wd 5e-4) = Keras wd 5e-4 / lr 0.1
schedule = [
    {"loss": kif.ArcfaceLoss(scale=16), "optimizer": optimizer, "distill": 128, "epoch": 5},
    {"loss": kif.ArcfaceLoss(scale=32), "distill": 128, "epoch": 5},
    {"loss": kif.ArcfaceLoss(scale=64), "distill": 128, "epoch": 40},
]

"""ViT-T on WebFace42M (2,059,906 identities, 42.5 M images) with Partial FC 0.3: insightface's arcface_torch config
``wf42m_pfc03_40epoch_8gpu_vit_t``, whose published model reached IJB-C TAR@FAR=1e-4 97.31 at 1.5 GFLOPs.

Its settings: network ``vit_t_dp005_mask0`` (drop path 0.05, no patch masking), embedding 512, CosFace margin 0.4
(combined margin (1, 0, 0.4)) at scale 64, Partial FC sampling 30 % of the classes per step, AdamW with learning rate
0.001 and weight decay 0.1 (decoupled: ``w -= lr * wd * w``, as PyTorch's AdamW), batch 512 per GPU on 8 GPUs (an
update of 4,096 images), 40 epochs: a linear warmup over the first 4 (``num_epoch // 10``), then the learning rate
falls as ``(1 - t / T) ** 2`` to 0 at the end, moved at every batch; gradient norm clipped at 5; mixed precision
(arcface_torch's fp16). arcface_torch clips the backbone's gradient alone, ``gradient_clip_norm`` the whole update's.

``keras-insightface train --config wf42m_pfc03_40epoch_8gpu_vit_t --distribute mirrored`` on 8 GPUs. On fewer, keep
the update of 4,096 images with ``gradient_accumulation_steps`` (2 GPUs: 4). Data: WebFace42M's class folders
converted once to shards (``prepare_data.py --to-shards``), or the folders themselves.
"""

import keras

import keras_insightface as kif

DATA = "/datasets/WebFace42M_shards"
EPOCHS = 40
WARMUP_EPOCHS = EPOCHS // 10


def basic_model(input_shape=(112, 112, 3)):
    return kif.buildin_models("vit_t_dp005_mask0", emb_shape=512, input_shape=input_shape)


train_kwargs = dict(
    data_path=DATA,
    save_path="vit_t_wf42m_pfc03.keras",
    eval_paths=[],  # the config evaluates nothing while training (val_targets = [])
    batch_size=512,
    lr_base=0.001,
    lr_warmup_steps=WARMUP_EPOCHS,
    lr_decay_steps=EPOCHS - WARMUP_EPOCHS,  # after the warmup: down to lr_min at the last epoch's end
    lr_decay_power=2,
    lr_min=0.0,
    partial_fc_rate=0.3,
    gradient_clip_norm=5.0,
    gradient_accumulation_steps=1,
    random_status=0,  # random horizontal flip, arcface_torch's only augmentation
    mixed_precision="mixed_float16",
)
schedule = [
    {
        "loss": kif.CosFaceLoss(margin=0.4, scale=64),
        "optimizer": keras.optimizers.AdamW(0.001, weight_decay=0.1, epsilon=1e-8),  # PyTorch's epsilon
        "epoch": EPOCHS,
    },
]

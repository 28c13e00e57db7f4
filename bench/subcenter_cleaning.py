#!/usr/bin/env python3
"""Sub-center cleaning on noisy demo data: move a fraction of the images to wrong classes, train a short
``lossTopK=3`` ArcFace run, run ``data_drop_top_k`` and report how many mislabeled images were dropped and how
many correct ones were kept (acceptance: >= 50 % dropped, >= 95 % kept). Prints one JSON line.
"""

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def make_noisy_folder(train_dir, dest_dir, noise, seed):
    """Link every image of ``train_dir`` into ``dest_dir``, a ``noise`` fraction of them under a wrong class.

    Returns the set of mislabeled destination paths.
    """
    from keras_insightface.data import pipeline as data

    names, classes, class_names = data.scan_class_folder(train_dir)
    rng = np.random.default_rng(seed)
    wrong = set(rng.choice(len(names), int(round(noise * len(names))), replace=False).tolist())
    shutil.rmtree(dest_dir, ignore_errors=True)
    mislabeled = set()
    for index, (name, label) in enumerate(zip(names, classes)):
        target = label
        if index in wrong:
            target = (label + rng.integers(1, len(class_names))) % len(class_names)
        dest = os.path.join(dest_dir, class_names[target], f"{class_names[label]}_{os.path.basename(name)}")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.link(name, dest)
        if index in wrong:
            mislabeled.add(dest)
    return mislabeled


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work_dir", default="datasets/bench_subcenter")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--deg_thresh", type=int, default=75)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bn_momentum", type=float, default=0.9, help="0.9 as MXNet insightface; Keras' 0.99 lags in short runs"
    )
    args = parser.parse_args(argv)

    import keras

    from keras_insightface.data import demo as demo_data
    from keras_insightface.models import zoo as models
    from keras_insightface.nn import losses
    from keras_insightface.tools import drop_top_k as data_drop_top_k
    from keras_insightface.training import train

    keras.utils.set_random_seed(args.seed)
    start = time.time()
    paths = demo_data.make_demo_dataset(
        os.path.join(args.work_dir, "demo"),
        num_classes=args.classes,
        images_per_class=args.images,
        image_size=args.image_size,
        seed=args.seed,
    )
    noisy_dir = os.path.join(args.work_dir, "noisy")
    mislabeled = make_noisy_folder(paths["train_dir"], noisy_dir, args.noise, args.seed)
    basic_model = models.buildin_models(
        "mobilefacenet",
        dropout=0,
        emb_shape=128,
        input_shape=(args.image_size, args.image_size, 3),
        output_layer="GDC",
        bn_momentum=args.bn_momentum,
    )
    tt = train.Train(
        noisy_dir,
        os.path.join(args.work_dir, "topk3.keras"),
        basic_model=basic_model,
        batch_size=args.batch_size,
        lr_base=0.002,
        lr_decay=0.5,
        lr_decay_steps=args.epochs,
        lr_min=1e-5,
        random_status=0,
        resume=False,
        seed=args.seed,
        verbose=0,
    )
    optimizer = keras.optimizers.AdamW(0.002, weight_decay=5e-4)
    tt.train([{"loss": losses.ArcfaceLoss(scale=16), "optimizer": optimizer, "epoch": args.epochs, "lossTopK": 3}], 0)
    train_time = time.time() - start
    dest = data_drop_top_k.data_drop_top_k(
        tt.model, noisy_dir, os.path.join(args.work_dir, "clean.npz"), deg_thresh=args.deg_thresh
    )
    with np.load(dest, allow_pickle=False) as content:
        kept = set(content["image_names"].tolist())
    all_names = set(_all_images(noisy_dir))
    correct = all_names - mislabeled
    result = {
        "bench": "subcenter_cleaning",
        "images": len(all_names),
        "mislabeled": len(mislabeled),
        "mislabeled_dropped": round(len(mislabeled - kept) / max(len(mislabeled), 1), 4),
        "correct_kept": round(len(correct & kept) / max(len(correct), 1), 4),
        "epochs": args.epochs,
        "deg_thresh": args.deg_thresh,
        "classes": args.classes,
        "image_size": args.image_size,
        "bn_momentum": args.bn_momentum,
        "seconds": round(time.time() - start, 1),
        "train_seconds": round(train_time, 1),
    }
    print(json.dumps(result))
    return result


def _all_images(folder):
    from keras_insightface.data import pipeline as data

    return [str(name) for name in data.scan_class_folder(folder)[0]]


if __name__ == "__main__":
    main()

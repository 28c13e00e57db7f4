#!/usr/bin/env python3
"""Speed of the "your own photos" tools, printed as one JSON line, and the README's figure of aligned crops.

- ``align``: ``prepare_data.align_folder`` on N raw JPEG photos of ``--size`` x ``--size`` pixels (default 250;
  3000 for 9-megapixel phone photos): the two real faces that ship with scikit-image, under random similarity
  transforms, 20 photos per folder; images/s after the detector is built and warmed up, with the load average before
  and after.
- ``folder``: ``evals.evaluate_folder`` on N aligned 112x112 faces (the demo renderer's, 20 per identity) with
  a MobileFaceNet (GDC, emb 256): total seconds, and the seconds of the metrics alone.
- ``figure PATH``: photos with their detected landmarks above the aligned crops.

Usage: ``python bench/photo_pipeline.py align [--images 1000] [--workers 2] [--size 250]``,
``python bench/photo_pipeline.py folder [--images 1000]``, ``python bench/photo_pipeline.py figure out.png``.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_insightface.faces import detector as face_detector  # noqa: E402


def real_faces():
    """The astronaut and the cameraman (grayscale, made RGB) from scikit-image's sample photos."""
    import skimage.data

    return [skimage.data.astronaut(), np.repeat(skimage.data.camera()[..., None], 3, axis=-1)]


def random_photo(face, rng, size=250):
    """``face`` scaled, rotated and shifted into a ``size`` x ``size`` photo on a random background (the face takes the
    same share of the photo at any size)."""
    from skimage.transform import SimilarityTransform, warp

    scale, angle = rng.uniform(0.45, 0.8) * size / 250, rng.uniform(-0.3, 0.3)
    center = SimilarityTransform(scale=scale, rotation=angle)(np.array([[256.0, 200.0]]))[0]
    shift = np.array([size / 2, size / 2]) - center + rng.uniform(-20, 20, 2)
    transform = SimilarityTransform(scale=scale, rotation=angle, translation=shift)
    photo = warp(face, transform.inverse, output_shape=(size, size), preserve_range=True, cval=rng.uniform(0, 255))
    return photo.astype(np.uint8)


def make_raw_folder(root, num_images, per_folder=20, seed=0, size=250):
    from PIL import Image

    rng = np.random.default_rng(seed)
    faces = real_faces()
    for index in range(num_images):
        folder = os.path.join(root, str(index // per_folder))
        os.makedirs(folder, exist_ok=True)
        photo = random_photo(faces[index // per_folder % 2], rng, size)
        Image.fromarray(photo).save(os.path.join(folder, f"{index}.jpg"), quality=92)


def bench_align(num_images, workers, size=250):
    from keras_insightface.tools import prepare_data

    with tempfile.TemporaryDirectory() as tmp:
        raw, out = os.path.join(tmp, "raw"), os.path.join(tmp, "aligned")
        make_raw_folder(raw, num_images, size=size)
        detector = face_detector.FaceDetector()
        detector.detect_batch([np.zeros((size, size, 3), np.uint8)] * 2)  # build the graphs before timing
        load_before = os.getloadavg()
        start = time.perf_counter()
        summary = prepare_data.align_folder(raw, out, workers=workers, detector=detector)
        seconds = time.perf_counter() - start
    counts = {key: summary[key] for key in ("ok", "several_faces", "no_face", "unreadable")}
    return {
        "align_images": num_images,
        "align_seconds": round(seconds, 2),
        "align_images_per_s": round(num_images / seconds, 1),
        "photo_size": size,
        "workers": workers or os.cpu_count(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        **counts,
    }


def bench_folder(num_images):
    from keras_insightface.data import demo as demo_data
    from keras_insightface.evaluation import evals
    from keras_insightface.models import zoo as models

    with tempfile.TemporaryDirectory() as tmp:
        demo = demo_data.make_demo_dataset(
            tmp, num_classes=num_images // 20, images_per_class=20, num_eval_classes=2, eval_images_per_class=2
        )
        model = models.buildin_models("mobilefacenet", emb_shape=256, output_layer="GDC")
        load_before = os.getloadavg()
        start = time.perf_counter()
        evals.evaluate_folder(model, demo["train_dir"], result_dir=os.path.join(tmp, "results"), name="bench")
        seconds = time.perf_counter() - start
        saved = np.load(os.path.join(tmp, "results", "bench_train_embeddings.npz"))
        start = time.perf_counter()
        evals.folder_metrics(saved["embeddings"], saved["labels"])
        metrics_seconds = time.perf_counter() - start
    return {
        "folder_images": num_images,
        "folder_seconds": round(seconds, 2),
        "folder_metrics_seconds": round(metrics_seconds, 2),
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }


def draw_figure(path):
    """Four photos (as found, turned and shrunk, grayscale, another person) with their
    detected box and landmarks, above their aligned 112x112 crops."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(1)
    astronaut, cameraman = real_faces()
    photos = {
        "astronaut.png": astronaut,
        "turned and smaller": random_photo(astronaut, rng, 320),
        "grayscale": np.repeat(astronaut[..., :1], 3, axis=-1),
        "cameraman.png": cameraman,
    }
    detector = face_detector.FaceDetector()
    fig, axes = plt.subplots(2, len(photos), figsize=(2.2 * len(photos), 4.6))
    for column, (name, photo) in enumerate(photos.items()):
        face = detector.detect(photo)[0]
        axes[0, column].imshow(photo)
        x1, y1, x2, y2 = face.box
        axes[0, column].add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="lime", lw=1))
        axes[0, column].scatter(face.landmarks[:, 0], face.landmarks[:, 1], s=6, c="red")
        axes[0, column].set_title(name, fontsize=8)
        axes[1, column].imshow(face_detector.align_faces(photo, [face])[0])
        axes[1, column].set_title("aligned 112x112", fontsize=8)
    for axis in axes.flat:
        axis.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("align", "folder", "figure"))
    parser.add_argument("path", nargs="?", default="photos.png", help="figure: output PNG")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=0, help="align: decode / save threads (0: one per core)")
    parser.add_argument("--size", type=int, default=250, help="align: photo width and height in pixels")
    args = parser.parse_args(argv)
    if args.what == "align":
        print(json.dumps(bench_align(args.images, args.workers or None, args.size)))
    elif args.what == "folder":
        print(json.dumps(bench_folder(args.images)))
    else:
        print(draw_figure(args.path))


if __name__ == "__main__":
    main()

"""Synthetic face-like demo dataset: a class-folder training set plus a verification ``.bin`` of unseen identities.

Each identity is a set of drawing parameters (face shape, skin, hair, eyes, brows, nose, mouth and a personal
texture of low-frequency marks). Each image of it is rendered with a random pose (shift, scale, rotation),
expression, illumination, background, noise and partial occlusion, so raw pixels do not identify a person but
a small CNN learns to. Everything is vectorized numpy and deterministic for a seed.
"""

import os

import numpy as np

from keras_insightface.data.pipeline import encode_jpeg, write_bin
from keras_insightface.utils import atomic_write

# The README main job's dataset (train.run_demo): small enough to train in minutes on a 2-core CPU.
DEMO_JOB = {"num_classes": 150, "images_per_class": 20, "image_size": 48}


def _random_identity(rng):
    """Draw the appearance parameters of one identity."""
    return {
        "face_axes": rng.uniform([0.52, 0.66], [0.68, 0.84]),
        "skin": rng.uniform([90, 60, 40], [240, 200, 170]),
        "hair": rng.uniform(0, 255, 3) * rng.uniform(0.2, 1.0),
        "hairline": rng.uniform(-0.75, -0.35),
        "hair_sides": rng.uniform(0.0, 0.2),
        "eye_dx": rng.uniform(0.18, 0.32),
        "eye_y": rng.uniform(-0.22, -0.05),
        "eye_size": rng.uniform([0.06, 0.035], [0.12, 0.07]),
        "iris": rng.uniform(0, 200, 3),
        "brow_dy": rng.uniform(0.07, 0.16),
        "brow_thick": rng.uniform(0.015, 0.045),
        "brow_tilt": rng.uniform(-0.25, 0.25),
        "nose_len": rng.uniform(0.12, 0.28),
        "nose_width": rng.uniform(0.04, 0.1),
        "mouth_y": rng.uniform(0.28, 0.45),
        "mouth_width": rng.uniform(0.12, 0.28),
        "lip": rng.uniform([120, 20, 30], [230, 120, 130]),
        "marks": rng.normal(0, 1, (4, 5)),  # (freq_u, freq_v, phase, amplitude, channel mix) of personal texture
    }


def _ellipse(u, v, cx, cy, ax, ay, softness=0.04):
    """Soft mask of an axis-aligned ellipse in canonical coordinates."""
    dist = np.sqrt(((u - cx) / ax) ** 2 + ((v - cy) / ay) ** 2)
    return np.clip((1 - dist) / softness + 0.5, 0, 1)


def _paint(canvas, mask, color):
    canvas += mask[..., None] * (np.asarray(color, dtype=np.float32) - canvas)


def render_face(identity, rng, image_size=112):
    """Render one uint8 RGB image of ``identity`` with random pose, expression, lighting, noise and occlusion."""
    size = image_size
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    xx, yy = np.meshgrid(grid, grid)
    angle = rng.uniform(-0.3, 0.3)
    scale = rng.uniform(0.82, 1.12)
    shift = rng.uniform(-0.12, 0.12, 2)
    cos, sin = np.cos(angle), np.sin(angle)
    u = (cos * (xx - shift[0]) + sin * (yy - shift[1])) / scale
    v = (-sin * (xx - shift[0]) + cos * (yy - shift[1])) / scale
    yaw = rng.uniform(-0.08, 0.08)  # shifts the inner features sideways like a small head turn

    background = (
        rng.uniform(0, 255, 3) + rng.uniform(-60, 60, 3) * xx[..., None] + rng.uniform(-60, 60, 3) * yy[..., None]
    )
    canvas = background.astype(np.float32)
    ax, ay = identity["face_axes"]
    hair_mask = _ellipse(u, v, 0, -0.05, ax + identity["hair_sides"], ay + 0.12) * (v < identity["hairline"] + 0.35)
    _paint(canvas, hair_mask, identity["hair"])
    face_mask = _ellipse(u, v, 0, 0.05, ax, ay)
    marks = sum(m[3] * np.sin(3 * m[0] * u + 3 * m[1] * v + m[2]) for m in identity["marks"])
    skin = identity["skin"] + 18 * marks[..., None] * np.tanh(identity["marks"][:3, 4])
    canvas += face_mask[..., None] * (skin - canvas)
    _paint(canvas, _ellipse(u, v, 0, -0.05, ax + 0.02, ay) * (v < identity["hairline"]), identity["hair"])

    eye_open = rng.uniform(0.6, 1.2)
    for side in (-1, 1):
        ex, ey = side * identity["eye_dx"] + yaw, identity["eye_y"]
        ew, eh = identity["eye_size"]
        _paint(canvas, _ellipse(u, v, ex, ey, ew, eh * eye_open, 0.2), (245, 245, 245))
        _paint(canvas, _ellipse(u, v, ex, ey, eh * 0.9, eh * 0.9 * eye_open, 0.2), identity["iris"])
        brow_v = ey - identity["brow_dy"] + side * identity["brow_tilt"] * (u - ex)
        brow = (np.abs(v - brow_v) < identity["brow_thick"]) * (np.abs(u - ex) < ew * 1.2)
        _paint(canvas, brow.astype(np.float32), identity["hair"] * 0.6)
    nose_top, nose_len = identity["eye_y"] + 0.05, identity["nose_len"]
    nose = (
        (v > nose_top)
        * (v < nose_top + nose_len)
        * (np.abs(u - yaw * 1.5) < identity["nose_width"] * (v - nose_top) / nose_len)
    )
    _paint(canvas, nose.astype(np.float32) * 0.5, identity["skin"] * 0.6)
    smile = rng.uniform(-0.6, 1.2)
    mouth_v = identity["mouth_y"] - smile * 0.15 * (1 - ((u - yaw) / identity["mouth_width"]) ** 2)
    mouth_open = rng.uniform(0.01, 0.05)
    mouth = (np.abs(v - mouth_v) < 0.02 + mouth_open) * (np.abs(u - yaw) < identity["mouth_width"])
    _paint(canvas, mouth.astype(np.float32), identity["lip"])

    light = rng.uniform(0.55, 1.35) + rng.uniform(-0.5, 0.5) * xx + rng.uniform(-0.3, 0.3) * yy
    canvas = canvas * light[..., None] * rng.uniform(0.85, 1.15, 3) + rng.uniform(-30, 30)
    canvas += rng.normal(0, rng.uniform(3, 14), canvas.shape)
    if rng.uniform() < 0.5:  # partial occlusion: a random rectangle (hand, scarf, sunglasses...)
        h, w = (rng.uniform(0.2, 0.45, 2) * size).astype(int)
        top, left = rng.integers(0, size - h), rng.integers(0, size - w)
        canvas[top : top + h, left : left + w] = rng.uniform(0, 255, 3)
    return np.clip(canvas, 0, 255).astype(np.uint8)


def _make_pairs(num_identities, images_per_identity, num_pairs, rng):
    """Balanced (index_a, index_b, issame) pairs over images laid out identity-major."""
    half = num_pairs // 2
    pairs = []
    for _ in range(half):
        ident = rng.integers(num_identities)
        aa, bb = rng.choice(images_per_identity, 2, replace=False)
        pairs.append((ident * images_per_identity + aa, ident * images_per_identity + bb, True))
    for _ in range(num_pairs - half):
        ia, ib = rng.choice(num_identities, 2, replace=False)
        aa, bb = rng.integers(images_per_identity, size=2)
        pairs.append((ia * images_per_identity + aa, ib * images_per_identity + bb, False))
    order = rng.permutation(len(pairs))
    return [pairs[ii] for ii in order]


def make_demo_dataset(
    dest_dir,
    num_classes=100,
    images_per_class=30,
    num_eval_classes=50,
    eval_images_per_class=6,
    num_pairs=600,
    image_size=112,
    seed=0,
):
    """Write ``dest_dir/train/<class>/<i>.jpg`` and ``dest_dir/demo_eval.bin`` (unseen identities); return paths.

    Re-running with the same arguments reuses what is already on disk (files are written atomically).
    """
    if num_classes < 1 or images_per_class < 1 or num_eval_classes < 2 or eval_images_per_class < 2:
        raise ValueError("need >= 1 train class and image, >= 2 eval classes with >= 2 images each")
    rng = np.random.default_rng(seed)
    train_dir = os.path.join(dest_dir, "train")
    bin_path = os.path.join(dest_dir, "demo_eval.bin")
    identities = [_random_identity(rng) for _ in range(num_classes + num_eval_classes)]
    for class_id, identity in enumerate(identities[:num_classes]):
        class_rng = np.random.default_rng([seed, class_id])
        class_dir = os.path.join(train_dir, str(class_id))
        os.makedirs(class_dir, exist_ok=True)
        for image_id in range(images_per_class):
            image = render_face(identity, class_rng, image_size)
            path = os.path.join(class_dir, f"{image_id}.jpg")
            if not os.path.exists(path):
                with atomic_write(path) as tmp_path, open(tmp_path, "wb") as ff:
                    ff.write(encode_jpeg(image))
    if not os.path.exists(bin_path):
        eval_images = []
        for offset, identity in enumerate(identities[num_classes:]):
            ident_rng = np.random.default_rng([seed, num_classes + offset])
            eval_images.extend(
                encode_jpeg(render_face(identity, ident_rng, image_size)) for _ in range(eval_images_per_class)
            )
        pairs = _make_pairs(num_eval_classes, eval_images_per_class, num_pairs, rng)
        bins = [eval_images[index] for aa, bb, _ in pairs for index in (aa, bb)]
        write_bin(bin_path, bins, [same for _, _, same in pairs])
    return {"train_dir": train_dir, "bin_path": bin_path, "num_classes": num_classes}

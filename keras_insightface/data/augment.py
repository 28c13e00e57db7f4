"""Image augmentation for training, on float32 0..255 RGB tensors (TensorFlow ops, run inside ``tf.data``).

``random_process_image`` applies the cumulative ``random_status`` levels: -1 none; 0 random horizontal flip;
1 + random brightness (max delta ``12.75 * level``) and clip; 2 + random contrast and saturation in
``[1 - 0.1 * level, 1 + 0.1 * level]``; 3 + random crop to ``random_crop`` and resize back; >= 100 RandAugment-style
ops of magnitude ``5 * level / 100`` after the flip. ``random_cutout_mask`` simulates a face mask and ``mixup``
mixes whole batches while keeping labels sparse.
"""

import math

import tensorflow as tf


def random_process_image(image, img_shape=(112, 112), random_status=0, random_crop=(100, 100, 3)):
    """Augment one float32 0..255 image at level ``random_status`` (see the module docstring)."""
    if random_status >= 0:
        image = tf.image.random_flip_left_right(image)
    if random_status >= 100:
        return rand_augment(image, magnitude=5 * random_status / 100)
    if random_status >= 1:
        image = tf.image.random_brightness(image, 12.75 * random_status)
    if random_status >= 2:
        lower, upper = 1 - 0.1 * random_status, 1 + 0.1 * random_status
        image = tf.image.random_contrast(image, max(lower, 0.0), upper)
        image = tf.image.random_saturation(image, max(lower, 0.0), upper)
    if random_status >= 3:
        crop = tf.image.random_crop(image, (random_crop[0], random_crop[1], 3))
        image = tf.image.resize(crop, img_shape)
    return tf.clip_by_value(image, 0.0, 255.0)


def rand_augment(image, magnitude=5.0, num_ops=2):
    """RandAugment-style: ``num_ops`` random ops out of colour and geometric ones, strength ``magnitude`` (0-10)."""
    level = magnitude / 10.0
    height, width = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)

    def affine(transform):
        transform = tf.reshape(tf.cast(transform, tf.float32), [1, 8])
        out = tf.raw_ops.ImageProjectiveTransformV3(
            images=image[None],
            transforms=transform,
            output_shape=tf.shape(image)[:2],
            fill_value=0.0,
            interpolation="BILINEAR",
            fill_mode="CONSTANT",
        )
        return out[0]

    def signed(value):
        return value * tf.where(tf.random.uniform([]) < 0.5, -1.0, 1.0)

    ops = [
        lambda: tf.image.adjust_brightness(image, signed(level * 0.5 * 255)),
        lambda: tf.image.adjust_contrast(image, 1 + signed(level * 0.9)),
        lambda: tf.image.adjust_saturation(image, 1 + signed(level * 0.9)),
        lambda: tf.where(image < 256 - level * 128, image, 255.0 - image),  # solarize
        lambda: affine([1, signed(level * 0.3), 0, 0, 1, 0, 0, 0]),  # shear x
        lambda: affine([1, 0, signed(level * 0.3 * width), 0, 1, 0, 0, 0]),  # translate x
        lambda: affine([1, 0, 0, 0, 1, signed(level * 0.3 * height), 0, 0]),  # translate y
        lambda: _rotate(image, signed(level * 30.0)),
    ]
    for _ in range(num_ops):
        index = tf.random.uniform([], 0, len(ops), dtype=tf.int32)
        image = tf.switch_case(index, ops)
    return tf.clip_by_value(image, 0.0, 255.0)


def _rotate(image, degrees):
    angle = degrees * math.pi / 180
    height, width = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
    cos, sin = tf.cos(angle), tf.sin(angle)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    transform = [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=tf.reshape(tf.stack(transform), [1, 8]),
        output_shape=tf.shape(image)[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    return out[0]


def random_cutout_mask(image, probability):
    """Simulated face mask: with ``probability`` fill the image from a random row near the nose tip downwards."""
    height = tf.shape(image)[0]
    start = tf.cast(tf.cast(height, tf.float32) * tf.random.uniform([], 0.55, 0.7), tf.int32)
    rows = tf.range(height)[:, None, None]
    color = tf.random.uniform([3], 0, 255)
    masked = tf.where(rows >= start, color, image)
    return tf.cond(tf.random.uniform([]) < probability, lambda: masked, lambda: image)


def mixup(images, labels, alpha):
    """Batch mixup that keeps labels sparse: each image is mixed with a random partner of the batch with a weight
    drawn from Beta(alpha, alpha). Returns ``(mixed images, partner labels, weights of the own labels)``."""
    batch = tf.shape(images)[0]
    gamma_a = tf.random.gamma([batch], alpha)
    gamma_b = tf.random.gamma([batch], alpha)
    weights = gamma_a / (gamma_a + gamma_b)
    partner = tf.random.shuffle(tf.range(batch))
    images = weights[:, None, None, None] * images + (1 - weights[:, None, None, None]) * tf.gather(images, partner)
    return images, tf.gather(labels, partner), weights

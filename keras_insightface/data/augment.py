"""Image augmentation for training, on float32 0..255 RGB tensors (TensorFlow ops, run inside ``tf.data``).

``random_process_image`` applies the cumulative ``random_status`` levels: -1 none; 0 random horizontal flip;
1 + random brightness (max delta ``12.75 * level``) and clip; 2 + random contrast and saturation in
``[1 - 0.1 * level, 1 + 0.1 * level]``; 3 + random crop to ``random_crop`` and resize back; >= 100 RandAugment-style
ops of magnitude ``5 * level / 100`` after the flip. ``random_cutout_mask`` simulates a face mask and ``mixup``
mixes whole batches while keeping labels sparse.

Every random draw is a stateless op of an explicit ``seed`` (a shape ``[2]`` integer tensor): the pipeline gives each
record a seed made from the run's seed and the record's position in the run, so a run resumed in the middle of an
epoch augments every image exactly as the uninterrupted run would have, whatever the parallelism of ``tf.data``.
"""

import functools
import math

import tensorflow as tf


def split_seed(seed, count):
    """``count`` independent stateless seeds drawn from ``seed``."""
    return tf.unstack(tf.random.experimental.stateless_split(seed, num=count))


def random_process_image(image, seed, img_shape=(112, 112), random_status=0, random_crop=(100, 100, 3)):
    """Augment one float32 0..255 image at level ``random_status`` (see the module docstring), its random draws
    made from ``seed``."""
    flip, brightness, contrast, saturation, crop = split_seed(seed, 5)
    if random_status >= 0:
        image = tf.image.stateless_random_flip_left_right(image, flip)
    if random_status >= 100:
        return rand_augment(image, brightness, magnitude=5 * random_status / 100)
    if random_status >= 1:
        image = tf.image.stateless_random_brightness(image, 12.75 * random_status, brightness)
    if random_status >= 2:
        lower, upper = max(1 - 0.1 * random_status, 0.0), 1 + 0.1 * random_status
        image = tf.image.stateless_random_contrast(image, lower, upper, contrast)
        image = tf.image.stateless_random_saturation(image, lower, upper, saturation)
    if random_status >= 3:
        cropped = tf.image.stateless_random_crop(image, (random_crop[0], random_crop[1], 3), crop)
        image = tf.image.resize(cropped, img_shape)
    return tf.clip_by_value(image, 0.0, 255.0)


def rand_augment(image, seed, magnitude=5.0, num_ops=2):
    """RandAugment-style: ``num_ops`` random ops out of colour and geometric ones, strength ``magnitude`` (0-10),
    each with a random sign, drawn from ``seed``."""
    level = magnitude / 10.0
    choice_seed, sign_seed = split_seed(seed, 2)
    choices = tf.random.stateless_uniform([num_ops], choice_seed, 0, len(_RAND_AUGMENT_OPS), dtype=tf.int32)
    signs = tf.where(tf.random.stateless_uniform([num_ops], sign_seed) < 0.5, -1.0, 1.0)
    for index in range(num_ops):
        ops = [functools.partial(op, image, level * signs[index]) for op in _RAND_AUGMENT_OPS]
        image = tf.switch_case(choices[index], ops)
    return tf.clip_by_value(image, 0.0, 255.0)


def _affine(image, transform):
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=tf.reshape(tf.cast(tf.stack(transform), tf.float32), [1, 8]),
        output_shape=tf.shape(image)[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    return out[0]


def _size(image):
    """``(height, width)`` as float32 scalars."""
    return tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)


# RandAugment's ops: ``op(image, signed_level)`` with ``signed_level`` in [-1, 1].
_RAND_AUGMENT_OPS = (
    lambda image, level: tf.image.adjust_brightness(image, level * 0.5 * 255),
    lambda image, level: tf.image.adjust_contrast(image, 1 + level * 0.9),
    lambda image, level: tf.image.adjust_saturation(image, 1 + level * 0.9),
    lambda image, level: tf.where(image < 256 - tf.abs(level) * 128, image, 255.0 - image),  # solarize
    lambda image, level: _affine(image, [1.0, level * 0.3, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]),  # shear x
    lambda image, level: _affine(image, [1.0, 0.0, level * 0.3 * _size(image)[1], 0.0, 1.0, 0.0, 0.0, 0.0]),
    lambda image, level: _affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, level * 0.3 * _size(image)[0], 0.0, 0.0]),
    lambda image, level: _rotate(image, level * 30.0),
)


def _rotate(image, degrees):
    angle = degrees * math.pi / 180
    height, width = _size(image)
    cos, sin = tf.cos(angle), tf.sin(angle)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    return _affine(image, [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0])


def random_cutout_mask(image, probability, seed):
    """Simulated face mask: with ``probability`` fill the image from a random row near the nose tip downwards."""
    row_seed, color_seed, apply_seed = split_seed(seed, 3)
    height = tf.shape(image)[0]
    start = tf.cast(tf.cast(height, tf.float32) * tf.random.stateless_uniform([], row_seed, 0.55, 0.7), tf.int32)
    rows = tf.range(height)[:, None, None]
    color = tf.random.stateless_uniform([3], color_seed, 0, 255)
    masked = tf.where(rows >= start, color, image)
    return tf.cond(tf.random.stateless_uniform([], apply_seed) < probability, lambda: masked, lambda: image)


def mixup(images, labels, alpha, seed):
    """Batch mixup that keeps labels sparse: each image is mixed with a random partner of the batch with a weight
    drawn from Beta(alpha, alpha). Returns ``(mixed images, partner labels, weights of the own labels)``."""
    seed_a, seed_b, partner_seed = split_seed(seed, 3)
    batch = tf.shape(images)[0]
    gamma_a = tf.random.stateless_gamma([batch], seed_a, alpha)
    gamma_b = tf.random.stateless_gamma([batch], seed_b, alpha)
    weights = gamma_a / (gamma_a + gamma_b)
    partner = tf.argsort(tf.random.stateless_uniform([batch], partner_seed))
    images = weights[:, None, None, None] * images + (1 - weights[:, None, None, None]) * tf.gather(images, partner)
    return images, tf.gather(labels, partner), weights

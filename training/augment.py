"""Augmentation and the ``tf.data`` input pipelines (training split only).

Geometry (rotation, zoom, flips) is one random affine transform applied to image and target
alike: bilinear for the image, nearest-neighbour for the target, so they stay aligned. Colour
augmentation (inversion, grayscale, channel shuffle, hue, saturation, contrast, gamma, noise)
makes one model serve fluorescence, bright-field and H&E-stained images.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf
from scipy import ndimage as ndi

from training.config import TrainConfig
from training.targets import CLASS_OF_CODE, code_weights, star_rays


def random_affine(image: tf.Tensor, target: tf.Tensor, config: TrainConfig, out_size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Rotate, zoom and flip ``image`` (H, W, 3 float) and ``target`` (H, W, 1) identically.

    The output is the ``out_size`` square at the centre of the transformed input; pixels that
    fall outside the input are filled by reflection, in image and target alike.
    """
    in_h = tf.cast(tf.shape(image)[0], tf.float32)
    in_w = tf.cast(tf.shape(image)[1], tf.float32)
    angle = tf.random.uniform([], -config.rotation, config.rotation) * 2.0 * math.pi
    log_zoom = math.log1p(config.zoom)
    zoom = tf.exp(tf.random.uniform([], -log_zoom, log_zoom))
    flips = tf.where(tf.random.uniform([2]) < 0.5, -1.0, 1.0) if config.flip else tf.ones([2])
    cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    m00, m01 = cos * flips[0], -sin * flips[1]
    m10, m11 = sin * flips[0], cos * flips[1]
    c_out = (out_size - 1) / 2.0
    cx, cy = (in_w - 1.0) / 2.0, (in_h - 1.0) / 2.0
    transform = tf.stack(
        [m00, m01, cx - m00 * c_out - m01 * c_out, m10, m11, cy - m10 * c_out - m11 * c_out, 0.0, 0.0]
    )[None]
    size = tf.constant([out_size, out_size], tf.int32)

    def apply(x: tf.Tensor, interpolation: str) -> tf.Tensor:
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=x[None], transforms=transform, output_shape=size, interpolation=interpolation,
            fill_mode="REFLECT", fill_value=0.0,
        )[0]

    image = apply(image, "BILINEAR")
    target = tf.cast(apply(tf.cast(target, tf.float32), "NEAREST"), tf.uint8)
    return image, target


def stain_jitter(x: tf.Tensor, scale: float = 0.1, shift: float = 0.05) -> tf.Tensor:
    """Haematoxylin-eosin-DAB stain jitter of an RGB image in [0, 1] (Tellez et al., 2018).

    Unmixes optical density into scikit-image's HED stain vectors, scales and shifts each stain's
    density at random, and mixes back: the colour changes between H&E slides and scanners.
    """
    from skimage.color import hed_from_rgb, rgb_from_hed

    density = -tf.math.log(tf.maximum(x, 1e-3))  # Beer-Lambert optical density
    stains = tf.tensordot(density, tf.constant(hed_from_rgb, tf.float32), 1)
    stains = stains * tf.random.uniform([3], 1.0 - scale, 1.0 + scale) + tf.random.uniform([3], -shift, shift)
    return tf.clip_by_value(tf.exp(-tf.tensordot(stains, tf.constant(rgb_from_hed, tf.float32), 1)), 0.0, 1.0)


def gaussian_blur(x: tf.Tensor, sigma: tf.Tensor, radius: int = 6) -> tf.Tensor:
    """Blur an (H, W, C) image by a Gaussian of ``sigma`` px, with reflected borders.

    Keras' own blur pads with zeros, which would darken every crop's edges; reflecting first and
    cutting the margin off keeps them as bright as the rest.
    """
    side = 2 * radius + 1
    padded = tf.pad(x, [[radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    return keras.ops.image.gaussian_blur(padded, (side, side), (sigma, sigma))[radius:-radius, radius:-radius]


def acquisition_artefacts(x: tf.Tensor) -> tf.Tensor:
    """Defocus blur, then sensor noise, then JPEG compression, each a third of the time (x in [0, 1]).

    Users bring out-of-focus, noisy and JPEG-saved images: on such copies of the validation split
    the shipped model, trained without these, loses 0.045-0.061 AP@0.5, and a model trained with
    them 0.016-0.026, at 0.012 of DSB2018 score on the images as stored (docs/robustness.md,
    docs/training.md "Robustness to acquisition artefacts").
    """
    def sometimes(change):  # tf.cond: the work is only done when the change is drawn
        return lambda y: tf.cond(tf.random.uniform([]) < 1 / 3, lambda: change(y), lambda: y)

    blur = sometimes(lambda y: gaussian_blur(y, tf.random.uniform([], 0.5, 2.0)))
    noise = sometimes(lambda y: tf.clip_by_value(
        y + tf.random.normal(tf.shape(y), stddev=tf.random.uniform([], 0.0, 0.06)), 0.0, 1.0))
    jpeg = sometimes(lambda y: tf.image.adjust_jpeg_quality(y, tf.random.uniform([], 30, 91, tf.int32)))
    return jpeg(noise(blur(x)))


def colour_jitter(image: tf.Tensor, stain: bool = False, artefacts: bool = False) -> tf.Tensor:
    """Random photometric changes on a float RGB image in [0, 255].

    ``stain``: HED jitter half the time; ``artefacts``: also blur, strong noise and JPEG
    (:func:`acquisition_artefacts`) before the mild noise every crop gets.
    """
    x = image / 255.0
    if stain:
        x = tf.where(tf.random.uniform([]) < 0.5, stain_jitter(x), x)
    x = tf.where(tf.random.uniform([]) < 0.5, 1.0 - x, x)  # dark-field <-> bright-field
    x = tf.where(tf.random.uniform([]) < 0.25, tf.repeat(tf.reduce_mean(x, -1, keepdims=True), 3, -1), x)
    x = tf.where(tf.random.uniform([]) < 0.3, tf.gather(x, tf.random.shuffle(tf.range(3)), axis=-1), x)
    x = tf.image.random_hue(x, 0.08)
    x = tf.image.random_saturation(x, 0.5, 1.5)
    mean = tf.reduce_mean(x)
    x = (x - mean) * tf.random.uniform([], 0.6, 1.4) + mean + tf.random.uniform([], -0.1, 0.1)
    x = tf.clip_by_value(x, 0.0, 1.0) ** tf.exp(tf.random.uniform([], -0.4, 0.4))
    if artefacts:
        x = acquisition_artefacts(x)
    x = x + tf.random.normal(tf.shape(x), stddev=tf.random.uniform([], 0.0, 0.03))
    return tf.clip_by_value(x, 0.0, 1.0) * 255.0


def augment(image: tf.Tensor, target: tf.Tensor, config: TrainConfig, out_size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Full augmentation of one (image uint8, target uint8 ``(H, W, C)``) pair -> (float image, target)."""
    image = tf.cast(image, tf.float32)
    image, target = random_affine(image, target, config, out_size)
    if config.colour:
        image = colour_jitter(image, config.stain, config.artefacts)
    return image, target


def with_weights(image: tf.Tensor, target: tf.Tensor, config: TrainConfig) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Target codes ``(H, W, 1|2|4)`` -> (image, class, per-pixel loss weight).

    With the distance output, the class is ``(H, W, 2)`` float: class index and normalised distance
    (see ``training.losses``), followed by the StarDist ray distances of the crop's labels when the
    model has rays. The thin, rare boundary class weighs ``boundary_weight``; where nuclei touch (codes
    ``CONTACT`` and ``GAP``) the weight is multiplied by ``contact_weight``, and on small nuclei (codes
    above ``SMALL``) by ``small_weight`` (see ``training.targets.code_weights``).
    """
    codes = tf.cast(target[..., 0], tf.int32)
    weights = tf.gather(tf.constant(code_weights(config.boundary_weight, config.contact_weight, config.small_weight)),
                        codes)
    classes = tf.gather(tf.constant(CLASS_OF_CODE), codes)
    if not config.distance_output:
        return image, classes, weights
    distance = tf.cast(target[..., 1], tf.float32) / 255.0
    y = tf.stack([tf.cast(classes, tf.float32), distance], axis=-1)
    if config.rays:  # StarDist rays of the augmented crop's own labels (channels 2 and 3)
        rays = tf.numpy_function(lambda labels: star_rays(labels, config.rays), [target[..., 2:4]], tf.float32)
        rays.set_shape([*target.shape[:2], config.rays])
        y = tf.concat([y, rays], axis=-1)
    return image, y, weights


def resize_dataset(images: np.ndarray, targets: np.ndarray, config: TrainConfig, training: bool) -> tf.data.Dataset:
    """Pipeline for fixed-size arrays (the reference recipe): shuffle, augment, batch."""
    ds = tf.data.Dataset.from_tensor_slices((images, targets))
    if training:
        ds = ds.shuffle(len(images), seed=config.seed, reshuffle_each_iteration=True).repeat()
        ds = ds.map(lambda x, y: augment(x, y, config, config.image_size), num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y))
    ds = ds.map(lambda x, y: with_weights(x, y, config))
    return ds.batch(config.batch_size).prefetch(tf.data.AUTOTUNE)


def crop_dataset(images: list[np.ndarray], targets: list[np.ndarray], probabilities: np.ndarray,
                 config: TrainConfig) -> tf.data.Dataset:
    """Pipeline for native-size images: random crops (sampled with ``probabilities``), then augment.

    Crops are taken 1.5x larger than the network input so rotation and zoom rarely need to
    invent border pixels.
    """
    crop = int(config.image_size * 1.5)
    rng = np.random.default_rng(config.seed)
    padded = [pad_to_at_least(img, tgt, crop) for img, tgt in zip(images, targets)]

    def generate():
        while True:
            image, target = padded[rng.choice(len(padded), p=probabilities)]
            top = rng.integers(0, image.shape[0] - crop + 1)
            left = rng.integers(0, image.shape[1] - crop + 1)
            image, target = image[top:top + crop, left:left + crop], target[top:top + crop, left:left + crop]
            if config.copy_paste and rng.random() < config.copy_paste:
                image, target = paste_nuclei(image, target, rng)
            yield image, target

    ds = tf.data.Dataset.from_generator(
        generate,
        output_signature=(tf.TensorSpec((crop, crop, 3), tf.uint8),
                          tf.TensorSpec((crop, crop, targets[0].shape[-1]), tf.uint8)),  # codes [+ distance]
    )
    ds = ds.map(lambda x, y: augment(x, y, config, config.image_size), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(lambda x, y: with_weights(x, y, config))
    return ds.batch(config.batch_size).prefetch(tf.data.AUTOTUNE)


def paste_nuclei(image: np.ndarray, target: np.ndarray, rng: np.random.Generator, most: int = 10,
                 margin: int = 3, tries: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Copy-paste augmentation: up to ``most`` of the crop's own nuclei, pasted onto its plain background.

    Why: with half the training images the shipped recipe lost 0.014 AP@0.5, so more nucleus examples
    may help, and copies from the same crop keep its modality, stain and scale (Ghiasi et al., 2021,
    paste between images instead). A piece is a connected group of nucleus pixels (a lone nucleus or
    touching ones, with their rims and contact codes, so its target stays right); pieces cut by the
    crop's edge are never copied. Each copy is turned by a random multiple of 90 degrees, maybe
    mirrored, and lands only where it and ``margin`` px around it are plain background, away from
    every nucleus and earlier copy, so no nucleus' target changes. The image takes the piece plus one
    px around it (the nucleus' own edge); the target takes the piece's codes, every channel.
    """
    nucleus = CLASS_OF_CODE[target[..., 0]] != 0
    labels, count = ndi.label(nucleus, structure=np.ones((3, 3)))
    if count == 0:
        return image, target
    image, target = image.copy(), target.copy()
    free = ~ndi.binary_dilation(target[..., 0] != 0, iterations=margin)
    boxes = ndi.find_objects(labels)
    height, width = nucleus.shape
    for index in rng.permutation(count)[:rng.integers(1, most + 1)]:
        rows, cols = boxes[index]
        if min(rows.start, cols.start) < margin or rows.stop > height - margin or cols.stop > width - margin:
            continue  # cut by (or too near) the crop's edge: maybe not a whole nucleus
        box = (slice(rows.start - margin, rows.stop + margin), slice(cols.start - margin, cols.stop + margin))
        turns, mirror = int(rng.integers(4)), bool(rng.random() < 0.5)
        piece, pixels, codes = (turned(x, turns, mirror) for x in (labels[box] == index + 1, image[box], target[box]))
        skin = ndi.binary_dilation(piece)
        reach = ndi.binary_dilation(piece, iterations=margin)
        h, w = piece.shape
        for _ in range(tries if h < height and w < width else 0):
            top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
            where = (slice(top, top + h), slice(left, left + w))
            if free[where][reach].all():
                image[where][skin] = pixels[skin]
                target[where][piece] = codes[piece]
                free[where] &= ~reach
                break
    return image, target


def turned(x: np.ndarray, turns: int, mirror: bool) -> np.ndarray:
    """``x`` rotated by ``turns`` quarter turns in its first two axes, then mirrored left-right if ``mirror``."""
    x = np.rot90(x, turns)
    return x[:, ::-1] if mirror else x


def pad_to_at_least(image: np.ndarray, target: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Reflect-pad image and target together so both sides are at least ``size``."""
    pad_h, pad_w = max(0, size - image.shape[0]), max(0, size - image.shape[1])
    if not (pad_h or pad_w):
        return image, target
    pads = ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2))
    return np.pad(image, (*pads, (0, 0)), mode="symmetric"), np.pad(target, (*pads, (0, 0)), mode="symmetric")


def centre_crops(images: list[np.ndarray], targets: list[np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic ``size`` centre crops (padded where smaller), for validation loss during fit."""
    xs, ys = [], []
    for image, target in zip(images, targets):
        image, target = pad_to_at_least(image, target, size)
        top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
        xs.append(image[top:top + size, left:left + size])
        ys.append(target[top:top + size, left:left + size])
    return np.stack(xs), np.stack(ys)

"""The request path as one function: decoded RGB image -> instance labels.

``normalise`` -> model (``resize`` like the reference, or ``tile`` at native resolution with
the nucleus size brought to the model's canonical size) -> ``postprocess``. The HTTP app and the
evaluation both call :func:`segment`, so the numbers we report are the numbers users get.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from service.model import SegmentationModel
from service.normalise import normalise
from service.postprocess import (RAY_START, PostprocessParams, flipped_ray_order, has_rays,
                                 instances_from_probabilities, median_diameter)
from service.tiling import DEFAULT_MAX_TILE, check_max_tile, predict_tiled

#: Scale factors applied to reach the canonical nucleus size are kept within these bounds
#: (upscaling costs time quadratically; beyond 4x down, nuclei are bigger than any training crop).
SCALE_LIMITS = (0.25, 2.0)
#: Upscaling never makes the working image larger than this (memory and time stay bounded).
MAX_UPSCALED_PIXELS = 16_000_000
#: A first-pass scale estimate within this band of 1 is accepted without a second pass.
SCALE_TOLERANCE = (0.8, 1.25)
#: The first look at an image is at this scale (a quarter of the pixels) ...
COARSE_SCALE = 0.5
#: ... and is trusted when its nuclei are at least this fraction of the canonical size there
#: (the smallest size the training's zoom augmentation shows the model, canonical / 1.5, rounded up).
COARSE_TRUST = 0.75


@dataclass(frozen=True)
class SegmentOptions:
    """Per-request choices; ``None`` means the model's default from its metadata."""

    tiling: bool | None = None  # True: native-resolution tiles; False: resize to the model input (reference)
    tta: bool = False  # average predictions over flips (4x the model cost)
    min_size: int | None = None  # drop nuclei smaller than this many pixels
    tile_batch_size: int = 8  # pixels per model call: this many tiles of the model's input size
    max_tile_size: int = DEFAULT_MAX_TILE  # largest tile side; tiles are sized to the image up to it
    auto_scale: bool = True  # rescale to the canonical nucleus size (tile mode, when the model has one)
    deadline: float | None = None  # time.monotonic() after which the work is abandoned

    def __post_init__(self) -> None:
        check_max_tile(self.max_tile_size)


class DeadlineExceeded(TimeoutError):
    """The request's time budget ran out; remaining model calls were skipped."""


@dataclass
class Segmentation:
    """Result of :func:`segment` for one image."""

    labels: np.ndarray  # (H, W) int32, 0 background, 1..N nuclei
    scale: float  # factor the image was resized by before the model (1.0 = native)
    probabilities: np.ndarray  # (H, W, C) class probabilities the labels were decoded from


def segment(image: np.ndarray, model: SegmentationModel, options: SegmentOptions = SegmentOptions()) -> Segmentation:
    """Segment one ``(H, W, 3) uint8`` RGB image into nucleus instances at its own size."""
    spec = model.spec
    params = spec.postprocess if options.min_size is None else replace(spec.postprocess, min_size=options.min_size)
    image = normalise(image, spec.normalise)
    tiling = spec.inference == "tile" if options.tiling is None else options.tiling
    if not tiling:
        size = (spec.image_size, spec.image_size)
        probs = probabilities_at(image, model, size, options, tiled=False)
        return Segmentation(instances_from_probabilities(probs, params), 1.0, probs)
    if not (options.auto_scale and spec.canonical_diameter):
        probs = probabilities_at(image, model, None, options)
        return Segmentation(instances_from_probabilities(probs, params), 1.0, probs)
    sizing = replace(params, instances="watershed")  # sizes need nuclei, not their exact shapes: the cheap decoding
    scale, probs, labels = first_pass(image, model, options, sizing)
    upper = max(1.0, min(SCALE_LIMITS[1], (MAX_UPSCALED_PIXELS / image.shape[0] / image.shape[1]) ** 0.5))
    for _ in range(2):  # a far-off first estimate is refined once more
        proposed = rescale_factor(labels, spec.canonical_diameter)  # labels are at native size
        proposed = float(np.clip(proposed, SCALE_LIMITS[0], upper))
        if SCALE_TOLERANCE[0] <= proposed / scale <= SCALE_TOLERANCE[1]:
            break
        new_probs = probabilities_at(image, model, scaled_size(image, proposed), options)
        new_labels = instances_from_probabilities(new_probs, sizing)
        if np.count_nonzero(new_labels) < 0.5 * np.count_nonzero(labels):
            break  # the rescaled view lost most of the nuclei: the size estimate was wrong
        scale, probs, labels = proposed, new_probs, new_labels
    if params != sizing:  # StarDist polygons: decoded once, from the pass that is kept
        labels = instances_from_probabilities(probs, params)
    return Segmentation(labels, scale, probs)


def first_pass(image: np.ndarray, model: SegmentationModel, options: SegmentOptions,
               params: PostprocessParams) -> tuple[float, np.ndarray, np.ndarray]:
    """Scale, probabilities and labels of the first look at the image, from which its size is estimated.

    At native resolution the model cuts nuclei far larger than its canonical size into fragments
    that look canonical, so a native first pass cannot see that it should shrink the image. A
    quarter-cost look at ``COARSE_SCALE`` first: when the nuclei it finds are still at least
    ``COARSE_TRUST`` of the canonical size at that scale, they are large and that look is kept;
    otherwise the nuclei are small and the native pass decides.
    """
    canonical = model.spec.canonical_diameter
    coarse = probabilities_at(image, model, scaled_size(image, COARSE_SCALE), options)
    coarse_labels = instances_from_probabilities(coarse, params)
    diameter = median_diameter(coarse_labels)  # native pixels
    if diameter is not None and diameter * COARSE_SCALE >= COARSE_TRUST * canonical:
        return COARSE_SCALE, coarse, coarse_labels
    del coarse, coarse_labels  # peak memory: one image-sized probability map at a time
    probs = probabilities_at(image, model, None, options)
    return 1.0, probs, instances_from_probabilities(probs, params)


def scaled_size(image: np.ndarray, scale: float) -> tuple[int, int]:
    """``(height, width)`` of ``image`` resized by ``scale`` (at least one pixel each)."""
    return max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))


def rescale_factor(labels: np.ndarray, canonical: float) -> float:
    """Factor that would bring the median nucleus in ``labels`` to ``canonical`` pixels across."""
    diameter = median_diameter(labels)
    return 1.0 if diameter is None else canonical / diameter


def probabilities_at(image: np.ndarray, model: SegmentationModel, size: tuple[int, int] | None,
                     options: SegmentOptions, tiled: bool = True) -> np.ndarray:
    """Class probabilities at the image's own size, computed with the image resized to ``size``.

    ``size`` None keeps native resolution. ``tiled`` runs overlapping tiles sized to the image, up to
    ``options.max_tile_size`` (memory bounded by the pixels per call); otherwise the model sees the
    resized image whole.
    """
    height, width = image.shape[:2]
    work = image if size is None or size == (height, width) else resize(image, size)
    predict = predictor(model, options)
    if tiled:
        max_tile, multiple = model.tile_limits(options.max_tile_size)
        batch_pixels = options.tile_batch_size * model.spec.tile_pixels
        probs = predict_tiled(work, predict, max_tile, model.spec.tile_overlap, batch_pixels,
                              model.spec.num_classes, multiple)
    else:
        probs = predict(work[None])[0]
    if probs.shape[:2] != (height, width):
        factor = (height / probs.shape[0] + width / probs.shape[1]) / 2.0
        probs = resize(probs, (height, width))
        if has_rays(probs):
            probs[..., RAY_START:] *= factor  # ray lengths are in the pixels of the image the model saw
    return probs


def predictor(model: SegmentationModel, options: SegmentOptions) -> Callable[[np.ndarray], np.ndarray]:
    """The model call for these options: plain or flip-averaged, and checking the deadline first."""
    predict = model.predict if not options.tta else (lambda batch: predict_flips(model, batch))
    if options.deadline is None:
        return predict

    def guarded(batch: np.ndarray) -> np.ndarray:
        if time.monotonic() > options.deadline:
            raise DeadlineExceeded("request time limit reached")
        return predict(batch)

    return guarded


def predict_flips(model: SegmentationModel, batch: np.ndarray) -> np.ndarray:
    """Test-time augmentation: mean probabilities over identity and horizontal/vertical flips."""
    total = model.predict(batch)
    for axes in ((2,), (1,), (1, 2)):
        probs = np.flip(model.predict(np.ascontiguousarray(np.flip(batch, axes))), axes)
        if has_rays(probs):  # a flipped image's rays point the other way
            order = flipped_ray_order(probs.shape[-1] - RAY_START, tuple(a - 1 for a in axes))
            probs = np.concatenate([probs[..., :RAY_START], probs[..., RAY_START:][..., order]], axis=-1)
        total += probs
    return total / 4.0


def resize(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an ``(H, W, C)`` image or probability map (antialiased when shrinking)."""
    import tensorflow as tf

    shrinking = size[0] < array.shape[0] or size[1] < array.shape[1]
    out = tf.image.resize(array[None].astype(np.float32), size, method="bilinear", antialias=shrinking)[0].numpy()
    if array.dtype == np.uint8:
        return np.clip(np.round(out), 0, 255).astype(np.uint8)
    return out

"""The request path as one function: decoded RGB image -> instance labels.

``normalise`` -> size (given, or estimated once: ``service.size``) -> rescale -> model
(``resize`` like the reference, or ``tile`` at native resolution) -> ``postprocess``. The HTTP
app and the evaluation both call :func:`segment`, so the numbers we report are the numbers users get.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import numpy as np

from service.model import SegmentationModel
from service.normalise import normalise
from service.resample import resize
from service.postprocess import (RAY_START, PostprocessParams, flipped_ray_order, has_rays,
                                 instances_from_probabilities)
from service.size import DIAMETER_RANGE, View, estimated_view, scale_for_diameter
from service.tiling import DEFAULT_MAX_TILE, check_max_tile, predict_tiled


#: Where the per-request probability thresholds may be set (0 or 1 would keep or drop everything).
THRESHOLD_RANGE = (0.05, 0.95)


@dataclass(frozen=True)
class SegmentOptions:
    """Per-request choices; ``None`` means the model's default from its metadata."""

    tiling: bool | None = None  # True: native-resolution tiles; False: resize to the model input (reference)
    tta: bool = False  # average predictions over flips (4x the model cost)
    min_size: int | None = None  # drop nuclei smaller than this many pixels
    prob_thresh: float | None = None  # P(nucleus) above this is foreground (StarDist's prob_thresh)
    seed_thresh: float | None = None  # P(interior) above this seeds a nucleus: higher splits fewer
    tile_batch_size: int = 8  # pixels per model call: this many tiles of the model's input size
    max_tile_size: int = DEFAULT_MAX_TILE  # largest tile side; tiles are sized to the image up to it
    auto_scale: bool = True  # rescale to the canonical nucleus size (tile mode, when the model has one)
    diameter: float | None = None  # typical nucleus diameter (px of the image): sets the scale, nothing estimated
    deadline: float | None = None  # time.monotonic() after which the work is abandoned

    def __post_init__(self) -> None:
        check_max_tile(self.max_tile_size)
        for name in ("prob_thresh", "seed_thresh"):
            value = getattr(self, name)
            if value is not None and not THRESHOLD_RANGE[0] <= value <= THRESHOLD_RANGE[1]:
                raise ValueError(f"{name} must be within {THRESHOLD_RANGE[0]:g}-{THRESHOLD_RANGE[1]:g}, got {value:g}")
        if self.diameter is not None and not DIAMETER_RANGE[0] <= self.diameter <= DIAMETER_RANGE[1]:
            raise ValueError(f"diameter must be within {DIAMETER_RANGE[0]:g}-{DIAMETER_RANGE[1]:g} px, "
                             f"got {self.diameter:g}")


    def applied_to(self, params: PostprocessParams) -> PostprocessParams:
        """The model's decoding thresholds with this request's own in their place."""
        chosen = {"min_size": self.min_size, "foreground_threshold": self.prob_thresh,
                  "seed_threshold": self.seed_thresh}
        chosen = {k: v for k, v in chosen.items() if v is not None}
        return replace(params, **chosen) if chosen else params


class DeadlineExceeded(TimeoutError):
    """The request's time budget ran out; remaining model calls were skipped."""


@dataclass
class Segmentation:
    """Result of :func:`segment` for one image."""

    labels: np.ndarray  # (H, W) int32, 0 background, 1..N nuclei
    scale: float  # factor the image was resized by before the model (1.0 = native)
    probabilities: np.ndarray  # (H, W, C) class probabilities the labels were decoded from


class SizeError(ValueError):
    """A ``diameter`` was given for a model that has no canonical nucleus size to bring it to."""


def segment(image: np.ndarray, model: SegmentationModel, options: SegmentOptions = SegmentOptions()) -> Segmentation:
    """Segment one ``(H, W, 3) uint8`` RGB image into nucleus instances at its own size."""
    spec = model.spec
    params = options.applied_to(spec.postprocess_for(image))  # the raw image's modality may have its own
    image = normalise(image, spec.normalise)
    tiling = spec.inference == "tile" if options.tiling is None else options.tiling
    if options.diameter is not None and not (tiling and spec.canonical_diameter):
        raise SizeError("diameter needs tiled inference and a model that records a canonical nucleus size "
                        "(inference.canonical_diameter in its metadata); this request or model has neither")
    if not tiling:
        size = (spec.image_size, spec.image_size)
        probs = probabilities_at(image, model, size, options, tiled=False)
        return Segmentation(instances_from_probabilities(probs, params), 1.0, probs)
    sizing = replace(params, instances="watershed")  # sizes need nuclei, not their exact shapes: the cheap decoding

    def look(scale: float) -> View:
        work = image if scale == 1.0 else resize(image, scaled_size(image, scale))
        probs = probabilities_of(work, model, options)
        return View(scale, probs, partial(instances_from_probabilities, params=scaled_params(sizing, scale)))

    if options.diameter is not None:
        view = look(scale_for_diameter(options.diameter, spec.canonical_diameter, image.shape))
    elif options.auto_scale and spec.canonical_diameter:
        view = estimated_view(look, spec.canonical_diameter, image.shape)
    else:
        view = look(1.0)
    probs = at_size(view.probabilities, image.shape[:2])
    reuse = view.scale == 1.0 and params == sizing  # the native view's sizing labels are the labels asked for
    labels = view.labels if reuse else instances_from_probabilities(probs, params)
    return Segmentation(labels, view.scale, probs)  # StarDist polygons: decoded once, from the kept view


def scaled_size(image: np.ndarray, scale: float) -> tuple[int, int]:
    """``(height, width)`` of ``image`` resized by ``scale`` (at least one pixel each)."""
    return max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))


def scaled_params(params: PostprocessParams, scale: float) -> PostprocessParams:
    """``params`` for decoding at ``scale``: its pixel-area limits scaled by ``scale`` squared."""
    if scale == 1.0:
        return params
    return replace(params, min_size=max(1, round(params.min_size * scale * scale)),
                   border_min_size=round(params.border_min_size * scale * scale))


def probabilities_at(image: np.ndarray, model: SegmentationModel, size: tuple[int, int] | None,
                     options: SegmentOptions, tiled: bool = True) -> np.ndarray:
    """Class probabilities at the image's own size, computed with the image resized to ``size``
    (None: native resolution); ``tiled=False`` lets the model see the resized image whole."""
    height, width = image.shape[:2]
    work = image if size is None or size == (height, width) else resize(image, size)
    return at_size(probabilities_of(work, model, options, tiled), (height, width))


def probabilities_of(work: np.ndarray, model: SegmentationModel, options: SegmentOptions,
                     tiled: bool = True) -> np.ndarray:
    """Class probabilities of ``work`` at its own size: overlapping tiles sized to it, up to
    ``options.max_tile_size`` (memory bounded by the pixels per call), or ``tiled=False`` whole."""
    predict = predictor(model, options)
    if not tiled:
        return predict(work[None])[0]
    max_tile, multiple = model.tile_limits(options.max_tile_size)
    batch_pixels = options.tile_batch_size * model.spec.tile_pixels
    return predict_tiled(work, predict, max_tile, model.spec.tile_overlap, batch_pixels,
                         model.spec.num_classes, multiple)


def at_size(probs: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Probabilities brought to ``size`` (the image's own), ray lengths rescaled with them."""
    if probs.shape[:2] == tuple(size):
        return probs
    factor = (size[0] / probs.shape[0] + size[1] / probs.shape[1]) / 2.0
    probs = resize(probs, size)
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


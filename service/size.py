"""Nucleus size: the scale at which an image is segmented, so its nuclei reach the model's canonical size.

The model was trained with every image rescaled so that its median nucleus is
``canonical_diameter`` pixels across (give or take its zoom augmentation), so the request path
rescales each upload the same way before the tiles: size -> rescale -> tiles -> decode.

* A ``diameter`` given by the user (pixels of the uploaded image, as Cellpose's ``diameter``)
  fixes the scale: one pass, nothing estimated.
* Otherwise the size is read off the model's own output. At native resolution the model cuts
  nuclei far larger than its canonical size into canonical-looking fragments, so a native look
  cannot tell that it should shrink the image; cheap looks at ``COARSE_SCALES`` come first (a
  quarter of the pixels, then a sixteenth). The coarsest look whose nuclei are still large there
  (at least ``COARSE_TRUST`` of canonical) decides the scale: the half-scale look alone still cuts
  nuclei of four times the canonical size into pieces, which the quarter-scale look sees whole.
  When no look finds large nuclei they are small, and the native pass, needed anyway, decides.
  Either way the chosen scale is run once (unless it is a look's own), and the looks' numbers
  are not used again.

This module decides; it runs nothing itself. The caller's ``look(scale)`` computes the
probabilities and labels at one scale (``service.pipeline``), so tiling, batching and deadlines
stay where they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from service.postprocess import median_diameter

#: Scale factors applied to reach the canonical nucleus size are kept within these bounds
#: (upscaling costs time quadratically; beyond 4x down, nuclei are bigger than any training crop).
SCALE_LIMITS = (0.25, 2.0)
#: Upscaling never makes the working image larger than this (memory and time stay bounded).
MAX_UPSCALED_PIXELS = 16_000_000
#: A look whose own nuclei imply a scale within this band of its own is kept as the final pass.
SCALE_TOLERANCE = (0.8, 1.25)
#: The looks at an image before any full-resolution pass, finest first: the next one is taken only
#: while the nuclei are large at the current one (1/4 and 1/16 of the pixels) ...
COARSE_SCALES = (0.5, 0.25)
#: ... and a look decides when its nuclei are at least this fraction of the canonical size there
#: (the smallest size the training's zoom augmentation shows the model, canonical / 1.5, rounded up).
COARSE_TRUST = 0.75
#: Smallest and largest ``diameter`` (px) a request may give.
DIAMETER_RANGE = (2.0, 1000.0)


@dataclass
class View:
    """The model's output for an image computed at one scale, brought back to the image's own size."""

    scale: float  # factor the image was resized by before the model
    probabilities: np.ndarray  # (H, W, C) at the image's own size
    labels: np.ndarray  # (H, W) int32 instances decoded from them


Look = Callable[[float], View]


def scale_bounds(shape: tuple[int, ...]) -> tuple[float, float]:
    """The scales allowed for an image of ``shape``: ``SCALE_LIMITS``, with upscaling kept under
    ``MAX_UPSCALED_PIXELS`` (never below 1: an image already that large is not shrunk for it)."""
    upper = max(1.0, min(SCALE_LIMITS[1], (MAX_UPSCALED_PIXELS / shape[0] / shape[1]) ** 0.5))
    return SCALE_LIMITS[0], upper


def scale_for_diameter(diameter: float, canonical: float, shape: tuple[int, ...]) -> float:
    """The factor that brings nuclei of ``diameter`` px to ``canonical`` px, within :func:`scale_bounds`."""
    return float(np.clip(canonical / diameter, *scale_bounds(shape)))


def within_tolerance(proposed: float, current: float) -> bool:
    """Whether a pass at ``current`` is close enough to the ``proposed`` scale to be kept."""
    return SCALE_TOLERANCE[0] <= proposed / current <= SCALE_TOLERANCE[1]


def estimated_view(look: Look, canonical: float, shape: tuple[int, ...]) -> View:
    """Estimate the nucleus size from the model's output and return the view at the chosen scale.

    Usually two passes: for small and canonical nuclei the half-scale look and the native pass
    (plus an upscaled pass when they are small); for large nuclei the coarse looks (the quarter
    scale costs a quarter of the half) plus one pass. A rescaled pass that loses most of the
    nucleus pixels of the view it was estimated from means the estimate was wrong: that view is kept.
    """
    base, diameter = coarse_view(look, canonical)
    if base is None:
        base = look(1.0)
        diameter = median_diameter(base.labels)
    if diameter is None:
        return base
    proposed = scale_for_diameter(diameter, canonical, shape)
    if within_tolerance(proposed, base.scale):
        return base
    rescaled = look(proposed)
    if np.count_nonzero(rescaled.labels) < 0.5 * np.count_nonzero(base.labels):
        return base
    return rescaled


def coarse_view(look: Look, canonical: float) -> tuple[View | None, float | None]:
    """The coarsest of the ``COARSE_SCALES`` looks whose nuclei are large there, with their median
    diameter in native pixels; ``(None, None)`` when the nuclei are small even at the first look."""
    best: tuple[View | None, float | None] = (None, None)
    for scale in COARSE_SCALES:
        view = look(scale)
        diameter = median_diameter(view.labels)
        if diameter is None or diameter * scale < COARSE_TRUST * canonical:
            break  # too small here: the finer look (or the native pass) sees them better
        best = (view, diameter)
    return best

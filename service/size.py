"""Nucleus size: the scale at which an image is segmented, so its nuclei reach the model's canonical size.

The model was trained with every image rescaled so that its median nucleus is
``canonical_diameter`` pixels across (give or take its zoom augmentation), so the request path
rescales each upload the same way before the tiles: size -> rescale -> tiles -> decode.

* A ``diameter`` given by the user (pixels of the uploaded image, as Cellpose's ``diameter``)
  fixes the scale: one pass, nothing estimated.
* Otherwise the size is read off the model's own output. At native resolution the model cuts
  nuclei far larger than its canonical size into canonical-looking fragments, so a native look
  cannot tell that it should shrink the image; cheap looks at ``COARSE_SCALES`` come first (a
  quarter of the pixels, then a sixteenth). How large the nuclei are at a look decides how far
  its estimate is trusted over the finer view's: not at all below ``COARSE_TRUST[0]`` of the
  canonical size, fully above ``COARSE_TRUST[1]``, in proportion between, where both views are
  computed and their estimates blended (in log size). The chosen scale therefore moves
  continuously with the model's output: a change of 1e-3 in the probabilities (bf16 against f32)
  can move it a little, never flip it from one view to another. The half-scale look alone still
  cuts nuclei of four times the canonical size into pieces, which the quarter-scale look sees whole.
* The image is then run once at the chosen scale, unless a view already computed is within the
  ``SCALE_TOLERANCE`` of it; the other views' numbers are not used again.

This module decides; it runs nothing itself. The caller's ``look(scale)`` computes the
probabilities at one scale and how to decode them (``service.pipeline``), so tiling, batching and deadlines
stay where they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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
#: ... and a look's estimate is trusted from the first to fully at the second fraction of the canonical
#: size there (around the smallest size the training's zoom augmentation shows, canonical / 1.5).
COARSE_TRUST = (0.6, 0.9)
#: Smallest and largest ``diameter`` (px) a request may give.
DIAMETER_RANGE = (2.0, 1000.0)


@dataclass
class View:
    """The model's output for an image computed at one scale, kept at that scale.

    Only the view finally kept is brought back to the image's own size (``service.pipeline``), so
    a look that only sizes the nuclei costs no resize and no decoding at full size; a view's own
    labels are decoded only when its nuclei are measured, so the final rescaled pass is decoded
    once, at the image's size, never at its working size too.
    """

    scale: float  # factor the image was resized by before the model
    probabilities: np.ndarray  # (h, w, C) at the working size (the image resized by ``scale``)
    decoder: Callable[[np.ndarray], np.ndarray]  # probabilities -> (h, w) int32 instances, for sizing
    _labels: np.ndarray | None = field(default=None, init=False, repr=False)

    @property
    def labels(self) -> np.ndarray:
        """Instances decoded at the working size (computed once, when first asked for).

        Not ``functools.cached_property``: on Python 3.11 it holds one lock for every instance
        of the class, so concurrent requests' decodings would wait on one another.
        """
        if self._labels is None:
            self._labels = self.decoder(self.probabilities)
        return self._labels

    def diameter(self) -> float | None:
        """Median nucleus diameter in pixels of the image itself (``None`` when no nucleus was found)."""
        diameter = median_diameter(self.labels)
        return None if diameter is None else diameter / self.scale

    def coverage(self) -> float:
        """Share of the image's pixels the model calls nucleus (P > 0.5): comparable between views of
        different scales, and read off the probabilities, so it needs no decoding."""
        background = self.probabilities[..., 0]
        return float(np.count_nonzero(background < 0.5)) / max(1, background.size)


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
    scale costs a quarter of the half) plus one pass; in the band between, the native pass too.
    A rescaled pass with under half the foreground (P(nucleus) > 0.5) of the view nearest its scale means the
    estimate was wrong: that view is kept.
    """
    proposed, views = estimated_scale(look, canonical, shape)
    if proposed is None:
        return views[-1]
    nearest = min(views, key=lambda view: abs(np.log(proposed / view.scale)))
    if within_tolerance(proposed, nearest.scale):
        return nearest
    rescaled = look(proposed)
    if rescaled.coverage() < 0.5 * nearest.coverage():
        return nearest
    return rescaled


def estimated_scale(look: Look, canonical: float, shape: tuple[int, ...]) -> tuple[float | None, list[View]]:
    """(the scale the looks' blended size estimate asks for, None if no look found a nucleus; the views
    that may be kept). A continuous function of the looks' median diameters."""
    views: list[View] = []  # views that may be kept (a look whose nuclei are small never is)
    log_diameter, trusted = coarse_estimate(look, canonical, views)
    if trusted < 1.0:
        native = look(1.0)
        views.append(native)
        native_diameter = native.diameter()
        if native_diameter is not None:
            log_native = float(np.log(native_diameter))
            log_diameter = log_native if log_diameter is None else (
                (1.0 - trusted) * log_native + trusted * log_diameter)
    if log_diameter is None:
        return None, views
    return scale_for_diameter(float(np.exp(log_diameter)), canonical, shape), views


def trust(diameter: float | None, scale: float, canonical: float) -> float:
    """How far a look at ``scale`` that found nuclei of ``diameter`` (native px) is trusted over the finer view, 0-1."""
    if diameter is None:
        return 0.0
    low, high = COARSE_TRUST
    return float(np.clip((diameter * scale / canonical - low) / (high - low), 0.0, 1.0))


def coarse_estimate(look: Look, canonical: float, views: list[View]) -> tuple[float | None, float]:
    """(log median diameter read off the ``COARSE_SCALES`` looks, how far it is trusted over the native pass).

    Each coarser look is taken while the current one's nuclei are large at all, and its estimate
    replaces the finer look's in proportion to its own trust. Looks trusted at all are appended to
    ``views``; the others are dropped at once (peak memory: each is a map at the image's size).
    """
    logs: list[float | None] = []
    weights: list[float] = []
    for scale in COARSE_SCALES:
        view = look(scale)
        diameter = view.diameter()
        weights.append(trust(diameter, scale, canonical))
        logs.append(None if diameter is None else float(np.log(diameter)))
        if weights[-1] == 0.0:
            break
        views.append(view)
    estimate = logs[-1]
    for i in range(len(logs) - 2, -1, -1):  # from the coarsest look in
        estimate = logs[i] if weights[i + 1] == 0.0 else (1.0 - weights[i + 1]) * logs[i] + weights[i + 1] * estimate
    return estimate, weights[0]

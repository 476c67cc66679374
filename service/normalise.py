"""Intensity normalisation of an RGB image before the model: step two of the request path.

This is the single source of truth for pre-processing outside the network: training imports
these functions, and the exported model's ``metadata.json`` names the mode it was trained with,
so serving can never drift from training. Scaling to the network's input range (``/255`` or
``[-1, 1]``) lives inside the exported model itself.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

NormaliseMode = Literal["none", "percentile"]
#: Joint (all channels) percentiles that map to 0 and 255 in ``percentile`` mode.
STRETCH_PERCENTILES = (1.0, 99.8)


def normalise(image: np.ndarray, mode: NormaliseMode = "percentile") -> np.ndarray:
    """Return the ``uint8`` RGB image the model expects for ``mode``.

    ``none`` is the reference recipe (the model only divides by 255). ``percentile`` stretches
    each image between robust percentiles of all its channels together: dim fluorescence and
    over-exposed bright-field images then look alike to the model, while hue (which tells H&E
    haematoxylin from eosin) is kept because the channels share one stretch.
    """
    if mode == "none":
        return image
    if mode == "percentile":
        return percentile_stretch(image)
    raise ValueError(f"unknown normalisation mode {mode!r}")


def percentile_stretch(image: np.ndarray, percentiles: tuple[float, float] = STRETCH_PERCENTILES) -> np.ndarray:
    """Stretch ``image`` so its joint low/high percentiles become 0 and 255 (``uint8`` out)."""
    # A strided sample of whole pixels (all channels of each) keeps the percentile cheap on huge
    # images without changing it materially.
    pixels = image.reshape(-1, image.shape[-1] if image.ndim == 3 else 1)
    step = max(1, len(pixels) // 333_333)
    low, high = np.percentile(pixels[::step], percentiles)
    if high - low < 1.0:
        return image.astype(np.uint8, copy=False)
    lut = np.clip((np.arange(256, dtype=np.float32) - low) * (255.0 / (high - low)), 0, 255)
    return lut.round().astype(np.uint8)[image]

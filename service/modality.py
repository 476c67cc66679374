"""The imaging modality of an image, from its pixels: fluorescence, bright-field or stained tissue.

Training stratifies its split and balances its crops by it; the service picks the decoding
thresholds tuned for it (``postprocess_by_modality`` in a model's metadata), because H&E tissue,
with its dense, touching, dark nuclei, wants other thresholds than sparse fluorescence does.
"""

from __future__ import annotations

import numpy as np

MODALITIES = ("fluorescence", "brightfield", "histology")


def modality(image: np.ndarray) -> str:
    """Coarse modality of an RGB ``uint8`` image from its background and colour.

    Fluorescence has a dark background; bright-field and H&E a bright one, and H&E is coloured.
    """
    gray = image.mean(axis=-1)
    if np.median(gray) < 100:
        return "fluorescence"
    channels = image.reshape(-1, 3).astype(np.float32)
    saturation = (channels.max(1) - channels.min(1)) / np.maximum(channels.max(1), 1.0)
    return "histology" if float(saturation.mean()) > 0.12 else "brightfield"

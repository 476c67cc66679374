"""Resizing images and probability maps: the one resampler training and serving share.

Pillow's bilinear filter widens with the scale when shrinking (a triangle filter over the source
pixels each output pixel covers, as ``tf.image.resize(..., antialias=True)``), so a shrunk image
is not aliased, and it needs no TensorFlow. Training rescales its images to the canonical nucleus
size with this function and the service rescales uploads with it, so the model sees the same
pixels either way; the service also brings probability maps back to the image's size with it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def resize(array: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize ``(H, W[, C])`` to ``size = (height, width)``: bilinear, or ``nearest`` for label images.

    ``uint8`` images stay ``uint8`` (Pillow resamples them in fixed point, within 1 of the exact
    value); other dtypes are resampled channel by channel in float32 (labels, with ``nearest``,
    keep their values).
    """
    height, width = size
    if array.shape[:2] == (height, width):
        return array
    resample = Image.NEAREST if nearest else Image.BILINEAR
    if array.dtype == np.uint8 and (array.ndim == 2 or array.shape[2] in (3, 4)):
        return np.asarray(Image.fromarray(array).resize((width, height), resample))
    if array.ndim == 2:
        return _resize_plane(array, (width, height), resample, nearest)
    planes = [_resize_plane(array[..., c], (width, height), resample, nearest) for c in range(array.shape[2])]
    return np.stack(planes, axis=-1)


def _resize_plane(plane: np.ndarray, size_wh: tuple[int, int], resample: int, nearest: bool) -> np.ndarray:
    """One 2-D plane: labels (nearest) as int32, so no id is rounded; values as float32 (Pillow's mode F)."""
    if nearest and np.issubdtype(plane.dtype, np.integer):
        out = np.asarray(Image.fromarray(plane.astype(np.int32)).resize(size_wh, resample))
        return out.astype(plane.dtype, copy=False)
    out = np.asarray(Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32)).resize(size_wh, resample))
    return out if plane.dtype == np.float32 else out.astype(plane.dtype)

"""Sliding-window inference for images of any size, kept apart from the model (like StarDist's big.py).

The image is padded (reflection) to cover whole tiles, cut into overlapping square tiles, run in
batches of ``batch_size`` tiles, and the per-tile probabilities are blended with a smooth window
so tile seams vanish. Peak memory is the tile batch plus one probability map of the image,
never a whole-image forward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

PredictFn = Callable[[np.ndarray], np.ndarray]  # (N, T, T, 3) uint8 -> (N, T, T, C) float32
#: The network's input sides must be multiples of this (five stride-2 stages in the encoder).
GRID = 32
#: Default largest tile side: 0.75x the time of fixed 256-px tiles for a 1 MP image (docs/tiles.md).
DEFAULT_MAX_TILE = 512
#: Padding a very elongated image (1 x 50,000,000) to the network's ``GRID`` would
#: multiply its area; beyond this many padded pixels the image is refused instead.
MAX_PADDED_PIXELS = 64_000_000


def check_max_tile(side: int) -> int:
    """``side`` if it can be a largest tile side (on the network's grid, room for an overlap), else ValueError."""
    if side < 2 * GRID or side % GRID:
        raise ValueError(f"max_tile_size must be a multiple of {GRID} of at least {2 * GRID}, not {side}")
    return side


class ImageShapeError(ValueError):
    """The image cannot be tiled within the memory bound (e.g. absurdly elongated)."""


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering ``[0, length)`` with tiles of ``tile`` overlapping by >= ``overlap``."""
    if length <= tile:
        return [0]
    step = tile - overlap
    count = int(np.ceil((length - tile) / step)) + 1
    return [int(round(i * (length - tile) / (count - 1))) for i in range(count)]


def tile_side(length: int, max_tile: int, overlap: int, multiple: int = GRID) -> int:
    """Side of the tiles along one axis: the fewest tiles of at most ``max_tile`` that cover ``length``.

    Fixed tiles of the model's input size make the network process up to 2.4x an image's own pixels
    (a 300-pixel side needs two 256-pixel tiles, a 500-pixel side three); tiles sized to the image,
    overlapping by ``overlap`` and rounded up to the network's ``multiple``, waste only that margin.
    """
    if max_tile < _round_up(overlap + 1, multiple):
        raise ValueError(f"tiles of at most {max_tile} px cannot overlap by {overlap} px on a {multiple}-px grid")
    if length <= max_tile:
        return min(max_tile, _round_up(length, multiple))
    count = max(2, int(np.ceil((length - overlap) / (max_tile - overlap))))
    while True:
        side = _round_up(int(np.ceil((length + (count - 1) * overlap) / count)), multiple)
        if side <= max_tile:
            return side
        count += 1


def blend_ramp(length: int, overlap: int) -> np.ndarray:
    """1D weight: 1 in the middle, rising smoothly (cosine) from near 0 over ``overlap`` pixels at each end."""
    overlap = min(overlap, length // 2)
    ramp = np.ones(length, dtype=np.float32)
    if overlap > 0:
        edge = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, overlap + 2, dtype=np.float32)[1:-1])
        ramp[:overlap] = edge
        ramp[length - overlap:] = edge[::-1]
    return ramp


def predict_tiled(image: np.ndarray, predict: PredictFn, max_tile: int, overlap: int, batch_pixels: int,
                  num_classes: int, multiple: int = GRID) -> np.ndarray:
    """Class probabilities ``(H, W, C)`` of an ``(H, W, 3) uint8`` image, tile by tile.

    Tiles are sized to the image (:func:`tile_side`), at most ``max_tile`` on a side and never more
    than ``batch_pixels`` in all; each model call gets as many tiles as fit in ``batch_pixels``, so
    memory per call stays bounded whatever the tile size. Images smaller than a tile are padded
    (to a multiple of ``multiple``), never stretched.
    """
    max_tile = min(max_tile, max(multiple, int(np.sqrt(batch_pixels)) // multiple * multiple))
    height, width = image.shape[:2]
    tile_h = tile_side(height, max_tile, overlap, multiple)
    tile_w = tile_side(width, max_tile, overlap, multiple)
    ph, pw = max(height, tile_h), max(width, tile_w)
    if ph * pw > MAX_PADDED_PIXELS:
        raise ImageShapeError(
            f"image of {width}x{height} would need {ph * pw} pixels once padded to the network's "
            f"{multiple}-pixel grid (limit {MAX_PADDED_PIXELS}); crop or split it")
    padded = _pad_reflect(image, ph, pw)
    positions = [(t, l) for t in tile_starts(ph, tile_h, overlap) for l in tile_starts(pw, tile_w, overlap)]
    if len(positions) == 1:  # one tile covers the image: nothing to blend (the window would divide out)
        return predict(padded[None])[0][:height, :width]
    window = np.outer(blend_ramp(tile_h, overlap), blend_ramp(tile_w, overlap))
    total = np.zeros((ph, pw, num_classes), dtype=np.float32)
    weight = np.zeros((ph, pw), dtype=np.float32)
    batch_size = max(1, batch_pixels // (tile_h * tile_w))
    for start in range(0, len(positions), batch_size):
        chunk = positions[start:start + batch_size]
        batch = np.stack([padded[t:t + tile_h, l:l + tile_w] for t, l in chunk])
        probs = predict(batch)
        for (t, l), p in zip(chunk, probs):
            total[t:t + tile_h, l:l + tile_w] += p * window[..., None]
            weight[t:t + tile_h, l:l + tile_w] += window
    total /= np.maximum(weight, 1e-6)[..., None]
    return total[:height, :width]


def _round_up(value: int, multiple: int) -> int:
    return int(np.ceil(value / multiple) * multiple)


def _pad_reflect(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pad at the bottom/right by reflection (symmetric, so 1-pixel images work too)."""
    pad_h, pad_w = height - image.shape[0], width - image.shape[1]
    if pad_h <= 0 and pad_w <= 0:
        return image
    return np.pad(image, ((0, max(pad_h, 0)), (0, max(pad_w, 0)), (0, 0)), mode="symmetric")

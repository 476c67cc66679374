"""Sliding-window inference: tiles sized to the image, every pixel covered, seams blended away."""

from __future__ import annotations

import numpy as np
import pytest

from service.tiling import ImageShapeError, predict_tiled, tile_side, tile_starts


def coordinates_model(calls: list[tuple[int, ...]]):
    """A 'network' whose output is a smooth function of each pixel's value only, recording batch shapes.

    Tiling must then reproduce that function exactly, wherever the seams fall.
    """

    def predict(batch: np.ndarray) -> np.ndarray:
        calls.append(batch.shape)
        x = batch.astype(np.float32) / 255.0
        return np.stack([x[..., 0], 1.0 - x[..., 1], x[..., 2] ** 2], axis=-1)

    return predict


@pytest.mark.parametrize("height, width", [(1, 1), (37, 300), (256, 256), (300, 500), (1000, 1000), (1040, 1388)])
@pytest.mark.parametrize("max_tile", [256, 512])
def test_tiled_prediction_equals_the_pixelwise_function_everywhere(height: int, width: int, max_tile: int):
    rng = np.random.default_rng(height * width)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    calls: list[tuple[int, ...]] = []
    probs = predict_tiled(image, coordinates_model(calls), max_tile, 32, 8 * 256 * 256, 3)
    expected = coordinates_model([])(image[None])[0]
    assert probs.shape == (height, width, 3)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    for n, h, w, _ in calls:  # tiles within the limit, on the 32-pixel grid, batches within the pixel budget
        assert h <= max_tile and w <= max_tile and h % 32 == 0 and w % 32 == 0
        assert n * h * w <= 8 * 256 * 256


def test_no_tile_holds_more_pixels_than_one_model_call_may():
    calls: list[tuple[int, ...]] = []
    budget = 8 * 64 * 64  # a model trained on 64-px crops: at most 181 px a side
    predict_tiled(np.zeros((1000, 700, 3), np.uint8), coordinates_model(calls), 512, 32, budget, 3)
    assert all(n * h * w <= budget and h <= 160 and w <= 160 for n, h, w, _ in calls)


@pytest.mark.parametrize("length", [1, 31, 256, 300, 500, 1000, 1040, 1388, 4000, 5_000_000])
@pytest.mark.parametrize("max_tile, overlap", [(256, 32), (512, 32), (512, 64), (128, 16)])
def test_tiles_cover_the_length_with_the_overlap_and_the_fewest_tiles(length: int, max_tile: int, overlap: int):
    side = tile_side(length, max_tile, overlap)
    starts = tile_starts(max(length, side), side, overlap)
    assert side <= max_tile and side % 32 == 0
    assert starts[0] == 0 and starts[-1] + side >= length
    assert all(b - a <= side - overlap for a, b in zip(starts, starts[1:]))  # neighbours overlap enough
    # one tile fewer, even at the largest side allowed, would not cover the length
    fewer = len(starts) - 1
    assert fewer == 0 or fewer * max_tile - (fewer - 1) * overlap < length


def test_sized_tiles_compute_far_fewer_pixels_than_fixed_ones():
    def processed(max_tile: int, height: int, width: int, fixed: bool) -> int:
        calls: list[tuple[int, ...]] = []
        image = np.zeros((height, width, 3), np.uint8)
        multiple = max_tile if fixed else 32
        predict_tiled(image, coordinates_model(calls), max_tile, 32, 8 * 256 * 256, 3, multiple)
        return sum(n * h * w for n, h, w, _ in calls)

    for height, width in [(500, 500), (358, 358), (1000, 1000)]:
        sized, fixed = processed(512, height, width, False), processed(256, height, width, True)
        assert sized <= 1.35 * height * width < fixed  # fixed 256-px tiles: 1.6-2.4x the image's pixels


def test_a_fixed_size_network_gets_only_its_own_tile_size():
    calls: list[tuple[int, ...]] = []
    probs = predict_tiled(np.zeros((50, 300, 3), np.uint8), coordinates_model(calls), 128, 32, 8 * 128 * 128, 3, 128)
    assert probs.shape == (50, 300, 3) and {c[1:3] for c in calls} == {(128, 128)}


def test_overlap_too_large_for_the_tile_is_refused():
    with pytest.raises(ValueError, match="overlap"):
        tile_side(1000, 64, 64)


def test_absurdly_elongated_image_is_refused_before_any_work():
    calls: list[tuple[int, ...]] = []
    with pytest.raises(ImageShapeError):
        predict_tiled(np.zeros((1, 3_000_000, 3), np.uint8), coordinates_model(calls), 512, 32, 8 * 256 * 256, 3)
    assert not calls


def test_the_exported_tile_model_takes_any_tile_size(loaded_model):
    assert not loaded_model.fixed_input and loaded_model.tile_limits(512) == (512, 32)
    probs = loaded_model.predict_now(np.zeros((1, 96, 160, 3), np.uint8))
    assert probs.shape == (1, 96, 160, loaded_model.spec.num_classes)


@pytest.mark.parametrize("side", [32, 100, 500])
def test_a_tile_size_off_the_networks_grid_is_refused_up_front(side: int):
    from pydantic import ValidationError

    from service.config import Settings
    from service.pipeline import SegmentOptions

    with pytest.raises(ValidationError, match="max_tile_size"):
        Settings(max_tile_size=side)
    with pytest.raises(ValueError, match="max_tile_size"):
        SegmentOptions(max_tile_size=side)

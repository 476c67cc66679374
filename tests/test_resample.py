"""The shared resampler matches TensorFlow's antialiased bilinear resize, which the service used before."""

from __future__ import annotations

import numpy as np
import pytest

from service.resample import resize

CASES = [((100, 120, 3), (50, 60)), ((100, 120, 3), (230, 250)), ((97, 61, 3), (33, 200)), ((64, 64, 5), (17, 19))]


def tf_resize(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    tf = pytest.importorskip("tensorflow")
    shrinking = size[0] < array.shape[0] or size[1] < array.shape[1]
    return tf.image.resize(array[None].astype(np.float32), size, method="bilinear", antialias=shrinking)[0].numpy()


@pytest.mark.parametrize("shape,size", CASES)
def test_float_maps_match_tensorflow(shape, size):
    array = np.random.default_rng(0).random(shape).astype(np.float32)
    out = resize(array, size)
    assert out.dtype == np.float32 and out.shape == (*size, shape[2])
    np.testing.assert_allclose(out, tf_resize(array, size), atol=1e-5)


@pytest.mark.parametrize("shape,size", [c for c in CASES if c[0][2] == 3])
def test_uint8_images_are_within_one_grey_level_of_tensorflow(shape, size):
    image = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    out = resize(image, size)
    expected = np.clip(np.round(tf_resize(image, size)), 0, 255)
    assert out.dtype == np.uint8 and np.abs(out.astype(float) - expected).max() <= 1


def test_labels_keep_their_ids_with_nearest():
    labels = np.zeros((40, 40), np.int32)
    labels[5:20, 5:20], labels[22:38, 22:38] = 70_000, 3  # ids past 16 bits survive
    for size in ((20, 20), (100, 90)):
        out = resize(labels, size, nearest=True)
        assert out.dtype == np.int32 and set(np.unique(out)) == {0, 3, 70_000}


def test_same_size_is_returned_unchanged():
    image = np.zeros((8, 9, 3), np.uint8)
    assert resize(image, (8, 9)) is image

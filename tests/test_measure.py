"""The vectorised measurements are regionprops' numbers, nucleus for nucleus."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import regionprops

from service.encode import nuclei_records, rle_encode
from tests.synthetic import random_labels


def blobs(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Touching, irregular nuclei with gaps in the ids, and an intensity image."""
    rng = np.random.default_rng(seed)
    labels = random_labels(rng, (90, 110), count=14, radius=8).astype(np.int32)
    noise = rng.random(labels.shape) < 0.15
    labels[noise & (labels > 0)] = 0  # ragged outlines, holes
    labels[labels == 3] = 0  # a gap in the ids
    labels[0:4, 0:6] = 40  # a nucleus cut by the image border
    labels[50, 60:70] = 41  # one pixel thick
    labels[10, 100] = 42  # a single pixel
    return labels, rng.integers(0, 256, (*labels.shape, 3)).astype(np.uint8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_records_equal_regionprops(seed: int):
    labels, image = blobs(seed)
    gray = image.mean(axis=-1)
    records = nuclei_records(labels, image)
    regions = regionprops(labels, intensity_image=gray)
    assert [r["id"] for r in records] == [region.label for region in regions]
    for record, region in zip(records, regions):
        assert record["area"] == region.area
        assert record["bbox"] == list(region.bbox)
        assert record["centroid"] == [round(float(v), 2) for v in region.centroid]
        assert record["perimeter"] == round(float(region.perimeter), 2)
        assert record["eccentricity"] == pytest.approx(round(float(region.eccentricity), 4), abs=1e-4)
        assert record["solidity"] == round(float(region.solidity), 4)
        assert record["mean_intensity"] == round(float(region.intensity_mean), 2)
        assert record["rle"] == rle_encode(labels == region.label)


def test_no_nuclei_no_records():
    assert nuclei_records(np.zeros((5, 7), np.int32)) == []

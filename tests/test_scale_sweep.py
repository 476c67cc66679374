"""The scale sweep: images resized as if taken at other magnifications, automatic vs given size."""

from __future__ import annotations

import json

import numpy as np
from scipy import ndimage as ndi

from tests.test_pipeline import DiskModel, disks
from training.data import NucleiDataset, Sample
from training.scale_sweep import sweep, sweep_subset, sweep_table


def disk_sample(sample_id: str, diameter: int) -> Sample:
    image = disks(diameter, 3)
    labels, _ = ndi.label(image[..., 0] > 127)
    return Sample(sample_id, image, labels.astype(np.int32))


def test_sweep_scores_each_factor_with_and_without_the_diameter():
    dataset = NucleiDataset([disk_sample("a", 20), disk_sample("b", 16)])
    points = sweep(DiskModel(), dataset, factors=(0.5, 1.0, 3.0))
    assert len(points) == 6 and {p.factor for p in points} == {0.5, 1.0, 3.0}
    for p in points:
        assert 0.0 <= p.auto <= 1.0 and 0.0 <= p.given <= 1.0
        if p.factor >= 1.0:  # the stand-in network is exact at its canonical size (halved disks lose edge pixels)
            assert p.given > 0.9
    at3 = [p for p in points if p.factor == 3.0]
    assert all(abs(p.diameter - 3 * d) < 3 for p, d in zip(at3, (20, 16)))
    assert all(p.auto_scale <= 0.5 for p in at3)  # the automatic size shrank the large nuclei too
    table = sweep_table(points)
    assert "3x" in table and "automatic - given" in table
    json.dumps([p.__dict__ for p in points])


def test_subset_is_seeded_and_skips_images_too_large_to_upscale():
    big = Sample("big", np.zeros((600, 600, 3), np.uint8), np.ones((600, 600), np.int32))
    dataset = NucleiDataset([big] + [disk_sample(f"s{i}", 20) for i in range(6)])
    chosen = sweep_subset(dataset, 3, seed=1)
    assert "big" not in chosen.ids and len(chosen) == 3
    assert chosen.ids == sweep_subset(dataset, 3, seed=1).ids

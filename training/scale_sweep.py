"""Scale sweep: does the automatic nucleus size hold when the same images come at other magnifications?

    python -m training.scale_sweep --model models/default --data ../shared/data/dsb2018/stage1_train \\
        --out docs/scale_sweep.json

Validation images (and their labels, nearest-neighbour) are resized by each factor, as if taken
with another objective, and segmented through ``service.pipeline.segment`` twice: with the
automatic size estimate, and with ``diameter`` given (the true median nucleus diameter of the
resized labels, what a user who knows the magnification would pass). A size step that works
scores about the same at every factor, and automatic about the same as given.

Upscaling multiplies the cost by the factor squared (x4: 16 times the pixels), so the sweep
takes a seeded, modality-stratified subset of the validation images small enough to upscale.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.model import ModelLoadError, SegmentationModel
from service.pipeline import SegmentOptions, segment
from service.postprocess import median_diameter
from training.data import DataError, NucleiDataset, resize_image
from training.evaluate import DataSpec, as_sources, markdown_table, split_samples
from training.export import write_text_atomic
from training.matching import score_image
from training.split import modality, split_ids

FACTORS = (0.5, 1.0, 2.0, 3.0, 4.0)
#: Images of at most this many pixels take part (a 4x copy of one is then at most 4.8 MP).
MAX_PIXELS = 300_000


@dataclass(frozen=True)
class SweepPoint:
    """One image at one factor: DSB2018 scores with the automatic size and with the given diameter."""

    id: str
    modality: str
    factor: float
    diameter: float  # true median nucleus diameter at this factor (px)
    auto: float
    given: float
    auto_scale: float  # scale the automatic estimate chose


def sweep_subset(dataset: NucleiDataset, count: int, seed: int) -> NucleiDataset:
    """A seeded subset of about ``count`` images under ``MAX_PIXELS``, stratified by modality."""
    small = [s for s in dataset.samples if s.image.shape[0] * s.image.shape[1] <= MAX_PIXELS and s.labels.max() > 0]
    if not small:
        raise DataError(f"no validation image of at most {MAX_PIXELS} pixels with nuclei to sweep")
    ids, groups = [s.id for s in small], [modality(s.image) for s in small]
    if count >= len(small):
        return dataset.subset(sorted(ids))
    _, chosen = split_ids(ids, groups, count / len(small), seed)
    return dataset.subset(chosen)


def sweep(model: SegmentationModel, dataset: NucleiDataset, factors: tuple[float, ...] = FACTORS) -> list[SweepPoint]:
    """Score every image of ``dataset`` at every factor, automatic and given size."""
    points = []
    for sample in dataset.samples:
        for factor in factors:
            size = (max(1, round(sample.image.shape[0] * factor)), max(1, round(sample.image.shape[1] * factor)))
            image = resize_image(sample.image, size)
            truth = resize_image(sample.labels, size, nearest=True)
            diameter = median_diameter(truth)
            auto = segment(image, model)
            given = segment(image, model, SegmentOptions(diameter=diameter))
            points.append(SweepPoint(sample.id, modality(sample.image), factor, round(diameter, 2),
                                     score_image(truth, auto.labels).score, score_image(truth, given.labels).score,
                                     round(auto.scale, 3)))
    return points


def sweep_table(points: list[SweepPoint]) -> str:
    """Mean DSB2018 score per factor, automatic vs given, and the automatic scale's median."""
    rows = []
    for factor in sorted({p.factor for p in points}):
        at = [p for p in points if p.factor == factor]
        auto, given = np.mean([p.auto for p in at]), np.mean([p.given for p in at])
        rows.append({"factor": f"{factor:g}x", "images": len(at),
                     "median nucleus diameter (px)": f"{np.median([p.diameter for p in at]):.1f}",
                     "DSB2018, automatic size": f"{auto:.3f}", "DSB2018, diameter given": f"{given:.3f}",
                     "automatic - given": f"{auto - given:+.3f}",
                     "median scale chosen": f"{np.median([p.auto_scale for p in at]):.3f}"})
    return markdown_table(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="exported model folder")
    parser.add_argument("--data", action="append", required=True, metavar="[NAME=]PATH",
                        help="the model's training data (its validation split is swept)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file of every point (a .md table beside it)")
    parser.add_argument("--images", type=int, default=30, help="validation images to sweep (seeded, stratified)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        model = SegmentationModel.load(args.model)
        data: list[DataSpec] = as_sources(args.data)
        subset = sweep_subset(split_samples(model, data, "validation"), args.images, args.seed)
    except (DataError, ModelLoadError) as error:
        sys.exit(f"error: {error}")
    started = time.time()
    points = sweep(model, subset)
    table = sweep_table(points)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps({"model": str(args.model), "factors": list(FACTORS),
                                            "seconds": round(time.time() - started, 1),
                                            "points": [p.__dict__ for p in points]}, indent=1))
    write_text_atomic(args.out.with_suffix(".md"), table + "\n")
    print(table)


if __name__ == "__main__":
    main()

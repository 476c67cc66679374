"""Exploratory figure of a DSB2018 folder: images on top, their merged masks below.

    python -m training.eda --data ../shared/data/dsb2018/stage1_train --out docs/eda.png

Also prints a short summary: image count, sizes, nuclei per image, nucleus sizes, modalities.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np

from service.postprocess import median_diameter
from training.data import NucleiDataset, load_dataset
from training.figures import image_grid
from training.split import modality


def summary(dataset: NucleiDataset) -> str:
    """Human-readable statistics of the data set."""
    sizes = Counter(f"{s.image.shape[1]}x{s.image.shape[0]}" for s in dataset.samples)
    counts = np.array([int(s.labels.max()) for s in dataset.samples])
    diameters = np.array([d for s in dataset.samples if (d := median_diameter(s.labels)) is not None])
    modalities = Counter(modality(s.image) for s in dataset.samples)
    lines = [
        f"images: {len(dataset)}, nuclei: {counts.sum()}",
        "sizes (WxH, most common): " + ", ".join(f"{k} ({v})" for k, v in sizes.most_common(6)),
        f"nuclei per image: min {counts.min()}, median {np.median(counts):.0f}, max {counts.max()}",
        f"median nucleus diameter per image (px): min {diameters.min():.1f}, "
        f"median {np.median(diameters):.1f}, max {diameters.max():.1f}",
        "modalities: " + ", ".join(f"{k} {v}" for k, v in modalities.most_common()),
    ]
    return "\n".join(lines)


def inspect_figure(dataset: NucleiDataset, path: Path, count: int = 6, seed: int = 0) -> Path:
    """The reference's Inspect_Image_Mask figure: top row images, bottom row masks."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(dataset), size=min(count, len(dataset)), replace=False)
    samples = [dataset.samples[i] for i in picks]
    return image_grid([[s.image for s in samples], [s.mask for s in samples]], ["image", "mask"], path,
                      col_titles=[s.id[:10] for s in samples])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="DSB2018 folder in Kaggle layout")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--count", type=int, default=6, help="images in the figure")
    args = parser.parse_args(argv)
    dataset = load_dataset(args.data)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    inspect_figure(dataset, args.out, args.count)
    print(summary(dataset))
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()

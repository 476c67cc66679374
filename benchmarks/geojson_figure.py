"""The README's GeoJSON figure: what QuPath draws from ``format=geojson``, drawn from the answer itself.

    python -m benchmarks.geojson_figure --image IMAGE --out docs/figures/geojson_overlay.png

The image goes through the real app (``POST /segment?format=geojson``, in-process, shipped model);
the polygons are plotted from the returned GeoJSON over the image, one colour per nucleus, so
the figure shows the file a user imports, not the label image it came from. Without ``--image``
it takes the first DSB2018 stage1_train H&E-like image there is (needs ``../shared``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from benchmarks.harness import SHARED
from service.app import create_app
from service.config import Settings
from service.decode import decode_image
from service.model import SegmentationModel


def default_image() -> Path:
    """A colourful (stained) DSB2018 image: the case QuPath users bring."""
    for folder in sorted(SHARED.iterdir()):
        path = folder / "images" / f"{folder.name}.png"
        image = decode_image(path.read_bytes())
        if np.ptp(image.reshape(-1, 3).mean(axis=0)) > 30:  # the channels differ: not a gray image
            return path
    raise SystemExit(f"no stained image in {SHARED}; pass --image")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/figures/geojson_overlay.png"))
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = args.image or default_image()
    settings = Settings()
    with TestClient(create_app(settings, SegmentationModel.load(settings.model_dir))) as http:
        response = http.post("/segment", params={"format": "geojson"}, files={"file": (path.name, path.read_bytes())})
    response.raise_for_status()
    features = response.json()["features"]
    image = decode_image(path.read_bytes())
    height, width = image.shape[:2]
    figure, axis = plt.subplots(figsize=(8, 8 * height / width), dpi=120)
    axis.imshow(image, extent=(0, width, height, 0))  # pixel (row, col) covers x in [col, col + 1)
    colours = plt.cm.hsv((np.arange(len(features)) * 0.618) % 1.0)
    for feature, colour in zip(features, colours):
        ring = np.asarray(feature["geometry"]["coordinates"][0])
        axis.plot(ring[:, 0], ring[:, 1], color=colour, linewidth=1.0)
    axis.set_title(f"format=geojson: {len(features)} polygons ({path.parent.parent.name[:12]}...)", fontsize=10)
    axis.set_axis_off()
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out)
    print(f"{args.out}: {len(features)} polygons from {path}")


if __name__ == "__main__":
    main()

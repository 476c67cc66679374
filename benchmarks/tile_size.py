"""Tile size against time: ``segment()`` with fixed 256-px tiles (the model's input; the previous rule)
and with tiles sized to the image up to 256, 512 and 704 px (the most the pixel budget allows).

    python -m benchmarks.tile_size --out docs/tiles.md

Tiles of a fixed 256 px make the network process 1.6-2.4x an image's own pixels in their overlaps
and padding (a 300-pixel side needs two of them, a 500-pixel side three). Tiles sized to the image
up to ``max_tile_size`` waste only the overlap, but each call then holds fewer, larger tiles; this
measures both effects in one run, on the same images, with the settings interleaved so the
machine's drift hits them alike: the network alone per megapixel at each tile side, and whole
requests (real 256x256 DSB2018 images, and 0.25 / 1 / 4 MP images made from one) per setting.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from benchmarks.harness import ROOT, big_image, real_images
from benchmarks.serve_bench import RecordingModel, loaded_model
from training.export import write_text_atomic

TILE_SIDES = (256, 512, 704)  # 704: the largest side within the default budget of 8 tiles of 256 px
#: (label, max tile side, tiles sized to the image); the first is the rule before tiles were sized
SETTINGS = (("fixed 256", 256, False), *((f"sized <= {s}", s, True) for s in TILE_SIDES))


@contextlib.contextmanager
def tile_rule(sized: bool) -> Iterator[None]:
    """Within the block, tiles are sized to the image (the service's rule) or, if not ``sized``, the
    previous rule: always the largest side allowed, unless the image is smaller."""
    from service import tiling

    rule = tiling.tile_side
    if not sized:
        tiling.tile_side = lambda length, max_tile, overlap, multiple=tiling.GRID: min(
            max_tile, tiling._round_up(length, multiple))
    try:
        yield
    finally:
        tiling.tile_side = rule


def network_seconds_per_mp(model, sides=TILE_SIDES, repeats: int = 5) -> dict[int, tuple[int, float, float]]:  # noqa: ANN001
    """The network alone, for tiles of each side, as many per call as the default budget allows:
    (tiles per call, seconds per megapixel of the shape's first call, median of the later ones).

    TensorFlow sets each new input shape up on its first call, and sized tiles bring more shapes
    than fixed ones, so that first call is reported too. Sides are offset by 32 px so no shape was
    seen before (the model was warmed on its own input size).
    """
    from service.pipeline import SegmentOptions

    budget = SegmentOptions.tile_batch_size * model.spec.tile_pixels
    rng = np.random.default_rng(0)
    result = {}
    for side in sides:
        count = max(1, budget // side**2)
        batch = rng.integers(0, 255, (count, side, side + 32, 3), dtype=np.uint8)
        megapixels = batch.size / 3 / 1e6
        start = time.perf_counter()
        model.predict_now(batch)
        first = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.predict_now(batch)
            times.append(time.perf_counter() - start)
        result[side] = count, first / megapixels, statistics.median(times) / megapixels
    return result


def request_costs(model, images: list[np.ndarray], repeats: int = 3) -> dict[str, tuple[float, float]]:  # noqa: ANN001
    """Per setting: (median seconds for the images, network pixels / image pixels), settings interleaved."""
    from service.pipeline import SegmentOptions, segment

    recorder = RecordingModel(model)
    seconds: dict[str, list[float]] = {label: [] for label, _, _ in SETTINGS}
    pixels: dict[str, int] = {}
    try:
        for label, side, sized in SETTINGS * (repeats + 1):  # the first round sets every tile shape up, untimed
            with tile_rule(sized):
                recorder.reset()
                start = time.perf_counter()
                for image in images:
                    segment(image, model, SegmentOptions(max_tile_size=side))
                seconds[label].append(time.perf_counter() - start)
            pixels[label] = sum(n * h * w for n, h, w, _ in recorder.calls)
    finally:
        recorder.restore()
    own = sum(image.shape[0] * image.shape[1] for image in images)
    return {label: (statistics.median(times[1:]), pixels[label] / own) for label, times in seconds.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "tiles.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from service.config import Settings

    model = loaded_model(args.model_dir, Settings().runtime_options())  # the service's runtime and threads
    small, source = real_images(16)
    sets = {"16 images of 256x256": small, **{f"{mp:g} MP": [big_image(small[0], mp)] for mp in (0.25, 1, 4)}}

    lines = ["# Tile size\n",
             f"Command: `python -m benchmarks.tile_size {' '.join(argv or sys.argv[1:])}` on {os.cpu_count()} CPUs, "
             f"{time.strftime('%Y-%m-%d %H:%M')}. Model `{args.model_dir.name}` (input tiles of "
             f"{model.spec.image_size} px in training). Inputs: {source}; the larger images tile the first one.\n",
             "## The network alone\n",
             "Seconds per megapixel of tiles (side x side+32 px), each call holding as many tiles as the default "
             "budget allows (`NUCLEI_TILE_BATCH_SIZE` tiles of the model's input size): the shape's first call, "
             "and the median of the 5 after it:\n",
             "| tile side | tiles per call | s per MP, first call | s per MP |", "|---|---|---|---|"]
    for side, (count, first, seconds) in network_seconds_per_mp(model).items():
        lines.append(f"| {side} | {count} | {first:.3f} | {seconds:.3f} |")
    labels = [label for label, _, _ in SETTINGS]
    lines += ["", "## Whole requests (`segment()`, in-process)\n",
              "Seconds: median of 3 interleaved repeats over the images. Network pixels: what the network "
              "processed over the images' own pixels (all passes of the size normalisation together). Ratios: "
              "time against fixed 256-px tiles, in the same run.\n",
              "| images | " + " | ".join(f"{label}: s, network px" for label in labels)
              + " | " + " | ".join(f"{label} / fixed" for label in labels[1:]) + " |",
              "|---|" + "---|" * (2 * len(labels) - 1)]
    for name, images in sets.items():
        costs = request_costs(model, images)
        base = costs[labels[0]][0]
        cells = " | ".join(f"{costs[label][0]:.2f} s, {costs[label][1]:.2f}x" for label in labels)
        ratios = " | ".join(f"{costs[label][0] / base:.2f}" for label in labels[1:])
        lines.append(f"| {name} | {cells} | {ratios} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    write_text_atomic(args.out, text)
    print(text)


if __name__ == "__main__":
    main()

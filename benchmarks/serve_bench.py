"""Benchmark the real server against the model alone, in the same run.

    python -m benchmarks.serve_bench --out docs/performance.md

Starts ``nuclei-serve`` on loopback, drives it with N concurrent clients sending real DSB2018
images (from ../shared when present, else generated), then measures in-process the model alone:
the very network calls ``segment()`` makes for those images, recorded and replayed one image at
a time (latency) and batched at the best batch size (throughput). Reports throughput and latency per concurrency, the
service/model ratio, seconds per megapixel and peak RSS per image size, cold start, and where the
time of one request goes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import ROOT, Server, big_image, drive, pct, png_bytes, real_images

# ---------------------------------------------------------------- in-process
def loaded_model(model_dir: Path):  # noqa: ANN201 (SegmentationModel; TensorFlow is imported lazily)
    """The model, loaded and warmed once for every in-process measurement."""
    from service.model import SegmentationModel

    model = SegmentationModel.load(model_dir)
    model.warm()
    return model


def model_alone(model, tile: int, batch_sizes=(1, 2, 4, 8, 16), repeats: int = 5) -> dict[int, float]:  # noqa: ANN001
    """Seconds per tile of the network alone, per batch size (median of ``repeats`` calls)."""
    rng = np.random.default_rng(0)
    result = {}
    for b in batch_sizes:
        batch = rng.integers(0, 255, (b, tile, tile, 3), dtype=np.uint8)
        model.predict_now(batch)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.predict_now(batch)
            times.append(time.perf_counter() - start)
        result[b] = statistics.median(times) / b
    return result


class RecordingModel:
    """Wraps a loaded model's network call to record each call's batch shape and time (until ``restore``)."""

    def __init__(self, model) -> None:  # noqa: ANN001 (SegmentationModel; imported lazily)
        self.model = model
        self.network = model.predict_now
        self.calls: list[tuple[int, ...]] = []
        self.seconds = 0.0
        model.predict_now = self

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        out = self.network(batch)
        self.seconds += time.perf_counter() - start
        self.calls.append(batch.shape)
        return out

    def reset(self) -> None:
        self.calls, self.seconds = [], 0.0

    def restore(self) -> None:
        """Give the model back its own network call."""
        del self.model.predict_now  # the instance attribute goes; the class's method shows again


def profile_requests(model, images: list[np.ndarray], repeats: int = 3) -> tuple[list[dict], list[list]]:  # noqa: ANN001
    """Median seconds of each step of the request path per image, in-process, and its model calls.

    The network's share of ``segment`` is timed inside it, so "post-process and resizing" is the
    rest of the pipeline: normalisation, resizing between scales, blending tiles, watershed.
    """
    from service.decode import decode_image
    from service.encode import mask_png
    from service.pipeline import SegmentOptions, segment

    recorder = RecordingModel(model)
    profiles, calls = [], []
    try:
        for image in images:
            data = png_bytes(image)
            steps: dict[str, list[float]] = {k: [] for k in PROFILE_STEPS}
            for _ in range(repeats):
                recorder.reset()
                t0 = time.perf_counter()
                rgb = decode_image(data)
                t1 = time.perf_counter()
                labels = segment(rgb, model, SegmentOptions()).labels
                t2 = time.perf_counter()
                mask_png(labels)  # the benchmark's requests ask for the default format, the PNG mask
                t3 = time.perf_counter()
                for key, value in zip(PROFILE_STEPS, (t1 - t0, recorder.seconds, t2 - t1 - recorder.seconds, t3 - t2)):
                    steps[key].append(value)
            profiles.append({k: statistics.median(v) for k, v in steps.items()})
            calls.append(list(recorder.calls))
    finally:
        recorder.restore()
    return profiles, calls


PROFILE_STEPS = ("decode", "network (model calls)", "normalise, resize, blend, post-process", "encode (PNG mask)")


def replay_latency(model, calls: list[list[tuple[int, ...]]], repeats: int = 3) -> list[float]:  # noqa: ANN001
    """Model alone for one request at a time: per image, the network calls ``segment`` made, replayed."""
    rng = np.random.default_rng(0)
    seconds = []
    for shapes in calls:
        inputs = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in shapes]
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            for batch in inputs:
                model.predict_now(batch)
            runs.append(time.perf_counter() - start)
        seconds.append(statistics.median(runs))
    return seconds


def replay_batched(model, calls: list[list[tuple[int, ...]]], batch: int) -> float:  # noqa: ANN001
    """Model alone at its best: seconds per image when all images' tiles run in batches of ``batch``."""
    by_shape: dict[tuple[int, ...], int] = {}
    for shapes in calls:
        for shape in shapes:
            by_shape[shape[1:]] = by_shape.get(shape[1:], 0) + shape[0]
    rng = np.random.default_rng(0)
    total = 0.0
    for shape, count in by_shape.items():
        full = rng.integers(0, 255, (batch, *shape), dtype=np.uint8)
        model.predict_now(full)  # the shape's first call traces
        start = time.perf_counter()
        for done in range(0, count, batch):
            model.predict_now(full[:min(batch, count - done)])
        total += time.perf_counter() - start
    return total / len(calls)


def profile_table(profiles: list[dict], http_mean: float | None = None) -> list[str]:
    """Markdown rows: mean seconds per step over images (means add up), with shares of the total."""
    steps = {k: statistics.fmean(p[k] for p in profiles) for k in PROFILE_STEPS}
    if http_mean is not None:
        steps["HTTP: multipart, thread hand-offs, batcher, response, client"] = http_mean - sum(steps.values())
    total = sum(steps.values())
    rows = ["| step | ms | share |", "|---|---|---|"]
    rows += [f"| {step} | {seconds * 1000:.1f} | {seconds / total:.0%} |" for step, seconds in steps.items()]
    return rows + [""]


#: Hand-written notes after this line in the output file survive a rerun (they discuss the numbers).
NOTES_MARKER = "<!-- notes: kept by serve_bench -->"


def kept_notes(path: Path) -> str:
    """The notes section of an existing report (from :data:`NOTES_MARKER` on), else just the marker."""
    text = path.read_text() if path.is_file() else ""
    return text[text.index(NOTES_MARKER):] if NOTES_MARKER in text else f"\n{NOTES_MARKER}\n"


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--sizes", default="0.25,1,4,16", help="megapixels for the size sweep")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per size (median)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    images, source = real_images(16)
    payloads = [png_bytes(im) for im in images]
    lines = [f"# Serving performance\n",
             f"Command: `python -m benchmarks.serve_bench {' '.join(argv or sys.argv[1:])}` "
             f"on {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}. Model `{args.model_dir.name}`. "
             f"Inputs: {source}.\n"]

    server = Server({"NUCLEI_MODEL_DIR": str(args.model_dir)})
    cold = [server.cold_start]
    try:
        drive(server.url, payloads, 2, 8)  # warm the server's shapes
        rows = []
        for c in [int(x) for x in args.concurrency.split(",")]:
            latencies, wall, errors = drive(server.url, payloads, c, args.requests)
            rows.append((c, len(latencies) / wall, pct(latencies, 50), pct(latencies, 95), pct(latencies, 99),
                         errors, server.mean_batch(), statistics.fmean(latencies)))
    finally:
        server.stop()

    model = loaded_model(args.model_dir)
    tile = model.spec.image_size
    per_tile = model_alone(model, tile)
    best_batch = min(per_tile, key=per_tile.get)
    profiles, calls = profile_requests(model, images)
    alone_latency_1 = statistics.median(replay_latency(model, calls))
    alone_images_per_s = 1.0 / replay_batched(model, calls, best_batch)
    tiles_per_image = sum(shape[0] * shape[1] * shape[2] for c in calls for shape in c) / tile**2 / len(calls)

    lines.append("## Throughput and latency (256x256 images)\n")
    lines.append(f"Model alone, in-process: the network calls that `segment()` makes for these images "
                 f"(recorded, {tiles_per_image:.2f} tile-equivalents of {tile}x{tile} per image), replayed "
                 f"without the service. One image at a time: median {alone_latency_1 * 1000:.0f} ms per image; "
                 f"all tiles in batches of {best_batch} (its best batch size): {alone_images_per_s:.1f} images/s. "
                 f"Seconds per {tile}x{tile} tile by batch size: "
                 + ", ".join(f"{b}: {t * 1000:.1f} ms" for b, t in per_tile.items()) + ".\n")
    lines.append("| concurrency | images/s | MP/s | p50 ms | p95 ms | p99 ms | errors | mean tiles per model call | service / model-alone |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    mp = images[0].shape[0] * images[0].shape[1] / 1e6
    for c, ips, p50, p95, p99, errors, mean_batch, _ in rows:
        lines.append(f"| {c} | {ips:.1f} | {ips * mp:.2f} | {p50 * 1000:.0f} | {p95 * 1000:.0f} | {p99 * 1000:.0f} | "
                     f"{errors} | {mean_batch:.1f} | {ips / alone_images_per_s:.2f} |")
    c1 = rows[0]
    lines.append(f"\nAt concurrency 1, p50 latency {c1[2] * 1000:.0f} ms vs model alone {alone_latency_1 * 1000:.0f} ms "
                 f"per image: ratio {(c1[2]) / (alone_latency_1 + 0.010):.2f} of (model alone + 10 ms).\n")
    lines.append(f"Where the time of one {images[0].shape[1]}x{images[0].shape[0]} request goes (in-process, "
                 f"mean over the {len(images)} images; the HTTP row is the mean latency at concurrency 1, "
                 f"{c1[7] * 1000:.0f} ms, minus the steps above it):\n")
    lines.extend(profile_table(profiles, http_mean=c1[7]))

    lines.append("## Cost by image size\n")
    lines.append("| megapixels | seconds (median) | seconds per MP | peak server RSS (MB) |")
    lines.append("|---|---|---|---|")
    per_mp = {}
    for size in [float(x) for x in args.sizes.split(",")]:
        data = png_bytes(big_image(images[0], size))
        server = Server({"NUCLEI_MODEL_DIR": str(args.model_dir), "NUCLEI_MAX_UPLOAD_BYTES": str(200 * 2**20)})
        cold.append(server.cold_start)
        try:
            latencies, _, errors = drive(server.url, [data], 1, args.repeats)
            rss = server.peak_rss_mb()
        finally:
            server.stop()
        real_mp = int(round((size * 1e6) ** 0.5)) ** 2 / 1e6
        per_mp[size] = statistics.median(latencies) / real_mp
        lines.append(f"| {real_mp:.2f} | {statistics.median(latencies):.2f} | {per_mp[size]:.2f} | {rss:.0f} |")
    if 1.0 in per_mp and 16.0 in per_mp:
        lines.append(f"\nSeconds per MP at 16 MP / at 1 MP: {per_mp[16.0] / per_mp[1.0]:.2f}.\n")

    lines.append("## Cold start\n")
    lines.append(f"Process start to `/readyz` 200: median {statistics.median(cold):.1f} s over {len(cold)} starts "
                 f"(min {min(cold):.1f}, max {max(cold):.1f}).\n")

    lines.append("## Where the time of one request goes (1 MP image, in-process)\n")
    profiles, _ = profile_requests(model, [big_image(images[0], 1.0)])
    lines.extend(profile_table(profiles))
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + kept_notes(args.out))
    print(text)


if __name__ == "__main__":
    main()

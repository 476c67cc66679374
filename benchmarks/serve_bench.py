"""Benchmark the real server against the model alone, in the same run.

    python -m benchmarks.serve_bench --out docs/performance.md

Starts ``nuclei-serve`` on loopback, drives it with N concurrent clients sending real DSB2018
images (from ../shared when present, else generated), then measures in-process the model alone
on the same tiles at its best batch size. Reports throughput and latency per concurrency, the
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
def model_alone(model_dir: Path, tile: int, batch_sizes=(1, 2, 4, 8, 16), repeats: int = 5) -> dict[int, float]:
    """Seconds per tile of the network alone, per batch size (median of ``repeats`` calls)."""
    from service.model import SegmentationModel

    model = SegmentationModel.load(model_dir)
    model.warm()
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


def profile_request(model_dir: Path, image: np.ndarray, repeats: int = 3) -> dict[str, float]:
    """Median seconds of each step of the request path for one image, in-process."""
    from service.decode import decode_image
    from service.encode import rle_document
    from service.model import SegmentationModel
    from service.normalise import normalise
    from service.pipeline import SegmentOptions, segment

    model = SegmentationModel.load(model_dir)
    model.warm()
    data = png_bytes(image)
    steps: dict[str, list[float]] = {k: [] for k in ("decode", "normalise", "segment (model + post-process)",
                                                     "encode (rle+measurements)")}
    for _ in range(repeats):
        t0 = time.perf_counter()
        rgb = decode_image(data)
        t1 = time.perf_counter()
        normalise(rgb, model.spec.normalise)
        t2 = time.perf_counter()
        labels = segment(rgb, model, SegmentOptions()).labels
        t3 = time.perf_counter()
        rle_document(labels, rgb)
        t4 = time.perf_counter()
        for key, value in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            steps[key].append(value)
    return {k: statistics.median(v) for k, v in steps.items()}


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
        tiles_before = server.tiles_done()
        total_images = 0
        for c in [int(x) for x in args.concurrency.split(",")]:
            latencies, wall, errors = drive(server.url, payloads, c, args.requests)
            total_images += len(latencies)
            rows.append((c, len(latencies) / wall, pct(latencies, 50), pct(latencies, 95), pct(latencies, 99),
                         errors, server.mean_batch()))
        tiles_per_image = (server.tiles_done() - tiles_before) / max(total_images, 1)
    finally:
        server.stop()

    from service.model import SegmentationModel

    tile = SegmentationModel.load(args.model_dir).spec.image_size
    per_tile = model_alone(args.model_dir, tile)
    best_batch = min(per_tile, key=per_tile.get)
    alone_images_per_s = 1.0 / (per_tile[best_batch] * tiles_per_image)
    alone_latency_1 = per_tile[1] * tiles_per_image

    lines.append("## Throughput and latency (256x256 images)\n")
    lines.append(f"Model alone, in-process, same tiles ({tiles_per_image:.2f} tiles of {tile}x{tile} per image, "
                 f"counted by the server): best batch {best_batch} -> {alone_images_per_s:.1f} images/s; "
                 f"batch 1 -> {alone_latency_1 * 1000:.0f} ms per image. Seconds per tile by batch size: "
                 + ", ".join(f"{b}: {t * 1000:.1f} ms" for b, t in per_tile.items()) + ".\n")
    lines.append("| concurrency | images/s | MP/s | p50 ms | p95 ms | p99 ms | errors | mean tiles per model call | service / model-alone |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    mp = images[0].shape[0] * images[0].shape[1] / 1e6
    for c, ips, p50, p95, p99, errors, mean_batch in rows:
        lines.append(f"| {c} | {ips:.1f} | {ips * mp:.2f} | {p50 * 1000:.0f} | {p95 * 1000:.0f} | {p99 * 1000:.0f} | "
                     f"{errors} | {mean_batch:.1f} | {ips / alone_images_per_s:.2f} |")
    c1 = rows[0]
    lines.append(f"\nAt concurrency 1, p50 latency {c1[2] * 1000:.0f} ms vs model alone {alone_latency_1 * 1000:.0f} ms "
                 f"per image: ratio {(c1[2]) / (alone_latency_1 + 0.010):.2f} of (model alone + 10 ms).\n")

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
    profile = profile_request(args.model_dir, big_image(images[0], 1.0))
    total = sum(profile.values())
    lines.append("| step | seconds | share |")
    lines.append("|---|---|---|")
    for step, seconds in profile.items():
        lines.append(f"| {step} | {seconds:.3f} | {seconds / total:.0%} |")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

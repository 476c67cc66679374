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
import io
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "dsb2018" / "stage1_train"


# ---------------------------------------------------------------- inputs
def real_images(count: int, size: int = 256) -> tuple[list[np.ndarray], str]:
    """``count`` real DSB2018 images of ``size`` squared (fluorescence mostly), else generated ones."""
    if SHARED.is_dir():
        from service.decode import decode_image

        images = []
        for folder in sorted(SHARED.iterdir()):
            path = folder / "images" / f"{folder.name}.png"
            with Image.open(path) as im:
                if im.size != (size, size):
                    continue
            images.append(decode_image(path.read_bytes()))
            if len(images) == count:
                return images, f"real DSB2018 {size}x{size} images from {SHARED}"
    rng = np.random.default_rng(0)
    from tests.synthetic import random_labels, render

    images = [np.repeat(render(random_labels(rng, (size, size), 25, 8), rng)[..., None], 3, -1) for _ in range(count)]
    return images, f"generated {size}x{size} images (../shared not found)"


def big_image(base: np.ndarray, megapixels: float) -> np.ndarray:
    """A square image of about ``megapixels`` made by tiling a real image (realistic content)."""
    side = int(round((megapixels * 1e6) ** 0.5))
    reps = (side // base.shape[0] + 1, side // base.shape[1] + 1, 1)
    return np.ascontiguousarray(np.tile(base, reps)[:side, :side])


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# ---------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``nuclei-serve`` in a child process; measures cold start to /readyz 200."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "NUCLEI_LOG_LEVEL": "warning", **(env or {})}
        start = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "--port", str(self.port)], env=full_env,
                                     cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.cold_start = time.perf_counter() - start

    def tiles_done(self) -> float:
        text = httpx.get(self.url + "/metrics").text
        match = re.search(r"^nuclei_model_batch_tiles_sum (\S+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

    def mean_batch(self) -> float:
        text = httpx.get(self.url + "/metrics").text
        total = float(re.search(r"^nuclei_model_batch_tiles_sum (\S+)$", text, re.M).group(1))
        count = float(re.search(r"^nuclei_model_batch_tiles_count (\S+)$", text, re.M).group(1))
        return total / max(count, 1)

    def peak_rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def drive(url: str, payloads: list[bytes], concurrency: int, total: int) -> tuple[list[float], float, int]:
    """Send ``total`` requests with ``concurrency`` clients; (latencies, wall seconds, errors)."""
    def one(i: int, client: httpx.Client) -> float:
        start = time.perf_counter()
        r = client.post(url + "/segment", files={"file": ("x.png", payloads[i % len(payloads)], "image/png")})
        if r.status_code != 200:
            raise RuntimeError(f"status {r.status_code}: {r.text[:200]}")
        return time.perf_counter() - start

    clients = [httpx.Client(timeout=600) for _ in range(concurrency)]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(one, i, clients[i % concurrency]) for i in range(total)]
        latencies, errors = [], 0
        for f in futures:
            try:
                latencies.append(f.result())
            except RuntimeError:
                errors += 1
    wall = time.perf_counter() - start
    for c in clients:
        c.close()
    return latencies, wall, errors


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


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

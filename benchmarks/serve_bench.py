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
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import ROOT, Server, big_image, drive, pct, png_bytes, real_images, warm_shapes

# ---------------------------------------------------------------- in-process
def loaded_model(model_dir: Path, options=None):  # noqa: ANN001, ANN201 (RuntimeOptions, SegmentationModel)
    """The model compiled for ``options`` (default: the service's defaults), loaded and warmed once."""
    from service.model import SegmentationModel
    from service.runtime import RuntimeOptions

    model = SegmentationModel.load(model_dir, options or RuntimeOptions())
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


def tiles_by_shape(calls: list[list[tuple[int, ...]]]) -> dict[tuple[int, ...], int]:
    """How many tiles of each shape the recorded calls ran."""
    counts: dict[tuple[int, ...], int] = {}
    for shapes in calls:
        for shape in shapes:
            counts[shape[1:]] = counts.get(shape[1:], 0) + shape[0]
    return counts


def replay_batched(model, calls: list[list[tuple[int, ...]]], batch: int) -> float:  # noqa: ANN001
    """Model alone at its best: seconds per image when all images' tiles run in batches of ``batch``."""
    rng = np.random.default_rng(0)
    total = 0.0
    for shape, count in tiles_by_shape(calls).items():
        full = rng.integers(0, 255, (batch, *shape), dtype=np.uint8)
        model.predict_now(full)  # the shape's first call traces
        start = time.perf_counter()
        for done in range(0, count, batch):
            model.predict_now(full[:min(batch, count - done)])
        total += time.perf_counter() - start
    return total / len(calls)


def replay_streams(model, calls: list[list[tuple[int, ...]]], batch: int) -> float:  # noqa: ANN001
    """:func:`replay_batched` over the network's shared streams: as many threads as streams, each taking
    the next batch of ``batch`` tiles (the model alone as the busy server runs it)."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(0)
    total = 0.0
    with ThreadPoolExecutor(model.streams) as pool:
        for shape, count in tiles_by_shape(calls).items():
            full = rng.integers(0, 255, (batch, *shape), dtype=np.uint8)
            list(pool.map(lambda _: model.predict_shared(full), range(model.streams)))  # every stream traces
            sizes = [min(batch, count - done) for done in range(0, count, batch)]
            start = time.perf_counter()
            list(pool.map(lambda n: model.predict_shared(full[:n]), sizes))
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


# ---------------------------------------------------------------- runtimes x precisions
def parse_runtimes(text: str) -> list[tuple[str, str]]:
    """``openvino:bf16,tensorflow:f32`` -> [("openvino", "bf16"), ("tensorflow", "f32")]."""
    pairs = [tuple(item.split(":", 1)) if ":" in item else (item, "f32") for item in text.split(",") if item]
    return [(runtime, precision) for runtime, precision in pairs]


def compare_runtimes(model_dir: Path, int8_dir: Path | None, runtimes: list[tuple[str, str]],
                     image: np.ndarray, served_batch: int, rounds: int = 7, keep: dict | None = None) -> list[dict]:
    """Each runtime x precision in the same run, interleaved A, B, C, A, B, C, ... so machine drift hits all alike.

    Per round and runtime: one 256x256 tile at batch 1, ``served_batch`` tiles in one call, and
    ``segment()`` of ``image`` end to end. Labels are compared with the first runtime's (the reference).
    """
    from service.pipeline import segment
    from service.runtime import RuntimeOptions
    from training.matching import score_image

    models = {}
    for runtime, precision in runtimes:
        folder = int8_dir if precision == "int8" and int8_dir else model_dir
        start = time.perf_counter()
        models[(runtime, precision)] = loaded_model(folder, RuntimeOptions(runtime, precision))
        print(f"{runtime} {precision}: loaded and warmed in {time.perf_counter() - start:.1f} s", flush=True)
    tile = next(iter(models.values())).spec.image_size
    rng = np.random.default_rng(0)
    one, many = (rng.integers(0, 255, (n, tile, tile, 3), dtype=np.uint8) for n in (1, served_batch))
    times: dict = {key: {"tile_b1": [], "tile_served": [], "end_to_end": []} for key in models}
    labels = {}
    for key, model in models.items():  # each shape's first call, out of the timings
        model.predict_now(one), model.predict_now(many)
        labels[key] = segment(image, model).labels
    for _ in range(rounds):
        for key, model in models.items():
            t0 = time.perf_counter()
            model.predict_now(one)
            t1 = time.perf_counter()
            model.predict_now(many)
            t2 = time.perf_counter()
            segment(image, model)
            t3 = time.perf_counter()
            times[key]["tile_b1"].append(t1 - t0)
            times[key]["tile_served"].append((t2 - t1) / served_batch)
            times[key]["end_to_end"].append(t3 - t2)
    megapixels = image.shape[0] * image.shape[1] / 1e6
    if keep is not None:
        keep.update(labels)
    reference = labels[next(iter(models))]
    rows = []
    for key, model in models.items():
        t = {name: statistics.median(values) for name, values in times[key].items()}
        rows.append({"runtime": key[0], "precision": model.network.precision, "threads": model.network.threads,
                     "tile_b1_ms": t["tile_b1"] * 1000, "tile_served_ms": t["tile_served"] * 1000,
                     "seconds_per_mp": t["end_to_end"] / megapixels,
                     "nuclei": int(labels[key].max()), "identical_labels": bool(np.array_equal(labels[key], reference)),
                     "ap50_vs_reference": score_image(reference, labels[key]).ap50})
    return relative(rows)


def relative(rows: list[dict]) -> list[dict]:
    """Each row's speed-ups over the first row."""
    base = rows[0]
    for row in rows:
        row["tile_b1_speedup"] = base["tile_b1_ms"] / row["tile_b1_ms"]
        row["tile_served_speedup"] = base["tile_served_ms"] / row["tile_served_ms"]
        row["end_to_end_speedup"] = base["seconds_per_mp"] / row["seconds_per_mp"]
    return rows


def isolated_runtimes(model_dir: Path, int8_dir: Path | None, runtimes: list[tuple[str, str]],
                      passes: int = 2) -> list[dict]:
    """:func:`compare_runtimes` with each runtime in a process of its own (no other runtime's threads beside
    it), the processes run A, B, C, A, B, C ... for ``passes``; per runtime the median over its passes."""
    import subprocess
    import tempfile

    from training.matching import score_image

    work = Path(tempfile.mkdtemp(prefix="runtimes-"))
    found: dict[tuple[str, str], list[dict]] = {key: [] for key in runtimes}
    for _ in range(passes):
        for runtime, precision in runtimes:
            out = work / f"{runtime}-{precision}.json"
            command = [sys.executable, "-m", "benchmarks.serve_bench", "--worker", f"{runtime}:{precision}",
                       "--model-dir", str(model_dir), "--worker-out", str(out)]
            subprocess.run(command + (["--int8-model", str(int8_dir)] if int8_dir else []), check=True, cwd=ROOT)
            found[(runtime, precision)].append(json.loads(out.read_text()))
    reference = np.load(work / f"{runtimes[0][0]}-{runtimes[0][1]}.npy")
    rows = []
    for (runtime, precision), passes_rows in found.items():
        row = dict(passes_rows[0])
        for key in ("tile_b1_ms", "tile_served_ms", "seconds_per_mp"):
            row[key] = statistics.median(r[key] for r in passes_rows)
        labels = np.load(work / f"{runtime}-{precision}.npy")
        row["identical_labels"] = bool(np.array_equal(labels, reference))
        row["ap50_vs_reference"] = score_image(reference, labels).ap50
        rows.append(row)
    return relative(rows)


def runtime_worker(args: argparse.Namespace) -> None:
    """One runtime alone in this process (for :func:`isolated_runtimes`): its row as JSON, its labels as .npy."""
    from service.config import Settings

    images, _ = real_images(16)
    labels: dict = {}
    rows = compare_runtimes(args.model_dir, args.int8_model, parse_runtimes(args.worker), big_image(images[0], 1.0),
                            Settings().batch_max_size, keep=labels)
    args.worker_out.write_text(json.dumps(rows[0]))
    np.save(args.worker_out.with_suffix(".npy"), next(iter(labels.values())))


def runtime_rows(rows: list[dict], served_batch: int) -> list[str]:
    """Markdown: the runtime x precision speed table (ratios to the first row, measured in the same run)."""
    lines = [f"| runtime, precision | threads | ms / tile, batch 1 | x | ms / tile, batch {served_batch} | x "
             "| s / MP end to end | x | nuclei | labels = reference | AP@0.5 vs reference |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['runtime']} {r['precision']} | {r['threads']} | {r['tile_b1_ms']:.1f} | "
                     f"{r['tile_b1_speedup']:.2f} | {r['tile_served_ms']:.1f} | {r['tile_served_speedup']:.2f} | "
                     f"{r['seconds_per_mp']:.3f} | {r['end_to_end_speedup']:.2f} | {r['nuclei']} | "
                     f"{'yes' if r['identical_labels'] else 'no'} | {r['ap50_vs_reference']:.3f} |")
    return lines + [""]


def served_throughput(model_dir: Path, int8_dir: Path | None, runtimes: list[tuple[str, str]],
                      payloads: list[bytes], requests: int, levels=(1, 8)) -> list[tuple]:
    """Images/s through the real server per runtime x precision at each concurrency, and its cold start."""
    rows = []
    for runtime, precision in runtimes:
        folder = int8_dir if precision == "int8" and int8_dir else model_dir
        server = Server({"NUCLEI_MODEL_DIR": str(folder), "NUCLEI_RUNTIME": runtime, "NUCLEI_PRECISION": precision})
        try:
            warm_shapes(server.url, payloads)
            rates = []
            for c in levels:
                latencies, wall, errors = drive(server.url, payloads, c, requests)
                rates.append((len(latencies) / wall, errors))
        finally:
            server.stop()
        rows.append((runtime, precision, server.cold_start, rates))
    return rows


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--sizes", default="0.25,1,4,16", help="megapixels for the size sweep")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per size (median)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md")
    parser.add_argument("--runtimes", default="tensorflow:f32,openvino:f32,openvino:bf16",
                        help="runtime:precision pairs compared in one run, the first the reference ('' skips)")
    parser.add_argument("--int8-model", type=Path, help="the quantized copy (training.quantize) for openvino:int8")
    parser.add_argument("--only-runtimes", action="store_true", help="only the runtime comparison")
    parser.add_argument("--isolated", action="store_true",
                        help="each runtime in a process of its own (else all in this one, interleaved)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.worker:
        runtime_worker(args)
        return
    if args.runtimes:
        runtime_section(args, argv)
    if args.only_runtimes:
        return

    images, source = real_images(16)
    payloads = [png_bytes(im) for im in images]
    lines = ["# Serving performance\n",
             f"Command: `python -m benchmarks.serve_bench {' '.join(argv or sys.argv[1:])}` "
             f"on {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}. Model `{args.model_dir.name}`. "
             f"Inputs: {source}.\n"]

    server = Server({"NUCLEI_MODEL_DIR": str(args.model_dir)})
    cold = [server.cold_start]
    try:
        warm_shapes(server.url, payloads)  # untimed: every tile shape met by both networks
        rows = []
        for c in [int(x) for x in args.concurrency.split(",")]:
            latencies, wall, errors = drive(server.url, payloads, c, args.requests)
            rows.append((c, len(latencies) / wall, pct(latencies, 50), pct(latencies, 95), pct(latencies, 99),
                         errors, server.mean_batch(), statistics.fmean(latencies)))
    finally:
        server.stop()

    from service.config import Settings

    model = loaded_model(args.model_dir, Settings(model_dir=args.model_dir).runtime_options())  # as served
    tile = model.spec.image_size
    per_tile = model_alone(model, tile)
    best_batch = min(per_tile, key=per_tile.get)
    profiles, calls = profile_requests(model, images)
    alone_latency_1 = statistics.median(replay_latency(model, calls))
    plain_images_per_s = 1.0 / replay_batched(model, calls, best_batch)
    stream_rates = {b: 1.0 / replay_streams(model, calls, b) for b in (1, best_batch)} if model.streams > 1 else {}
    alone_images_per_s = max([plain_images_per_s, *stream_rates.values()])
    tiles_per_image = sum(shape[0] * shape[1] * shape[2] for c in calls for shape in c) / tile**2 / len(calls)

    lines.append("## Throughput and latency (256x256 images)\n")
    lines.append(f"Model alone, in-process: the network calls that `segment()` makes for these images "
                 f"(recorded, {tiles_per_image:.2f} tile-equivalents of {tile}x{tile} per image), replayed "
                 f"without the service. One image at a time: median {alone_latency_1 * 1000:.0f} ms per image; "
                 f"all tiles in batches of {best_batch} (its best batch size): {plain_images_per_s:.1f} images/s"
                 + "".join(f"; on its {model.streams} streams side by side, batches of {b}: {r:.1f} images/s"
                           for b, r in stream_rates.items())
                 + f". The best of these, {alone_images_per_s:.1f} images/s, is the model alone below. "
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


def runtime_section(args: argparse.Namespace, argv: list[str] | None) -> None:
    """Write the runtime x precision comparison (``docs/runtimes.md``, beside ``--out``)."""
    from service.config import Settings

    runtimes = parse_runtimes(args.runtimes)
    images, source = real_images(16)
    big = big_image(images[0], 1.0)
    served_batch = Settings().batch_max_size
    rows = (isolated_runtimes(args.model_dir, args.int8_model, runtimes) if args.isolated
            else compare_runtimes(args.model_dir, args.int8_model, runtimes, big, served_batch))
    served = served_throughput(args.model_dir, args.int8_model, runtimes, [png_bytes(im) for im in images],
                               args.requests)
    lines = ["# Runtimes and precisions\n",
             f"Command: `python -m benchmarks.serve_bench {' '.join(argv or sys.argv[1:])}` on {os.cpu_count()} "
             f"CPUs, {time.strftime('%Y-%m-%d %H:%M')}. Model `{args.model_dir}`. "
             + ("Each runtime in a process of its own, the processes run in turn twice; medians of 7 rounds, then of "
                "the two passes" if args.isolated else "In one process, interleaved round by round; medians of 7 rounds")
             + f"; x: speed-up over the first row, in the same run. End to end: "
             f"`segment()` of a {big.shape[1]}x{big.shape[0]} tiling of a real image ({source}); its labels "
             "compared with the first row's.\n"]
    lines += runtime_rows(rows, served_batch)
    lines += ["Through the server (`nuclei-serve`, 256x256 images, " f"{args.requests} requests per level):\n",
              "| runtime, precision | cold start s | images/s, concurrency 1 | images/s, concurrency 8 | errors |",
              "|---|---|---|---|---|"]
    for runtime, precision, cold, rates in served:
        lines.append(f"| {runtime} {precision} | {cold:.1f} | {rates[0][0]:.1f} | {rates[1][0]:.1f} | "
                     f"{rates[0][1] + rates[1][1]} |")
    out = args.out.parent / ("runtimes_isolated.md" if args.isolated else "runtimes.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    out.write_text(text + kept_notes(out))
    (out.with_suffix(".json")).write_text(json.dumps({"rows": rows, "served": served}, indent=2))
    print(text)


if __name__ == "__main__":
    main()

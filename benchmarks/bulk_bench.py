"""What ``nuclei-seg segment`` costs over bare ``segment()``, what a re-run costs, and Dask on one box.

    python -m benchmarks.bulk_bench --images 200 --out docs/scale-out.json

On ``--images`` real DSB2018 images (every modality and size, a seeded sample), in one run:

- **CLI overhead**: bare ``decode_image`` + ``segment()`` per image, against ``run_jobs`` with the
  in-process engine writing every output (labels TIFF, measurements CSV, status, summary). Both use
  the same loaded model; they alternate ``--rounds`` times, and the medians are compared.
- **Re-run**: the whole command (a fresh process: imports, model load, finding the inputs,
  checking the outputs) over finished outputs, against the same command's first run.
- **Dask**: a local cluster of 1 worker (all CPUs) and of 2 workers (the CPUs split), images/s
  with the cluster already started, and whether the labels equal the in-process run's.

Nothing else may run beside it: the machine has 2 cores and every number is a wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from benchmarks.harness import ROOT, SHARED
from service.bulk.engines import InProcess
from service.bulk.inputs import find_jobs
from service.bulk.outputs import Layout
from service.bulk.run import fingerprint, run_jobs
from service.config import Settings
from service.decode import decode_image
from service.model import SegmentationModel
from service.pipeline import segment
from service.runtime import available_cpus


def sample_inputs(count: int, folder: Path, seed: int = 0) -> list[Path]:
    """Symlinks to ``count`` seeded DSB2018 stage1_train images in ``folder`` (the real files are read)."""
    ids = sorted(p.name for p in SHARED.iterdir())
    chosen = sorted(random.Random(seed).sample(ids, count))
    folder.mkdir(parents=True)
    for image_id in chosen:
        (folder / f"{image_id}.png").symlink_to(SHARED / image_id / "images" / f"{image_id}.png")
    return sorted(folder.iterdir())


def bare(paths: list[Path], model: SegmentationModel, settings: Settings) -> float:
    """Seconds to read, decode and segment every image, writing nothing."""
    options = settings.segment_options()
    start = time.perf_counter()
    for path in paths:
        segment(decode_image(path.read_bytes(), max_pixels=settings.max_pixels), model, options)
    return time.perf_counter() - start


def cli_in_process(folder: Path, out: Path, model: SegmentationModel, settings: Settings) -> float:
    """Seconds for ``run_jobs`` with the in-process engine into a fresh ``out`` (all outputs written)."""
    shutil.rmtree(out, ignore_errors=True)
    jobs = find_jobs([str(folder)])
    layout = Layout(out, (), fingerprint(model.spec.metadata, {}))
    with open(os.devnull, "w") as quiet:
        start = time.perf_counter()
        outcome = run_jobs(jobs, layout, InProcess(model, settings.segment_options(), settings.max_pixels),
                           threading.Event(), stream=quiet)
        seconds = time.perf_counter() - start
    assert outcome.segmented == len(jobs), outcome
    return seconds


def command(folder: Path, out: Path, *extra: str) -> float:
    """Wall seconds of the whole ``nuclei-seg segment`` command in a fresh process."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "service.bulk.cli", "segment", str(folder), "--out", str(out), *extra],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - start


def dask_rate(folder: Path, out: Path, workers: int, reference: Path) -> dict[str, Any]:
    """Images/s on a local cluster of ``workers`` (started before the clock), and label identity."""
    from service.bulk.cluster import OnDask

    settings = Settings()
    shutil.rmtree(out, ignore_errors=True)
    jobs = find_jobs([str(folder)])
    start = time.perf_counter()
    engine = OnDask(settings.model_dir, settings.runtime_options(), settings.segment_options(), settings.max_pixels,
                    workers=workers)
    engine.client.wait_for_workers(workers)
    engine.client.run(lambda: None)  # every worker up, plugin set up (model loaded)
    started = time.perf_counter() - start
    metadata = SegmentationModel.without_network(settings.model_dir).spec.metadata
    try:
        with open(os.devnull, "w") as quiet:
            clock = time.perf_counter()
            outcome = run_jobs(jobs, Layout(out, (), fingerprint(metadata, {})), engine, threading.Event(), stream=quiet)
            seconds = time.perf_counter() - clock
        threads = engine.runtime.threads
    finally:
        engine.close()
    same = sum(np.array_equal(tifffile.imread(p), tifffile.imread(out / p.relative_to(reference)))
               for p in (reference / "labels").rglob("*.tif"))
    return {"workers": workers, "threads_per_worker": threads, "start_s": round(started, 1),
            "seconds": round(seconds, 1), "images_per_s": round(outcome.segmented / seconds, 3),
            "identical_labels": f"{same}/{len(jobs)}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "scale-out.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bulk-bench-"))
    try:
        paths = sample_inputs(args.images, work / "in")
        megapixels = sum(np.prod(decode_image(p.read_bytes()).shape[:2]) for p in paths) / 1e6
        settings = Settings()
        model = SegmentationModel.load(settings.model_dir, settings.runtime_options())
        model.warm()
        bare_s, cli_s = [], []
        for _ in range(args.rounds):  # alternated, so drift hits both alike
            bare_s.append(bare(paths, model, settings))
            cli_s.append(cli_in_process(work / "in", work / "cli", model, settings))
        del model
        first = command(work / "in", work / "cmd")
        rerun = [command(work / "in", work / "cmd") for _ in range(3)]
        dask = [dask_rate(work / "in", work / f"dask{n}", n, work / "cli") for n in (1, 2)]
        result = {
            "images": args.images, "megapixels": round(megapixels, 2), "cpus": available_cpus(),
            "serving": SegmentationModel.load(settings.model_dir, settings.runtime_options()).serving(),
            "bare_s": [round(s, 2) for s in bare_s], "cli_s": [round(s, 2) for s in cli_s],
            "cli_overhead": round(statistics.median(cli_s) / statistics.median(bare_s) - 1, 4),
            "bare_s_per_mp": round(statistics.median(bare_s) / megapixels, 3),
            "cli_s_per_mp": round(statistics.median(cli_s) / megapixels, 3),
            "command_first_s": round(first, 1), "command_rerun_s": [round(s, 2) for s in rerun],
            "rerun_ratio": round(statistics.median(rerun) / first, 4),
            "dask": dask,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

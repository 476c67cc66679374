"""Choose TensorFlow's thread settings by measurement: model-alone speed per (intra, inter) pair.

    python -m benchmarks.thread_sweep --out docs/threads.md

Each setting runs in a fresh process (TensorFlow fixes its thread pools at the first op).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import ROOT

CHILD = """
import json, statistics, sys, time
import numpy as np
import tensorflow as tf
intra, inter = int(sys.argv[2]), int(sys.argv[3])
if intra: tf.config.threading.set_intra_op_parallelism_threads(intra)
if inter: tf.config.threading.set_inter_op_parallelism_threads(inter)
from service.model import SegmentationModel
model = SegmentationModel.load(sys.argv[1])
size = model.spec.image_size
out = {}
for batch in (1, 8):
    x = np.random.default_rng(0).integers(0, 255, (batch, size, size, 3), dtype=np.uint8)
    model.predict_now(x)
    times = []
    for _ in range(7):
        t = time.perf_counter(); model.predict_now(x); times.append(time.perf_counter() - t)
    out[batch] = statistics.median(times) / batch
print(json.dumps(out))
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "threads.md")
    args = parser.parse_args(argv)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    rows = []
    for intra, inter in [(0, 0), (1, 1), (2, 1), (2, 2), (4, 1)]:
        out = subprocess.run([sys.executable, "-c", CHILD, str(args.model_dir), str(intra), str(inter)],
                             capture_output=True, text=True, env=env, cwd=ROOT, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((intra, inter, result["1"], result["8"]))
    best = min(rows, key=lambda r: r[3])
    lines = ["# TensorFlow thread settings\n",
             f"Command: `python -m benchmarks.thread_sweep` on {os.cpu_count()} CPUs, "
             f"{time.strftime('%Y-%m-%d %H:%M')}, model `{args.model_dir.name}`. Median of 7 calls; 0 = TensorFlow's choice.\n",
             "| intra-op | inter-op | ms per tile, batch 1 | ms per tile, batch 8 |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {one * 1000:.1f} | {eight * 1000:.1f} |" for a, b, one, eight in rows]
    lines.append(f"\nFastest at batch 8 (what the batcher runs under load): intra {best[0]}, inter {best[1]}.\n")
    text = "\n".join(lines)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

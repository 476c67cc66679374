"""Why the server's network also runs as streams while requests overlap (``NUCLEI_STREAMS``).

    python -m benchmarks.streams [--model-dir models/default] [--rounds 4] [--servers 2]

Two measurements, each interleaved so that the machine's drift hits both alike:

1. The network alone, in-process, as the server compiles it: one stream on all threads against
   the same threads as streams of one thread each, with two calls at a time. Each is measured
   alone and beside one Python thread that decodes watershed labels without pause, as another
   request's post-processing does. Batches of 2 random 256x256 tiles, ``--rounds`` rounds of
   3 s, medians.
2. The server (``nuclei-serve``) with ``NUCLEI_STREAMS=1`` and ``2``, started in turn
   ``--servers`` times each. Real DSB2018 256x256 images, each sent once alone and once among
   others first (so every tile shape is warm in both networks), then 16 requests at concurrency
   1 and 32 at concurrency 8. Medians over the starts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import ROOT, Server, drive, pct, png_bytes, real_images, warm_shapes

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def network_rates(network, seconds: float, beside_decoding: bool) -> tuple[float, float]:  # noqa: ANN001
    """(tiles/s, decodings/s of the Python thread beside it) for ``seconds`` of calls on ``network``:
    one caller for a network without streams, one per stream otherwise."""
    from service.postprocess import PostprocessParams, instances_from_probabilities

    batch = np.random.default_rng(0).integers(0, 255, (2, 256, 256, 3), dtype=np.uint8)
    probs = np.random.default_rng(1).dirichlet([3, 1, 1], (256, 256)).astype(np.float32)
    stop, lock = threading.Event(), threading.Lock()
    tiles, decodings = [0], [0]
    def infer() -> None:
        while not stop.is_set():
            network.shared(batch)  # the plain call, for a network without streams
            with lock:
                tiles[0] += len(batch)

    def decode() -> None:
        while not stop.is_set():
            instances_from_probabilities(probs, PostprocessParams())
            decodings[0] += 1

    threads = [threading.Thread(target=infer) for _ in range(network.streams)]
    if beside_decoding:
        threads.append(threading.Thread(target=decode))
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return tiles[0] / seconds, decodings[0] / seconds


def network_table(model_dir: Path, rounds: int) -> list[str]:
    from service.model import SegmentationModel
    from service.runtime import RuntimeOptions

    networks = {}
    for streams in (1, 2):
        model = SegmentationModel.load(model_dir, RuntimeOptions(streams=streams))
        networks[f"{model.network.threads} threads as {model.streams} stream(s)"] = model.network
    for network in networks.values():  # warm both, both ways
        network_rates(network, 1.0, False)
    results: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    for _ in range(rounds):
        for name, network in networks.items():
            for beside in (False, True):
                results.setdefault((name, beside), []).append(network_rates(network, 3.0, beside))
    lines = ["| network | tiles/s, alone | tiles/s, beside a decoding thread | decodings/s of that thread |",
             "|---|---|---|---|"]
    for name in networks:
        alone = statistics.median(r[0] for r in results[(name, False)])
        beside = results[(name, True)]
        lines.append(f"| {name} | {alone:.1f} | {statistics.median(r[0] for r in beside):.1f} | "
                     f"{statistics.median(r[1] for r in beside):.0f} |")
    return lines


def server_table(model_dir: Path, starts: int) -> list[str]:
    images, _ = real_images(16)
    payloads = [png_bytes(image) for image in images]
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for _ in range(starts):
        for streams in ("1", "2"):
            server = Server({"NUCLEI_MODEL_DIR": str(model_dir), "NUCLEI_STREAMS": streams})
            try:
                warm_shapes(server.url, payloads)
                for concurrency, total in ((1, 16), (8, 32)):
                    latencies, wall, _ = drive(server.url, payloads, concurrency, total)
                    results.setdefault((streams, concurrency), []).append((len(latencies) / wall, pct(latencies, 50)))
            finally:
                server.stop()
    lines = ["| NUCLEI_STREAMS | images/s, concurrency 1 | p50 ms | images/s, concurrency 8 | p50 ms |",
             "|---|---|---|---|---|"]
    for streams in ("1", "2"):
        cells = []
        for concurrency in (1, 8):
            runs = results[(streams, concurrency)]
            cells += [f"{statistics.median(r[0] for r in runs):.2f}", f"{statistics.median(r[1] for r in runs) * 1000:.0f}"]
        lines.append(f"| {streams} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds of the network measurement")
    parser.add_argument("--servers", type=int, default=2, help="starts of each server setting")
    args = parser.parse_args(argv)
    print("\n".join(network_table(args.model_dir, args.rounds)) + "\n")
    print("\n".join(server_table(args.model_dir, args.servers)))


if __name__ == "__main__":
    main()

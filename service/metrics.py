"""Prometheus metrics of one app instance (its own registry, so apps in tests do not collide).

With several uvicorn workers each process counts only its own requests, so ``nuclei-serve``
sets ``PROMETHEUS_MULTIPROC_DIR`` before the workers start: prometheus_client then keeps every
value in per-process files there, and ``/metrics`` sums the files of all workers.
"""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess, values

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)

#: prometheus_client chose file-backed values at import (``PROMETHEUS_MULTIPROC_DIR`` was set then);
#: the value class, not the variable now, says where the numbers are.
MULTIPROCESS: bool = bool(getattr(values.ValueClass, "_multiprocess", False))


class Metrics:
    """Requests, latencies, model batches, queue depth and work done."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("nuclei_requests_total", "HTTP requests by route and status.",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("nuclei_request_seconds", "HTTP request latency by route.", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("nuclei_model_batch_tiles", "Tiles per model call.",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_seconds = Histogram("nuclei_model_batch_seconds", "Seconds per model call.",
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        # livesum: the tiles queued in all running workers (a stopped worker's queue is gone)
        self.queue_depth = Gauge("nuclei_queue_tiles", "Tiles waiting for the model.", registry=self.registry,
                                 multiprocess_mode="livesum")
        self.images = Counter("nuclei_images_total", "Images segmented.", registry=self.registry)
        self.megapixels = Counter("nuclei_megapixels_total", "Megapixels segmented.", registry=self.registry)

    def observe_batch(self, tiles: int, seconds: float) -> None:
        self.batch_size.observe(tiles)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        """This app's registry, or with several workers the sum over all workers' files."""
        if not MULTIPROCESS:
            return generate_latest(self.registry)
        forget_dead_workers()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)

    def close(self) -> None:
        """At worker shutdown: drop this process's live gauges (queue depth) from the sums."""
        if MULTIPROCESS:
            multiprocess.mark_process_dead(os.getpid())


def forget_dead_workers(directory: str | None = None) -> None:
    """Drop the live gauges of workers that died without a shutdown (killed, out of memory), whose
    queue depth would otherwise stay in every sum; their counters stay counted, as they should."""
    directory = directory or os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    for path in Path(directory).glob("gauge_live*_*.db") if directory else ():
        pid = path.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not alive(int(pid)):
            multiprocess.mark_process_dead(int(pid), directory)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True

"""Prometheus metrics of one app instance (its own registry, so apps in tests do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


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
        self.queue_depth = Gauge("nuclei_queue_tiles", "Tiles waiting for the model.", registry=self.registry)
        self.images = Counter("nuclei_images_total", "Images segmented.", registry=self.registry)
        self.megapixels = Counter("nuclei_megapixels_total", "Megapixels segmented.", registry=self.registry)

    def observe_batch(self, tiles: int, seconds: float) -> None:
        self.batch_size.observe(tiles)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""The real ``nuclei-serve`` process on loopback: reduced load test and graceful shutdown."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.harness import Server, png_bytes
from benchmarks.load_test import run
from tests.synthetic import random_labels, render


def test_reduced_load_every_request_answered_and_no_leak(tile_model_dir: Path):
    result = run(requests=400, concurrency=16, model_dir=tile_model_dir)
    assert result["unexpected"] == {}, result["statuses"]
    assert result["statuses"].get(200, 0) + result["rejected_503"] == 400
    assert result["rss_growth"] <= 0.10, result


def test_sigterm_finishes_in_flight_requests_and_exits_zero(tile_model_dir: Path):
    rng = np.random.default_rng(0)
    image = render(random_labels(rng, (1024, 1024), 200, 8), rng)
    payload = png_bytes(image)
    server = Server({"NUCLEI_MODEL_DIR": str(tile_model_dir)})
    results: list[int] = []

    def post() -> None:
        try:
            r = httpx.post(server.url + "/segment", files={"file": ("a.png", payload, "image/png")}, timeout=120)
            results.append(r.status_code)
        except httpx.HTTPError as exc:
            results.append(-1)
            raise AssertionError(f"in-flight request lost: {exc!r}") from exc

    threads = [threading.Thread(target=post) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # requests are in flight
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    refused = False
    try:
        httpx.get(server.url + "/healthz", timeout=2)
    except httpx.HTTPError:
        refused = True
    for t in threads:
        t.join(120)
    code = server.proc.wait(60)
    assert results == [200] * 6, results
    assert code == 0
    assert refused, "a new connection was accepted after SIGTERM"

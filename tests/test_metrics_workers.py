"""/metrics with several uvicorn workers: every scrape sums all workers (prometheus multiprocess mode)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from benchmarks.harness import ROOT, free_port, png_bytes
from service.cli import MULTIPROC_ENV, MetricsDirError, prepare_metrics_dir
from tests.synthetic import random_labels, render


def serve_command() -> list[str]:
    script = Path(sys.executable).with_name("nuclei-serve")
    return [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]


def sample(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def test_two_workers_every_scrape_reports_the_sum(tile_model_dir: Path, tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k.upper() != MULTIPROC_ENV}
    env.update({"TMPDIR": str(tmp_path), "NUCLEI_LOG_LEVEL": "info", "NUCLEI_API_KEY": ""})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([*serve_command(), "--workers", "2", "--port", str(port), "--model-dir", str(tile_model_dir)],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while sum("Application startup complete" in line for line in log) < 2:  # both workers serve
            assert proc.poll() is None, "".join(log)[-3000:]
            assert time.monotonic() < deadline, "workers not ready:\n" + "".join(log)[-3000:]
            time.sleep(0.1)
        assert httpx.get(url + "/readyz", timeout=5).status_code == 200

        metrics_dirs = list(tmp_path.glob("nuclei-metrics-*"))
        assert len(metrics_dirs) == 1, metrics_dirs
        pids = {p.stem.rsplit("_", 1)[1] for p in metrics_dirs[0].glob("counter_*.db")}
        assert len(pids) == 2, pids  # each worker writes its own counter file

        rng = np.random.default_rng(0)
        payload = png_bytes(render(random_labels(rng, (96, 96), 6, 6), rng))
        statuses: list[int] = []

        def post() -> None:  # one connection per request, so both workers get some
            r = httpx.post(url + "/segment", files={"file": ("a.png", payload, "image/png")}, timeout=60)
            statuses.append(r.status_code)

        threads = [threading.Thread(target=post) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert statuses == [200] * 6, statuses

        for _ in range(6):  # a new connection each time: any worker may answer
            text = httpx.get(url + "/metrics", timeout=10).text
            assert sample(text, "nuclei_images_total") == 6
            assert sample(text, 'nuclei_requests_total{route="/segment",status="200"}') == 6
            assert sample(text, "nuclei_queue_tiles") == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    reader.join(5)
    assert code == 0, "".join(log)[-3000:]
    assert not list(tmp_path.glob("nuclei-metrics-*")), "the multiprocess metrics directory was left behind"


def test_user_metrics_dir_is_emptied_of_stale_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "counter_123.db").write_bytes(b"stale")
    (tmp_path / "keep.txt").write_text("not ours")
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    assert prepare_metrics_dir(2) is None  # the user's directory stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("value", ["", "missing"])
def test_unusable_user_metrics_dir_is_refused(value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(MULTIPROC_ENV, value and str(tmp_path / value))
    with pytest.raises(MetricsDirError, match=MULTIPROC_ENV):
        prepare_metrics_dir(2)


def test_one_worker_needs_no_metrics_dir(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    monkeypatch.delenv(MULTIPROC_ENV.lower(), raising=False)
    assert prepare_metrics_dir(1) is None
    assert MULTIPROC_ENV not in os.environ


def test_a_dead_workers_queue_depth_leaves_the_sum(tmp_path):
    from service.metrics import forget_dead_workers

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"gauge_livesum_{dead.pid}.db"
    stale.write_bytes(b"")
    counter = tmp_path / f"counter_{dead.pid}.db"
    counter.write_bytes(b"")
    mine = tmp_path / f"gauge_livesum_{os.getpid()}.db"
    mine.write_bytes(b"")
    forget_dead_workers(str(tmp_path))
    assert not stale.exists() and counter.exists() and mine.exists()

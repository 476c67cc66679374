"""Shared benchmark harness: real inputs, a ``nuclei-serve`` child process, concurrent clients."""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
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

    def __init__(self, env: dict[str, str] | None = None, timeout: float = 180) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "NUCLEI_LOG_LEVEL": "warning", **(env or {})}
        start = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "--port", str(self.port)], env=full_env,
                                     cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while True:
            if time.perf_counter() - start > timeout:
                self.stop()
                raise RuntimeError(f"server not ready after {timeout} s")
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.cold_start = time.perf_counter() - start

    def metric(self, name: str) -> float:
        """One sample of the server's /metrics (0 when it has not been recorded yet)."""
        match = re.search(rf"^{name} (\S+)$", httpx.get(self.url + "/metrics").text, re.M)
        return float(match.group(1)) if match else 0.0

    def tiles_done(self) -> float:
        return self.metric("nuclei_model_batch_tiles_sum")

    def mean_batch(self) -> float:
        return self.tiles_done() / max(self.metric("nuclei_model_batch_tiles_count"), 1)

    def peak_rss_mb(self) -> float:
        return self._status_kb("VmHWM") / 1024

    def rss_mb(self) -> float:
        return self._status_kb("VmRSS") / 1024

    def _status_kb(self, field: str) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def send_all(url: str, payloads: list[bytes], concurrency: int, total: int,
             on_done: Callable[[int], None] | None = None) -> tuple[list[tuple[int, float]], float]:
    """Send ``total`` requests with ``concurrency`` clients; ([(status, seconds)], wall seconds).

    Status 0 means the connection failed. ``on_done(n)`` is called after the n-th answer.
    """
    done = 0
    lock = threading.Lock()

    def one(i: int, client: httpx.Client) -> tuple[int, float]:
        nonlocal done
        start = time.perf_counter()
        try:
            r = client.post(url + "/segment", files={"file": ("x.png", payloads[i % len(payloads)], "image/png")})
            status = r.status_code
        except httpx.HTTPError:
            status = 0
        result = (status, time.perf_counter() - start)
        with lock:
            done += 1
            if on_done:
                on_done(done)
        return result

    clients = [httpx.Client(timeout=600) for _ in range(concurrency)]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda i: one(i, clients[i % concurrency]), range(total)))
    wall = time.perf_counter() - start
    for c in clients:
        c.close()
    return results, wall


def drive(url: str, payloads: list[bytes], concurrency: int, total: int) -> tuple[list[float], float, int]:
    """:func:`send_all` summarised: (latencies of 200s, wall seconds, count of other answers)."""
    results, wall = send_all(url, payloads, concurrency, total)
    latencies = [seconds for status, seconds in results if status == 200]
    return latencies, wall, len(results) - len(latencies)


def warm_shapes(url: str, payloads: list[bytes]) -> None:
    """Send every payload once alone and once among others, untimed: each compiled network (the one on all
    threads for a lone request, the streams for overlapping ones) pays once for every new tile shape."""
    drive(url, payloads, 1, len(payloads))
    drive(url, payloads, 8, len(payloads))


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")



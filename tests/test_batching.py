"""Dynamic micro-batching: concurrent callers share model calls and get their own results back."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest

from service.batching import MicroBatcher, Overloaded


class FakeModel:
    """Returns each tile's mean as its 'probability' and records the batch sizes it saw."""

    def __init__(self, delay: float = 0.02) -> None:
        self.batches: list[int] = []
        self.delay = delay

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        self.batches.append(len(tiles))
        time.sleep(self.delay)
        return tiles.astype(np.float32) + 0.5


def test_concurrent_requests_are_batched_and_split_back():
    model = FakeModel()
    batcher = MicroBatcher(model, max_batch=8, max_wait_ms=20)
    try:
        inputs = [np.full((1, 4, 4, 3), i, np.uint8) for i in range(16)]
        with ThreadPoolExecutor(16) as pool:
            outputs = list(pool.map(batcher.predict, inputs))
        for i, out in enumerate(outputs):
            assert out.shape == (1, 4, 4, 3) and np.all(out == i + 0.5)
        assert max(model.batches) > 1 and sum(model.batches) == 16 and max(model.batches) <= 8
    finally:
        batcher.close()


def test_different_tile_shapes_are_never_mixed():
    model = FakeModel()
    batcher = MicroBatcher(model, max_batch=8, max_wait_ms=20)
    try:
        inputs = [np.zeros((1, 4 + 4 * (i % 2), 4, 3), np.uint8) for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            outputs = list(pool.map(batcher.predict, inputs))
        assert [o.shape[1] for o in outputs] == [4, 8] * 4
    finally:
        batcher.close()


@contextmanager
def blocked_batcher(first: np.ndarray, **options) -> Iterator[tuple[MicroBatcher, Future, threading.Event]]:
    """A one-tile-per-call batcher whose model blocks on a gate, with ``first`` already taken by the worker.

    Yields (batcher, the running job, the gate); whatever the test does, the gate opens and the batcher closes.
    """
    gate = threading.Event()

    def slow(tiles):
        gate.wait(5)
        return tiles.astype(np.float32)

    batcher = MicroBatcher(slow, max_batch=1, max_wait_ms=0, **options)
    try:
        running = batcher.submit(first)
        time.sleep(0.05)  # the worker has taken the first job and is blocked
        yield batcher, running, gate
    finally:
        gate.set()
        batcher.close()


def test_full_queue_refuses_at_once():
    with blocked_batcher(np.zeros((1, 2, 2, 3), np.uint8), max_queue=2) as (batcher, running, gate):
        queued = [batcher.submit(np.zeros((1, 2, 2, 3), np.uint8)) for _ in range(2)]
        with pytest.raises(Overloaded):
            batcher.submit(np.zeros((1, 2, 2, 3), np.uint8))
        gate.set()
        assert running.result(5).shape == (1, 2, 2, 3)
        assert all(f.result(5) is not None for f in queued)


def test_model_errors_reach_the_caller_and_the_worker_survives():
    calls = []

    def flaky(tiles):
        calls.append(len(tiles))
        if len(calls) == 1:
            raise ValueError("boom")
        return tiles.astype(np.float32)

    batcher = MicroBatcher(flaky, max_batch=4, max_wait_ms=0)
    try:
        with pytest.raises(ValueError, match="boom"):
            batcher.predict(np.zeros((1, 2, 2, 3), np.uint8))
        assert batcher.predict(np.zeros((2, 2, 2, 3), np.uint8)).shape == (2, 2, 2, 3)
    finally:
        batcher.close()


def test_a_failing_metrics_hook_does_not_kill_the_worker():
    def bad_hook(tiles, seconds):
        raise RuntimeError("metrics broke")

    batcher = MicroBatcher(lambda t: t.astype(np.float32), max_batch=4, max_wait_ms=0, on_batch=bad_hook)
    try:
        for _ in range(3):
            with pytest.raises(RuntimeError, match="metrics broke"):
                batcher.predict(np.zeros((1, 2, 2, 3), np.uint8))
    finally:
        batcher.close()
    with pytest.raises(Overloaded):  # closed: refused like an overload (503), not a crash
        batcher.submit(np.zeros((1, 2, 2, 3), np.uint8))


def test_a_lone_declared_caller_does_not_wait_for_company():
    # with a 3 s maximum wait, an undeclared caller waits it out (nothing says no one else comes),
    # a declared caller that is the only one active is served at once
    model = FakeModel(delay=0.0)
    batcher = MicroBatcher(model, max_batch=8, max_wait_ms=3000)
    try:
        with batcher.caller():
            start = time.perf_counter()
            out = batcher.predict(np.zeros((1, 4, 4, 3), np.uint8))
            lone = time.perf_counter() - start
        assert out.shape == (1, 4, 4, 3) and lone < 1.5
        start = time.perf_counter()
        batcher.predict(np.zeros((1, 4, 4, 3), np.uint8))
        assert time.perf_counter() - start >= 2.7
    finally:
        batcher.close()


def test_declared_callers_still_share_batches():
    model = FakeModel()
    batcher = MicroBatcher(model, max_batch=8, max_wait_ms=200)
    barrier = threading.Barrier(8)

    def request(i: int) -> np.ndarray:
        with batcher.caller():
            barrier.wait()  # all eight are active before any submits
            return batcher.predict(np.full((1, 4, 4, 3), i, np.uint8))

    try:
        with ThreadPoolExecutor(8) as pool:
            outputs = list(pool.map(request, range(8)))
        assert all(np.all(out == i + 0.5) for i, out in enumerate(outputs))
        assert max(model.batches) > 1
    finally:
        batcher.close()


def test_with_unit_pixels_large_tiles_count_for_their_pixels():
    shapes: list[tuple[int, int]] = []

    def model(tiles: np.ndarray) -> np.ndarray:
        shapes.append((len(tiles), tiles.shape[1]))
        time.sleep(0.05)
        return tiles.astype(np.float32)

    batcher = MicroBatcher(model, max_batch=8, max_wait_ms=100, unit_pixels=16)
    try:
        assert batcher.units(np.zeros((2, 8, 8, 3), np.uint8)) == 8  # 2 tiles of 4 units each
        assert batcher.units(np.zeros((1, 2, 2, 3), np.uint8)) == 1  # a small tile still counts as one
        big = [np.zeros((2, 8, 8, 3), np.uint8) for _ in range(3)]  # 8 units each: a call to itself
        small = [np.zeros((1, 4, 4, 3), np.uint8) for _ in range(8)]  # 1 unit each: calls are shared
        with ThreadPoolExecutor(11) as pool:
            list(pool.map(batcher.predict, big + small))
        assert [n for n, side in shapes if side == 8] == [2, 2, 2]
        assert sum(n for n, side in shapes if side == 4) == 8 and max(n for n, side in shapes if side == 4) > 1
    finally:
        batcher.close()


def test_with_unit_pixels_the_queue_bound_counts_pixels():
    first = np.zeros((1, 4, 4, 3), np.uint8)
    with blocked_batcher(first, max_queue=8, unit_pixels=16) as (batcher, running, gate):
        queued = batcher.submit(np.zeros((2, 8, 8, 3), np.uint8))  # 8 units: the queue is full
        with pytest.raises(Overloaded):
            batcher.submit(np.zeros((1, 4, 4, 3), np.uint8))
        gate.set()
        assert running.result(5).shape == (1, 4, 4, 3) and queued.result(5).shape == (2, 8, 8, 3)


def test_a_lone_batch_takes_the_plain_call_and_overlapping_ones_the_shared_streams():
    """With streams (two workers), a request alone gets the network on all its threads (its lowest latency);
    while other requests are in progress, batches run side by side on the shared streams."""
    plain, shared = FakeModel(delay=0.0), FakeModel(delay=0.05)
    running, peak, lock = [0], [0], threading.Lock()

    def streamed(tiles: np.ndarray) -> np.ndarray:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            return shared(tiles)
        finally:
            with lock:
                running[0] -= 1

    batcher = MicroBatcher(plain, max_batch=1, max_wait_ms=0, predict_shared=streamed, workers=2)
    try:
        with batcher.caller():
            out = batcher.predict(np.zeros((1, 4, 4, 3), np.uint8))
        assert out.shape == (1, 4, 4, 3) and plain.batches == [1] and shared.batches == []
        barrier = threading.Barrier(4)

        def request(i: int) -> np.ndarray:
            with batcher.caller():
                barrier.wait()
                return batcher.predict(np.full((1, 4, 4, 3), i, np.uint8))

        with ThreadPoolExecutor(4) as pool:
            outputs = list(pool.map(request, range(4)))
        assert all(np.all(out == i + 0.5) for i, out in enumerate(outputs))
        assert len(shared.batches) >= 3 and peak[0] == 2  # two streams at once, never more
    finally:
        batcher.close()

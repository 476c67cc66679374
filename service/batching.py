"""Dynamic micro-batching: gather the tiles of concurrent requests into one model call.

On a small CPU box, one model call on 8 tiles costs much less than 8 calls on one tile, and
concurrent calls only fight over the same cores. So every request thread hands its tiles to
one worker thread, which waits at most ``max_wait_ms`` for more work of the same tile shape, runs
up to ``max_batch`` tiles at once, and hands each caller its slice of the result. Where the network
has streams, one worker per stream: a batch that runs alone takes all the threads, the others a
stream each, so the model keeps computing while other requests' post-processing holds a core. With
``unit_pixels`` set, tiles are counted in units of that many pixels (the model's input tile), so
that the bounds mean the same memory whatever size the tiles are. Callers that
declare themselves with :meth:`MicroBatcher.caller` let the worker skip that wait when no other
caller is active: a lone request never pays for company that cannot come. Decoding,
post-processing and encoding stay in the request threads and overlap with the model.

The queue is bounded: when ``max_queue`` tiles are already waiting, :class:`Overloaded` is raised
at once so the HTTP layer can answer 503 instead of piling up work until memory runs out.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

PredictFn = Callable[[np.ndarray], np.ndarray]


class Overloaded(RuntimeError):
    """The batch queue is full; the caller should retry later."""


@dataclass(eq=False)  # identity semantics: jobs are removed from the queue by identity
class _Job:
    tiles: np.ndarray
    units: int  # what the job counts for against max_batch and max_queue
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Worker threads (one, or one per stream of the network) that batch same-shape tile arrays for ``predict``."""

    def __init__(self, predict: PredictFn, max_batch: int = 8, max_wait_ms: float = 2.0, max_queue: int = 4096,
                 on_batch: Callable[[int, float], None] | None = None, unit_pixels: int | None = None,
                 predict_shared: PredictFn | None = None, workers: int = 1) -> None:
        self._predict = predict
        self._predict_shared = predict_shared or predict
        self._active = 0  # batches being computed
        self.unit_pixels = unit_pixels
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._jobs: deque[_Job] = deque()
        self._queued_tiles = 0
        self._callers = 0  # callers inside caller(): requests that may submit work soon
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=f"model-batcher-{i}", daemon=True)
                         for i in range(max(1, workers))]
        for thread in self._threads:
            thread.start()

    @property
    def queued_tiles(self) -> int:
        return self._queued_tiles

    @contextmanager
    def caller(self) -> Iterator[None]:
        """Declare one request in progress for the duration of the block (see the module notes)."""
        with self._cond:
            self._callers += 1
        try:
            yield
        finally:
            with self._cond:
                self._callers -= 1
                self._cond.notify()

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        """Blocking: class probabilities of ``tiles`` ``(N, H, W, 3) uint8``, computed in a shared batch."""
        return self.submit(tiles).result()

    def submit(self, tiles: np.ndarray) -> Future:
        job = _Job(np.ascontiguousarray(tiles), self.units(tiles))
        with self._cond:
            if self._closed:
                raise Overloaded("the server is shutting down")
            if self._queued_tiles + job.units > self.max_queue and self._queued_tiles > 0:
                raise Overloaded(f"{self._queued_tiles} tiles already queued (limit {self.max_queue})")
            self._jobs.append(job)
            self._queued_tiles += job.units
            self._cond.notify()
        return job.future

    def units(self, tiles: np.ndarray) -> int:
        """How many tiles ``tiles`` count for: their number, or their pixels in ``unit_pixels`` (at least 1)."""
        if self.unit_pixels is None:
            return len(tiles)
        return max(1, -(-len(tiles) * tiles.shape[1] * tiles.shape[2] // self.unit_pixels))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)

    def _take_batch(self) -> tuple[list[_Job], bool] | None:
        """Wait for work, then collect same-shape jobs up to ``max_batch`` tiles or ``max_wait``; (the jobs,
        whether they run alone: no other batch in progress, none waiting, no other request that may add one)."""
        with self._cond:
            while not self._jobs and not self._closed:
                self._cond.wait()
            if not self._jobs:
                return None
            first = self._jobs.popleft()
            batch, count = [first], first.units
            deadline = time.perf_counter() + self.max_wait
            shape = first.tiles.shape[1:]
            while count < self.max_batch:
                match = next((j for j in self._jobs if j.tiles.shape[1:] == shape
                              and count + j.units <= self.max_batch), None)
                if match is not None:
                    self._jobs.remove(match)
                    batch.append(match)
                    count += match.units
                    continue
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self._closed or self._alone(batch):
                    break
                self._cond.wait(remaining)
            self._queued_tiles -= count
            lone = self._active == 0 and not self._jobs and self._alone(batch)
            self._active += 1
            return batch, lone

    def _alone(self, batch: list[_Job]) -> bool:
        """True when every declared caller already has its job in ``batch``, so waiting cannot add work.

        With no declared callers (plain :meth:`predict` users) nothing is known, and the worker waits.
        """
        return 0 < self._callers <= len(batch)

    def _run(self) -> None:
        while True:
            taken = self._take_batch()
            if taken is None:
                return
            batch, lone = taken
            try:
                live = [job for job in batch if job.future.set_running_or_notify_cancel()]
                if live:
                    self._serve(live, self._predict if lone else self._predict_shared)
            finally:
                with self._cond:
                    self._active -= 1

    def _serve(self, live: list[_Job], predict: PredictFn) -> None:
        """Run one model call for ``live`` jobs; any failure goes to their callers, never kills the worker.

        ``predict`` is the plain call for a batch that runs alone (all threads: the lowest latency),
        else the shared one (a stream of its own, beside other batches and other requests' post-processing).
        """
        try:
            tiles = np.concatenate([job.tiles for job in live]) if len(live) > 1 else live[0].tiles
            start = time.perf_counter()
            probs = predict(tiles)
            if self._on_batch:
                self._on_batch(len(tiles), time.perf_counter() - start)
        except BaseException as exc:
            for job in live:
                job.future.set_exception(exc)
            return
        offset = 0
        for job in live:
            job.future.set_result(probs[offset:offset + len(job.tiles)])
            offset += len(job.tiles)

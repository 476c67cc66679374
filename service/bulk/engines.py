"""Where the images of a run are segmented: in this process, on a running service, or on Dask.

Every engine runs the same :func:`process` per image (segment -> write its files -> write its
status record), so their outputs are the same files, byte for byte where the labels are. They
differ only in who calls it: this process one image after another; a thread pool posting to
``POST /segment`` (``--server``); or Dask workers (``service.bulk.cluster``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from service.bulk.inputs import Job
from service.bulk.outputs import Layout, Row
from service.client import Client
from service.decode import decode_image
from service.encode import labels_from_rle, rle_document
from service.model import SegmentationModel
from service.pipeline import SegmentOptions, segment
from service.postprocess import nucleus_probability

log = logging.getLogger("nuclei_seg.bulk")


@dataclass
class Segmented:
    """One image's result: its labels, (if read) the image, and the ``rle`` document's nucleus
    records, given by a server or measured on first use (so that measuring can run off the
    thread that runs the network)."""

    labels: np.ndarray
    image: np.ndarray | None
    nuclei: list[dict[str, Any]] | None = None
    probability: np.ndarray | None = None  # each nucleus' mean P(nucleus), for measuring here

    def records(self) -> list[dict[str, Any]]:
        if self.nuclei is None:
            self.nuclei = rle_document(self.labels, self.image, self.probability)["nuclei"]
        return self.nuclei


class Segmenter(Protocol):
    def __call__(self, source: Path) -> Segmented: ...


class LocalSegmenter:
    """Read, decode and segment with a model in this process: what ``POST /segment`` runs."""

    def __init__(self, model: SegmentationModel, options: SegmentOptions, max_pixels: int,
                 channel: int | None = None) -> None:
        self.model, self.options, self.max_pixels, self.channel = model, options, max_pixels, channel

    def __call__(self, source: Path) -> Segmented:
        image = decode_image(source.read_bytes(), max_pixels=self.max_pixels, channel=self.channel)
        result = segment(image, self.model, self.options)
        return Segmented(result.labels, image, probability=nucleus_probability(result.labels, result.probabilities))


class ServerSegmenter:
    """Post the file to a service and rebuild the labels from its RLE answer.

    The image is decoded here only when an output needs its pixels (the overlay).
    """

    def __init__(self, client: Client, params: dict[str, Any], need_image: bool, max_pixels: int) -> None:
        self.client, self.params, self.need_image, self.max_pixels = client, params, need_image, max_pixels

    def __call__(self, source: Path) -> Segmented:
        document = self.client.segment(source, format="rle", **self.params)
        labels = labels_from_rle(document["nuclei"], (document["height"], document["width"]))
        image = (decode_image(source.read_bytes(), max_pixels=self.max_pixels, channel=self.params.get("channel"))
                 if self.need_image else None)
        return Segmented(labels, image, document["nuclei"])


def process(job: Job, segmenter: Segmenter, layout: Layout) -> Row:
    """Segment one image and write its files, then its status record. Never raises for a bad
    image: the reason goes into the row, and the run goes on."""
    start = time.perf_counter()
    return finish(job, attempt(job, segmenter), layout, start)


def attempt(job: Job, segmenter: Segmenter) -> Segmented | Exception:
    """The image segmented, or why it could not be (corrupt, too large, unreadable, refused)."""
    try:
        return segmenter(job.source)
    except Exception as exc:  # the image's own failure: recorded, and the run goes on
        if not isinstance(exc, (ValueError, OSError, RuntimeError)):
            log.exception("%s: unexpected error", job.source)
        return exc


def finish(job: Job, result: Segmented | Exception, layout: Layout, start: float) -> Row:
    """Measure and write a segmented image's files, then its status record (the mark of done).

    Never raises for the image: a failure to measure or write (disk full, permissions, memory)
    becomes its row, so one image cannot end the run or lose the rows of those beside it.
    """
    try:
        layout.forget(job.key)
        if not isinstance(result, Exception):
            layout.write(job.key, result.labels, result.records(), result.image)
            row = Row.ok(job.key, job.source, result.records(), time.perf_counter() - start)
    except Exception as exc:
        log.warning("%s: outputs not written: %s", job.source, exc)
        result = exc
    if isinstance(result, Exception):
        row = Row.failed(job.key, job.source, f"{type(result).__name__}: {result}", time.perf_counter() - start)
    try:
        layout.record(row, job.source)
    except OSError as exc:  # the row still reaches summary.csv; a re-run redoes the image
        log.warning("%s: status record not written: %s", job.source, exc)
    return row


class Engine(Protocol):
    def run(self, jobs: list[Job], layout: Layout, stop: threading.Event) -> Iterator[Row]:
        """Each job's row as it finishes; stops submitting once ``stop`` is set."""
        ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class InProcess:
    """One image after another with the model loaded here; each image is measured and written on
    a second thread while the next one is segmented, so the files cost little wall time."""

    def __init__(self, model: SegmentationModel, options: SegmentOptions, max_pixels: int,
                 channel: int | None = None) -> None:
        self.model = model
        self.segmenter = LocalSegmenter(model, options, max_pixels, channel)

    def run(self, jobs: list[Job], layout: Layout, stop: threading.Event) -> Iterator[Row]:
        with ThreadPoolExecutor(1, thread_name_prefix="nuclei-seg-write") as writer:
            pending: deque[Future] = deque()
            for job in jobs:
                if stop.is_set():
                    break
                start = time.perf_counter()
                pending.append(writer.submit(finish, job, attempt(job, self.segmenter), layout, start))
                while pending and (pending[0].done() or len(pending) > 1):  # one image waits, at most
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def describe(self) -> dict[str, Any]:
        return {"engine": "in-process", "serving": self.model.serving()}

    def close(self) -> None:
        pass


class OnServer:
    """``concurrency`` images in flight at once against a service or a load balancer."""

    def __init__(self, client: Client, params: dict[str, Any], need_image: bool, max_pixels: int,
                 concurrency: int) -> None:
        self.client, self.concurrency = client, concurrency
        self.segmenter = ServerSegmenter(client, params, need_image, max_pixels)

    def run(self, jobs: list[Job], layout: Layout, stop: threading.Event) -> Iterator[Row]:
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="nuclei-seg-post")
        finished = False
        try:
            yield from bounded(jobs, lambda job: pool.submit(process, job, self.segmenter, layout),
                               lambda: 2 * self.concurrency, stop, layout, first_done)
            finished = True
        finally:  # stopped at once (a second Ctrl-C): drop what is queued, leave the posts in flight
            pool.shutdown(wait=finished, cancel_futures=not finished)

    def describe(self) -> dict[str, Any]:
        return {"engine": "server", "url": self.client.url, "concurrency": self.concurrency}

    def close(self) -> None:
        self.client.close()


def bounded(jobs: Iterable[Job], submit: Callable[[Job], Any], limit: Callable[[], int], stop: threading.Event,
            layout: Layout, first_done: Callable[[list[Any]], Iterable[Any]]) -> Iterator[Row]:
    """Rows of ``submit(job)`` futures as they finish, with at most ``limit()`` submitted and not
    finished, so that a stop leaves only those few to finish (not thousands queued).

    ``first_done(futures)`` blocks until at least one has finished and returns those that have:
    ``concurrent.futures.wait`` or ``distributed.wait``, so a thread pool and a Dask cluster share
    this one loop. A task that could not run at all (a Dask worker died, or has no model) becomes
    its image's failed row.
    """
    pending: dict[Any, Job] = {}
    queue = iter(jobs)
    while True:
        while not stop.is_set() and len(pending) < limit():
            job = next(queue, None)
            if job is None:
                break
            pending[submit(job)] = job
        if not pending:
            return
        for future in first_done(list(pending)):
            job = pending.pop(future)
            try:
                yield future.result()
            except Exception as exc:
                row = Row.failed(job.key, job.source, f"{type(exc).__name__}: {exc}", 0.0)
                layout.record(row, job.source)
                yield row


def first_done(futures: list[Future]) -> set[Future]:
    """The thread-pool futures of ``futures`` that have finished, waiting for one at least."""
    return wait(futures, return_when=FIRST_COMPLETED).done

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
    """One image's result: its labels, the ``rle`` document's nucleus records, and (if read) the image."""

    labels: np.ndarray
    nuclei: list[dict[str, Any]]
    image: np.ndarray | None


class Segmenter(Protocol):
    def __call__(self, source: Path) -> Segmented: ...


class LocalSegmenter:
    """Read, decode and segment with a model in this process: what ``POST /segment`` runs."""

    def __init__(self, model: SegmentationModel, options: SegmentOptions, max_pixels: int) -> None:
        self.model, self.options, self.max_pixels = model, options, max_pixels

    def __call__(self, source: Path) -> Segmented:
        image = decode_image(source.read_bytes(), max_pixels=self.max_pixels)
        result = segment(image, self.model, self.options)
        probability = nucleus_probability(result.labels, result.probabilities)
        return Segmented(result.labels, rle_document(result.labels, image, probability)["nuclei"], image)


class ServerSegmenter:
    """Post the file to a service and rebuild the labels from its RLE answer.

    The image is decoded here only when an output needs its pixels (the overlay).
    """

    def __init__(self, client: Client, params: dict[str, Any], need_image: bool, max_pixels: int) -> None:
        self.client, self.params, self.need_image, self.max_pixels = client, params, need_image, max_pixels

    def __call__(self, source: Path) -> Segmented:
        document = self.client.segment(source, format="rle", **self.params)
        labels = labels_from_rle(document["nuclei"], (document["height"], document["width"]))
        image = decode_image(source.read_bytes(), max_pixels=self.max_pixels) if self.need_image else None
        return Segmented(labels, document["nuclei"], image)


def process(job: Job, segmenter: Segmenter, layout: Layout) -> Row:
    """Segment one image and write its files, then its status record. Never raises for a bad
    image: the reason goes into the row, and the run goes on."""
    start = time.perf_counter()
    try:
        result = segmenter(job.source)
        layout.write(job.key, result.labels, result.nuclei, result.image)
        row = Row.ok(job.key, job.source, result.nuclei, time.perf_counter() - start)
    except Exception as exc:  # corrupt, too large, unreadable, refused by the server: the image's own failure
        if not isinstance(exc, (ValueError, OSError, RuntimeError)):
            log.exception("%s: unexpected error", job.source)
        row = Row.failed(job.key, job.source, f"{type(exc).__name__}: {exc}", time.perf_counter() - start)
    layout.record(row)
    return row


class Engine(Protocol):
    def run(self, jobs: list[Job], layout: Layout, stop: threading.Event) -> Iterator[Row]:
        """Each job's row as it finishes; stops submitting once ``stop`` is set."""
        ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class InProcess:
    """One image after another with the model loaded here."""

    def __init__(self, model: SegmentationModel, options: SegmentOptions, max_pixels: int) -> None:
        self.model = model
        self.segmenter = LocalSegmenter(model, options, max_pixels)

    def run(self, jobs: list[Job], layout: Layout, stop: threading.Event) -> Iterator[Row]:
        for job in jobs:
            if stop.is_set():
                return
            yield process(job, self.segmenter, layout)

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
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="nuclei-seg-post") as pool:
            yield from bounded(jobs, lambda job: pool.submit(process, job, self.segmenter, layout),
                               2 * self.concurrency, stop)

    def describe(self) -> dict[str, Any]:
        return {"engine": "server", "url": self.client.url, "concurrency": self.concurrency}

    def close(self) -> None:
        self.client.close()


def bounded(jobs: Iterable[Job], submit: Callable[[Job], Future], limit: int,
            stop: threading.Event) -> Iterator[Row]:
    """Rows of ``submit(job)`` futures as they finish, with at most ``limit`` submitted and not
    finished, so that a stop leaves only those few to finish (not thousands queued)."""
    pending: set[Future] = set()
    queue = iter(jobs)
    while True:
        while len(pending) < limit and not stop.is_set():
            job = next(queue, None)
            if job is None:
                break
            pending.add(submit(job))
        if not pending:
            return
        finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
        for future in finished:
            yield future.result()

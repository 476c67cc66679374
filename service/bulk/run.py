"""One run over a set of images: skip what is done, segment the rest, report progress, summarise.

A run holds a lock on its output folder (two runs writing the same files would race), removes
the temporary files a killed run left, and skips every image whose outputs are complete for the
same model and settings (``--overwrite`` redoes them). ``stop`` (set by Ctrl-C or SIGTERM) ends it
cleanly: no new image starts, those in flight finish, and ``summary.csv`` and ``run.json`` are
written with the rest marked ``pending``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata as package_metadata
from pathlib import Path
from typing import IO, Any

from service import __version__
from service.bulk.engines import Engine
from service.bulk.inputs import Job
from service.bulk.outputs import Layout, Row

log = logging.getLogger("nuclei_seg.bulk")

#: Metadata fields that identify a model, present both in metadata.json and in ``GET /model``.
MODEL_IDENTITY_FIELDS = ("inference", "postprocess", "validation_metrics", "training")
PACKAGES = ("numpy", "openvino", "tensorflow", "tensorflow-cpu", "scikit-image", "scipy", "pillow", "tifffile",
            "dask", "distributed", "httpx")


class RunLocked(RuntimeError):
    """Another run is writing to the same output folder."""


@dataclass
class Outcome:
    """How a run ended: counts for ``run.json``, the console and the exit status."""

    total: int = 0
    segmented: int = 0  # by this run
    failed: int = 0
    skipped: int = 0
    pending: int = 0
    interrupted: bool = False
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        return 130 if self.interrupted else 1 if self.failed else 0


def fingerprint(model_metadata: dict[str, Any], options: dict[str, Any]) -> str:
    """What makes two runs' outputs interchangeable: the model (by its metadata) and the options."""
    identity = {k: model_metadata.get(k) for k in MODEL_IDENTITY_FIELDS}
    text = json.dumps({"model": identity, "options": options}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_jobs(jobs: list[Job], layout: Layout, engine: Engine, stop: threading.Event, overwrite: bool = False,
             description: dict[str, Any] | None = None, stream: IO[str] | None = None) -> Outcome:
    """Segment ``jobs`` into ``layout`` with ``engine``; returns how it went (never raises for an image)."""
    layout.root.mkdir(parents=True, exist_ok=True)
    with locked(layout.root):
        if removed := layout.remove_stale_temporaries():
            log.info("removed %d temporary files left by an earlier run", removed)
        rows: dict[str, Row] = {}
        todo = []
        for job in jobs:
            row = None if overwrite else layout.done(job.key, job.source)
            if row is None:
                todo.append(job)
            else:
                rows[job.key] = row
        outcome = Outcome(total=len(jobs), skipped=len(rows))
        started = datetime.now(timezone.utc)
        run = {"nuclei_seg": __version__, "command": sys.argv, "started": started.isoformat(), "ended": None,
               **(description or {}), **engine.describe(), "packages": package_versions()}
        layout.write_run(run)
        clock = time.perf_counter()
        progress = Progress(len(todo), stream or sys.stdout)
        try:
            for row in engine.run(todo, layout, stop):
                rows[row.image] = row
                progress.update(row)
        finally:
            progress.close()
            outcome.interrupted = stop.is_set()
            outcome.seconds = round(time.perf_counter() - clock, 3)
            ordered = [rows.get(job.key) or Row(job.key, str(job.source), "pending") for job in jobs]
            layout.write_summary(ordered)
            outcome.segmented = sum(r.status == "ok" for r in ordered) - outcome.skipped
            outcome.failed = sum(r.status == "error" for r in ordered)
            outcome.pending = sum(r.status == "pending" for r in ordered)
            outcome.failures = [f"{r.image}: {r.error}" for r in ordered if r.status == "error"]
            layout.write_run({**run, "ended": datetime.now(timezone.utc).isoformat(), "outcome": asdict(outcome)})
    return outcome


@contextmanager
def locked(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``root/.lock`` for the run (released if the process dies)."""
    with open(root / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(f"{root}: another nuclei-seg run is writing to this folder") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that decide the results (those present)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = package_metadata.version(name)
        except package_metadata.PackageNotFoundError:
            continue
    return versions


class Progress:
    """A progress bar (images done, images/s, ETA) on a terminal; a plain line per image otherwise,
    so logs of batch jobs stay readable."""

    def __init__(self, total: int, stream: IO[str]) -> None:
        self.total, self.stream, self.done, self.failed = total, stream, 0, 0
        self.start = time.perf_counter()
        self.bar = None
        if total and stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", file=stream, dynamic_ncols=True, smoothing=0.1)

    def update(self, row: Row) -> None:
        self.done += 1
        self.failed += row.status == "error"
        if self.bar is not None:
            self.bar.update(1)
            if self.failed:
                self.bar.set_postfix(failed=self.failed, refresh=False)
            return
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        what = f"{row.count} nuclei" if row.status == "ok" else f"FAILED {row.error}"
        print(f"[{self.done}/{self.total}] {row.image}: {what} ({row.seconds:.2f} s; {rate:.2f} img/s, "
              f"ETA {eta:.0f} s)", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

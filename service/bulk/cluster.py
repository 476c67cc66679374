"""The Dask engine: images as tasks on a Dask distributed cluster (``--scheduler``, ``--dask-workers``).

Each worker loads the model once, when it joins (a worker plugin), not per task. Workers read
the inputs and write the outputs at the paths they are given, as on a cluster's shared storage,
through the same :func:`service.bulk.engines.process` as the in-process run: the same atomic
writes, the same status records, so resume works the same and the labels are identical.
Set-ups for SLURM (dask-jobqueue) and Kubernetes (dask-kubernetes) are in ``docs/scale-out.md``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distributed import Client, LocalCluster, WorkerPlugin, as_completed, get_worker

from service.bulk.engines import LocalSegmenter, process
from service.bulk.inputs import Job
from service.bulk.outputs import Layout, Row
from service.model import SegmentationModel
from service.pipeline import SegmentOptions
from service.runtime import RuntimeOptions, available_cpus

PLUGIN_NAME = "nuclei-seg-model"


class ModelPlugin(WorkerPlugin):
    """Loads the model on a worker once, for all the tasks it will run."""

    name = PLUGIN_NAME

    def __init__(self, model_dir: Path, runtime: RuntimeOptions, options: SegmentOptions, max_pixels: int,
                 channel: int | None = None) -> None:
        self.model_dir, self.runtime, self.options, self.max_pixels = model_dir, runtime, options, max_pixels
        self.channel = channel
        self.segmenter: LocalSegmenter | None = None

    def setup(self, worker: Any) -> None:
        model = SegmentationModel.load(self.model_dir, self.runtime)
        self.segmenter = LocalSegmenter(model, self.options, self.max_pixels, self.channel)

    def teardown(self, worker: Any) -> None:
        self.segmenter = None


def process_on_worker(job: Job, layout: Layout) -> Row:
    """The task: :func:`process` with the worker's own model."""
    return process(job, get_worker().plugins[PLUGIN_NAME].segmenter, layout)


class OnDask:
    """An existing scheduler (``scheduler``), or a local cluster of ``workers`` processes.

    On a local cluster each worker runs one task at a time with this machine's CPUs divided among
    the workers; on a remote one, ``runtime.threads`` 0 lets every worker use the CPUs it has.
    """

    def __init__(self, model_dir: Path, runtime: RuntimeOptions, options: SegmentOptions, max_pixels: int,
                 scheduler: str | None = None, workers: int = 1, channel: int | None = None) -> None:
        self.cluster = None
        if scheduler is None:
            threads = runtime.threads or max(1, available_cpus() // workers)
            runtime = RuntimeOptions(runtime.runtime, runtime.precision, threads, 1)
            self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                        dashboard_address=None, silence_logs=logging.ERROR)
        self.client = Client(scheduler or self.cluster)
        self.runtime = runtime
        self.client.register_plugin(ModelPlugin(model_dir, runtime, options, max_pixels, channel))

    def run(self, jobs: list[Job], layout: Layout, stop: threading.Event) -> Iterator[Row]:
        """Rows as tasks finish, with at most two tasks per worker thread submitted ahead, so a
        stop leaves only those to finish."""
        limit = 2 * max(1, sum(self.client.nthreads().values()))
        queue = iter(jobs)
        futures = as_completed()
        job_of = {}
        for job in queue:
            future = self.client.submit(process_on_worker, job, layout, pure=False)
            job_of[future.key] = job
            futures.add(future)
            if len(job_of) >= limit:
                break
        for future in futures:
            job = job_of.pop(future.key)
            try:
                yield future.result()
            except Exception as exc:  # the worker died (KilledWorker) or the task could not run
                row = Row.failed(job.key, job.source, f"{type(exc).__name__}: {exc}", 0.0)
                layout.record(row)
                yield row
            next_job = None if stop.is_set() else next(queue, None)
            if next_job is not None:
                future = self.client.submit(process_on_worker, next_job, layout, pure=False)
                job_of[future.key] = next_job
                futures.add(future)

    def describe(self) -> dict[str, Any]:
        info = self.client.scheduler_info()
        return {"engine": "dask", "scheduler": info.get("address"), "workers": len(info.get("workers", {})),
                "threads_per_task": self.runtime.threads, "local_cluster": self.cluster is not None}

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()

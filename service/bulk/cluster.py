"""The Dask engine: images as tasks on a Dask distributed cluster (``--scheduler``, ``--dask-workers``).

Each worker loads the model once, when it joins (a worker plugin), not per task. Workers read
the inputs and write the outputs at the paths they are given, as on a cluster's shared storage,
through the same :func:`service.bulk.engines.process` as the in-process run: the same atomic
writes, the same status records, so resume works the same and the labels are identical.
Set-ups for SLURM (dask-jobqueue) and Kubernetes (dask-kubernetes) are in ``docs/scale-out.md``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distributed import Client, LocalCluster, WorkerPlugin, get_worker, wait

from service.bulk.engines import LocalSegmenter, bounded, process
from service.bulk.inputs import Job
from service.bulk.outputs import Layout, Row
from service.model import SegmentationModel
from service.pipeline import SegmentOptions
from service.runtime import RuntimeOptions, available_cpus

PLUGIN_NAME = "nuclei-seg-model"


class ModelPlugin(WorkerPlugin):
    """Loads the model on a worker once, for all the tasks it will run.

    The client's model folder and runtime settings travel with the plugin; a worker whose own
    environment sets ``NUCLEI_MODEL_DIR``, ``NUCLEI_RUNTIME``, ``NUCLEI_PRECISION`` or
    ``NUCLEI_THREADS`` (a container image, a SLURM job script) uses its own instead.
    """

    name = PLUGIN_NAME

    def __init__(self, model_dir: Path, runtime: RuntimeOptions, options: SegmentOptions, max_pixels: int,
                 channel: int | None = None) -> None:
        self.model_dir, self.runtime, self.options, self.max_pixels = model_dir, runtime, options, max_pixels
        self.channel = channel
        self.segmenter: LocalSegmenter | None = None
        self.error = ""

    def setup(self, worker: Any) -> None:
        model_dir, runtime = worker_settings(self.model_dir, self.runtime)
        try:
            model = SegmentationModel.load(model_dir, runtime)
        except Exception as exc:  # every task then fails with this reason, not a TypeError
            self.error = f"{type(exc).__name__}: {exc}"
            return
        self.segmenter = LocalSegmenter(model, self.options, self.max_pixels, self.channel)

    def teardown(self, worker: Any) -> None:
        self.segmenter = None


def worker_settings(model_dir: Path, runtime: RuntimeOptions) -> tuple[Path, RuntimeOptions]:
    """The client's model folder and runtime, with what this worker's environment sets in their place."""
    env = os.environ
    model_dir = Path(env["NUCLEI_MODEL_DIR"]) if env.get("NUCLEI_MODEL_DIR") else model_dir
    return model_dir, RuntimeOptions(env.get("NUCLEI_RUNTIME") or runtime.runtime,
                                     env.get("NUCLEI_PRECISION") or runtime.precision,
                                     int(env["NUCLEI_THREADS"]) if env.get("NUCLEI_THREADS") else runtime.threads,
                                     1)


class Slots:
    """Two tasks per worker thread of the cluster, asked of the scheduler at most once a second
    (workers of a SLURM or Kubernetes cluster join while the run goes on)."""

    def __init__(self, client: Client) -> None:
        self.client, self.checked, self.value = client, 0.0, 2

    def __call__(self) -> int:
        if time.monotonic() - self.checked > 1.0:
            self.value = 2 * max(1, sum(self.client.nthreads().values()))
            self.checked = time.monotonic()
        return self.value


def process_on_worker(job: Job, layout: Layout) -> Row:
    """The task: :func:`process` with the worker's own model."""
    plugin = get_worker().plugins[PLUGIN_NAME]
    if plugin.segmenter is None:
        raise RuntimeError(f"the model could not be loaded on worker {get_worker().address}: {plugin.error}")
    return process(job, plugin.segmenter, layout)


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
            # Ctrl-C reaches the whole process group: the workers must ignore it, so that the images
            # in flight finish (the client decides when to stop); they inherit the ignored signal.
            main = threading.current_thread() is threading.main_thread()  # only it may set handlers
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
            try:
                self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                            dashboard_address=None, silence_logs=logging.ERROR)
            finally:
                if main:
                    signal.signal(signal.SIGINT, previous)
        self.client = Client(scheduler or self.cluster)
        self.runtime = runtime
        self.client.register_plugin(ModelPlugin(model_dir, runtime, options, max_pixels, channel))

    def run(self, jobs: list[Job], layout: Layout, stop: threading.Event) -> Iterator[Row]:
        """Rows as tasks finish, with at most two tasks per worker thread submitted ahead (counted
        again as workers join or leave), so a stop leaves only those to finish."""
        yield from bounded(jobs, lambda job: self.client.submit(process_on_worker, job, layout, pure=False),
                           Slots(self.client), stop, layout,
                           lambda futures: wait(futures, return_when="FIRST_COMPLETED").done)

    def describe(self) -> dict[str, Any]:
        info = self.client.scheduler_info()
        return {"engine": "dask", "scheduler": info.get("address"), "workers": len(info.get("workers", {})),
                "threads_per_task": self.runtime.threads, "local_cluster": self.cluster is not None}

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()

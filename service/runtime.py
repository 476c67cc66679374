"""The network runtimes: run the exported SavedModel with OpenVINO (the default) or TensorFlow.

Both read the same SavedModel folder (OpenVINO converts it itself at load), so there is no
second artefact to keep in step; an int8 model is the one exception, an IR written beside a copy
of the model by ``training.quantize`` and named in its ``metadata.json``. Either runtime is one
callable, ``network(batch) -> probabilities``, behind ``SegmentationModel.predict_now``, so
batching, deadlines and metrics do not know which one runs.

Threads are set before the runtime's first operation (TensorFlow refuses them afterwards), from
the CPUs this process may really use: its affinity and its cgroup quota (a container's
``--cpus``), divided among the server's worker processes.
"""

from __future__ import annotations

import logging
import math
import os
import queue
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import numpy as np

log = logging.getLogger("nuclei_seg")

Runtime = Literal["openvino", "tensorflow"]
Precision = Literal["auto", "f32", "bf16", "int8"]
RUNTIMES: tuple[str, ...] = get_args(Runtime)
PRECISIONS: tuple[str, ...] = get_args(Precision)
SIGNATURE = "serving_default"
CGROUP_ROOT = Path("/sys/fs/cgroup")


class RuntimeUnavailable(RuntimeError):
    """The runtime or precision asked for cannot run this model here (the message says why)."""


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run the network: which runtime, at which precision, on how many threads."""

    runtime: Runtime = "openvino"
    precision: Precision = "auto"  # auto: bf16 where the CPU computes it natively and the model passed parity, else f32
    threads: int = 0  # 0: the CPUs this process may use (see available_cpus), divided by ``workers``
    workers: int = 1
    streams: int = 1  # >1 (OpenVINO): also that many single-thread-share streams, for calls made while others
    #   run or requests are being post-processed; 0: one per thread. 1: every call on all threads

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, not {self.runtime!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.threads < 0 or self.workers < 1 or self.streams < 0:
            raise ValueError("threads and streams must be >= 0 and workers >= 1")

    def thread_count(self) -> int:
        """The threads one process's network gets: the setting, else its share of the CPUs it may use."""
        return self.threads or max(1, available_cpus() // self.workers)

    def stream_count(self) -> int:
        """Streams of the shared network: the setting, or (0) one per thread; never more than the threads."""
        threads = self.thread_count()
        return min(threads, self.streams or threads)


class Network(Protocol):
    """One compiled network: ``(N, H, W, 3) uint8 -> (N, H, W, C) float32`` probabilities."""

    runtime: str
    precision: str  # the precision it computes in (never "auto")
    threads: int  # the threads it really uses, read back from the runtime
    fixed_input: bool  # True: only the model's own input size; else any multiple of the grid
    streams: int  # calls :meth:`shared` may run at once (1: it is the plain call)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """One call on all the network's threads (the fastest for a lone request)."""

    def shared(self, batch: np.ndarray) -> np.ndarray:
        """One call on one stream's share of the threads; up to ``streams`` may run at once."""


def available_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: its affinity mask, capped by its cgroup CPU quota (rounded down, >= 1).

    ``os.cpu_count()`` reports the host's cores: in a container limited to 2 CPUs on a 64-core host
    it would start 64 threads that the quota then throttles.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity API
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota in CPUs (cgroup v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us``), or None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def load_network(model_dir: Path, metadata: dict[str, Any], options: RuntimeOptions) -> Network:
    """Compile the model in ``model_dir`` for ``options``; raise :class:`RuntimeUnavailable` when it cannot run so."""
    if options.runtime == "tensorflow":
        if options.precision not in ("auto", "f32"):
            raise RuntimeUnavailable(f"the tensorflow runtime computes in f32 only, not {options.precision} "
                                "(use NUCLEI_RUNTIME=openvino)")
        return TensorFlowNetwork(model_dir, options.thread_count())
    return OpenVINONetwork(model_dir, metadata, options.precision, options.thread_count(), options.stream_count())


def verified_precisions(metadata: dict[str, Any]) -> list[str]:
    """Precisions whose scores stayed within the parity gate of TensorFlow f32 (``training.parity --record``)."""
    return [name for name, result in parity_verdicts(metadata).items()
            if isinstance(result, dict) and result.get("passed")]


def parity_verdicts(metadata: dict[str, Any]) -> dict[str, Any]:
    """The parity gate's verdict per precision, as ``training.parity --record`` stored them (none: ``{}``)."""
    return (metadata.get("runtime") or {}).get("parity") or {}


class OpenVINONetwork:
    """The SavedModel compiled by OpenVINO for this CPU (bf16 on CPUs with AMX / AVX512-BF16)."""

    runtime = "openvino"

    def __init__(self, model_dir: Path, metadata: dict[str, Any], precision: str, threads: int,
                 streams: int = 1) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise RuntimeUnavailable("openvino is not installed (pip install openvino), "
                                "or use NUCLEI_RUNTIME=tensorflow") from None
        core = ov.Core()
        capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        self.precision = resolve_precision(precision, capabilities, metadata)
        model = core.read_model(str(self.source(model_dir, metadata)))
        # The hint also fixes what the ops outside int8 compute in; without it, OpenVINO would choose
        # bf16 on its own on a CPU that has it, and f32 would not mean f32.
        hint = "bf16" if self.precision == "bf16" else "f32"
        settings = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": hint}
        self._compiled = core.compile_model(model, "CPU", {**settings, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1})
        self._request = self._compiled.create_infer_request()
        self._output = self._compiled.output(0)
        self.threads = int(self._compiled.get_property("INFERENCE_NUM_THREADS"))
        self.streams = 1
        self._free: queue.SimpleQueue | None = None
        if streams > 1:  # the same threads again, split into streams that do not wait on one another
            shared = core.compile_model(model, "CPU", {**settings, "PERFORMANCE_HINT": "THROUGHPUT",
                                                       "NUM_STREAMS": streams})
            self.streams = int(shared.get_property("NUM_STREAMS"))
            self._free = queue.SimpleQueue()
            for _ in range(self.streams):
                self._free.put(shared.create_infer_request())
            self._shared_model = shared  # the requests need their compiled model alive
            self._shared_output = shared.output(0)
        shape = model.input(0).get_partial_shape()
        self.fixed_input = shape[1].is_static and shape[2].is_static

    def source(self, model_dir: Path, metadata: dict[str, Any]) -> Path:
        """The SavedModel folder, or for int8 the quantized IR that ``training.quantize`` wrote beside it."""
        if self.precision != "int8":
            return model_dir
        name = (metadata.get("openvino") or {}).get("int8")
        if not name or not (model_dir / name).is_file():
            raise RuntimeUnavailable(f"precision int8 needs a quantized model; {model_dir} has none "
                                "(python -m training.quantize --model DIR --data DIR --out DIR)")
        return model_dir / name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._request.infer({0: batch})[self._output]

    def shared(self, batch: np.ndarray) -> np.ndarray:
        """A call on a free stream: beside other calls, or beside the post-processing of other requests,
        a stream of its own share of the threads never waits for a thread that the OS gave to someone else."""
        if self._free is None:
            return self(batch)
        request = self._free.get()
        try:
            return request.infer({0: batch})[self._shared_output]  # a copy (share_outputs=False): the request is reused
        finally:
            self._free.put(request)


def resolve_precision(precision: str, capabilities: list[str], metadata: dict[str, Any]) -> str:
    """The precision ``auto`` means here: int8 for a quantized model whose int8 passed the parity gate
    (``training.parity`` records it in the metadata), else bf16 where the CPU computes it natively and
    the model passed the gate in bf16, else f32; others as asked, if possible."""
    if precision == "auto":
        verified = verified_precisions(metadata)
        if metadata.get("precision") == "int8" and "int8" in verified:  # a quantized copy (training.quantize)
            return "int8"
        if "BF16" in capabilities and "bf16" not in verified:  # say why a bf16 CPU runs f32, and the way out
            parity = parity_verdicts(metadata).get("bf16")
            log.warning("precision auto: f32, not bf16: %s (python -m training.parity --model MODEL --data DATA "
                        "--precision bf16 --record gates it on this CPU)",
                        "the model failed the bf16 parity gate" if parity else "the model's bf16 was never gated")
            return "f32"
        return "bf16" if "BF16" in capabilities else "f32"
    if precision == "bf16" and "BF16" not in capabilities:
        raise RuntimeUnavailable("this CPU has no native bf16 (AVX512-BF16 or AMX); use NUCLEI_PRECISION=f32 or auto")
    return precision


class TensorFlowNetwork:
    """The SavedModel's serving signature, run by TensorFlow in f32 (needs the ``train`` extra)."""

    runtime = "tensorflow"
    precision = "f32"
    streams = 1

    def __init__(self, model_dir: Path, threads: int) -> None:
        try:
            import tensorflow as tf
        except ImportError:
            raise RuntimeUnavailable("tensorflow is not installed (pip install -e '.[train]'), "
                                "or use NUCLEI_RUNTIME=openvino") from None
        set_tensorflow_threads(tf, threads)
        self.threads = tf.config.threading.get_intra_op_parallelism_threads()
        self._tf = tf
        self._loaded = tf.saved_model.load(str(model_dir))  # the signature needs its owner alive
        self._fn = self._loaded.signatures[SIGNATURE]
        self.fixed_input = _signature_is_fixed(self._fn)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        result = self._fn(images=self._tf.constant(batch, dtype=self._tf.uint8))
        return next(iter(result.values())).numpy()

    shared = __call__  # one TensorFlow call at a time: its own inter-op pool gains nothing on a few cores


def set_tensorflow_threads(tf: Any, threads: int) -> None:
    """One op at a time on ``threads`` cores (docs/threads.md); TensorFlow takes this only before its first op."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        current = tf.config.threading.get_intra_op_parallelism_threads()
        if current != threads:
            log.warning("TensorFlow was already running in this process with %s threads; "
                        "%s threads apply from the next start", current or "its default", threads)


def _signature_is_fixed(fn: Any) -> bool:
    """Whether the serving signature declares the image height (a fixed input size) or leaves it open."""
    try:
        return fn.structured_input_signature[1]["images"].shape[1] is not None
    except (AttributeError, IndexError, KeyError, TypeError):
        return True  # unknown: the model's own input size is always safe

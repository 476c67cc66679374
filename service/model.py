"""Load the exported SavedModel and run it: step three of the request path.

The SavedModel takes ``uint8`` RGB ``[N, H, W, 3]`` and returns class probabilities
``[N, H, W, C]``; its input scaling is inside it. ``metadata.json`` beside it says how to feed it
(resize or tile, tile size, normalisation, nucleus size) and how to decode its output.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.modality import MODALITIES, modality
from service.postprocess import PostprocessParams, check_decoder
from service.runtime import Network, RuntimeOptions, RuntimeUnavailable, load_network
from service.tiling import GRID

if TYPE_CHECKING:
    from service.batching import MicroBatcher

METADATA_FILE = "metadata.json"
SUPPORTED_FORMAT = 1


class ModelLoadError(RuntimeError):
    """The model folder is missing, corrupt or incompatible (the message names the path)."""


@dataclass(frozen=True)
class ModelSpec:
    """How to run a model, read from its ``metadata.json``."""

    image_size: int
    num_classes: int
    inference: str  # "resize" or "tile"
    normalise: str
    canonical_diameter: float | None
    tile_overlap: int
    postprocess: PostprocessParams
    metadata: dict[str, Any] = field(repr=False)
    #: Decodings tuned for one modality (``service.modality``) where its validation images chose other thresholds.
    postprocess_by_modality: dict[str, PostprocessParams] = field(default_factory=dict)

    def postprocess_for(self, image: np.ndarray) -> PostprocessParams:
        """The decoding for this (raw RGB) image: its modality's own where the model has one."""
        if not self.postprocess_by_modality:
            return self.postprocess
        return self.postprocess_by_modality.get(modality(image), self.postprocess)

    @property
    def tile_pixels(self) -> int:
        """Pixels of one tile of the model's input size: the unit of the per-call and queue budgets."""
        return self.image_size ** 2

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> "ModelSpec":
        if metadata.get("format_version") != SUPPORTED_FORMAT:
            raise ValueError(f"unsupported format_version {metadata.get('format_version')!r}")
        infer = metadata["inference"]
        spec = cls(
            image_size=int(metadata["input_size"]),
            num_classes=len(metadata["classes"]),
            inference=infer["mode"],
            normalise=infer["normalise"],
            canonical_diameter=infer.get("canonical_diameter"),
            tile_overlap=int(infer.get("tile_overlap", 32)),
            postprocess=PostprocessParams.from_dict(metadata.get("postprocess")),
            metadata=metadata,
            postprocess_by_modality={name: PostprocessParams.from_dict(params)
                                     for name, params in (metadata.get("postprocess_by_modality") or {}).items()},
        )
        for params in (spec.postprocess, *spec.postprocess_by_modality.values()):
            check_decoder(params, spec.num_classes)
        unknown = set(spec.postprocess_by_modality) - set(MODALITIES)
        if unknown:
            raise ValueError(f"postprocess_by_modality names unknown modalities {sorted(unknown)}; known: {MODALITIES}")
        return spec


class SegmentationModel:
    """One loaded model, shared by all requests of a process.

    ``predict`` is the single entry point to the network (either runtime, ``service.runtime``), so
    a batching layer can wrap it without touching callers. A plain call (:meth:`predict_now`) runs
    alone on all the network's threads; where the network has streams, :meth:`predict_shared` calls
    run side by side, each on its stream's share, and never beside a plain call: threads that
    outnumber the cores only thrash.
    """

    def __init__(self, model_dir: Path, spec: ModelSpec, network: Network | None) -> None:
        self.model_dir = model_dir
        self.spec = spec
        self.network = network
        self._gate = threading.Condition()
        self._running = 0  # shared calls in progress
        self._alone = False  # a plain call in progress
        self.batcher: MicroBatcher | None = None
        #: The network takes only ``image_size`` squares (resize-mode exports); else any multiple of ``GRID``.
        self.fixed_input = spec.inference == "resize" if network is None else network.fixed_input

    def serving(self) -> dict[str, Any]:
        """What runs the network: runtime, the precision it computes in, the threads it really uses, and its
        streams (calls that may run side by side while requests overlap)."""
        network = self.network
        return {"runtime": network.runtime, "precision": network.precision, "threads": network.threads,
                "streams": self.streams}

    def tile_limits(self, max_tile: int) -> tuple[int, int]:
        """(largest tile side, grid the side is rounded to) that this network accepts for ``max_tile``."""
        size = self.spec.image_size
        return (size, size) if self.fixed_input else (max_tile, GRID)

    @classmethod
    def without_network(cls, model_dir: Path | str) -> "SegmentationModel":
        """The model's spec and metadata alone (what its split or decoding needs), nothing compiled;
        :class:`ModelLoadError` with a one-line reason naming the path."""
        model_dir = Path(model_dir)
        meta_path = model_dir / METADATA_FILE
        if not model_dir.is_dir():
            raise ModelLoadError(f"model folder not found: {model_dir}")
        try:
            metadata = json.loads(meta_path.read_text())
            spec = ModelSpec.from_metadata(metadata)
        except FileNotFoundError:
            raise ModelLoadError(f"model metadata missing: {meta_path}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"model metadata invalid in {meta_path}: {exc}") from None
        return cls(model_dir, spec, None)

    @classmethod
    def load(cls, model_dir: Path | str, options: RuntimeOptions = RuntimeOptions()) -> "SegmentationModel":
        """Load, compile for ``options`` and validate; raise :class:`ModelLoadError` with a one-line
        reason naming the path."""
        spec, model_dir = cls.without_network(model_dir).spec, Path(model_dir)
        metadata = spec.metadata
        try:
            network = load_network(model_dir, metadata, options)
        except RuntimeUnavailable as exc:
            raise ModelLoadError(f"cannot run {model_dir}: {exc}") from None
        except Exception as exc:  # the runtimes raise many types for corrupt or foreign folders
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"cannot load SavedModel from {model_dir}: {reason}") from None
        model = cls(model_dir, spec, network)
        model._check_signature()
        return model

    def _check_signature(self) -> None:
        size = self.spec.image_size
        try:
            out = self.predict_now(np.zeros((1, size, size, 3), np.uint8))
        except Exception as exc:
            raise ModelLoadError(f"model in {self.model_dir} failed a test prediction: {exc}") from None
        if out.shape != (1, size, size, self.spec.num_classes):
            raise ModelLoadError(
                f"model in {self.model_dir} returned shape {out.shape}, metadata promises "
                f"(1, {size}, {size}, {self.spec.num_classes})"
            )

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """``(N, H, W, 3) uint8`` -> ``(N, H, W, C) float32`` class probabilities.

        Goes through the micro-batcher when one is attached (the server), straight to the
        network otherwise (evaluation, tests).
        """
        if self.batcher is not None:
            return self.batcher.predict(batch)
        return self.predict_now(batch)

    @property
    def streams(self) -> int:
        """How many :meth:`predict_shared` calls may run at once (1: they are plain calls)."""
        return getattr(self.network, "streams", 1)

    def predict_now(self, batch: np.ndarray) -> np.ndarray:
        """Run the network on ``batch`` in the calling thread, on all its threads, alone."""
        with self._gate:
            self._gate.wait_for(lambda: not self._alone and self._running == 0)
            self._alone = True
        try:
            return self.network(np.ascontiguousarray(batch, dtype=np.uint8))
        finally:
            with self._gate:
                self._alone = False
                self._gate.notify_all()

    def predict_shared(self, batch: np.ndarray) -> np.ndarray:
        """Run the network on ``batch`` on one of its streams, beside up to ``streams - 1`` other such calls."""
        if self.streams == 1:
            return self.predict_now(batch)
        with self._gate:
            self._gate.wait_for(lambda: not self._alone and self._running < self.streams)
            self._running += 1
        try:
            return self.network.shared(np.ascontiguousarray(batch, dtype=np.uint8))
        finally:
            with self._gate:
                self._running -= 1
                self._gate.notify_all()

    @contextmanager
    def request(self) -> Iterator[None]:
        """Mark one request in progress, so the batcher knows whether to wait for others' tiles."""
        if self.batcher is None:
            yield
            return
        with self.batcher.caller():
            yield

    def attach_batcher(self, batcher: "MicroBatcher | None") -> None:
        """Route :meth:`predict` through ``batcher`` (built on :meth:`predict_now`), or stop doing so."""
        self.batcher = batcher

    def warm(self, repeats: int = 2) -> None:
        """Run the shapes requests will use, so the first request does not pay for tracing.

        The network on all threads only: the streams allocate their buffers (about 40 MB each at 256x256
        in f32) when requests first overlap, so a server that never sees concurrency never pays for them.
        """
        size = self.spec.image_size
        for _ in range(repeats):
            self.predict_now(np.zeros((1, size, size, 3), np.uint8))


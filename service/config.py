"""All service settings in one typed place, read from ``NUCLEI_*`` environment variables.

The CLI flags of ``nuclei-serve`` override the same fields, so there is exactly one list of knobs.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.pipeline import SegmentOptions
from service.runtime import Precision, Runtime, RuntimeOptions
from service.tiling import DEFAULT_MAX_TILE, check_max_tile


def default_model_dir() -> Path:
    """The model shipped with the repository: beside the source tree, else ``./models/default``.

    The first works from a clone (editable install); the second when the package was installed
    into site-packages and the command runs from the clone's root.
    """
    beside_source = Path(__file__).resolve().parent.parent / "models" / "default"
    in_cwd = Path.cwd() / "models" / "default"
    return beside_source if beside_source.is_dir() or not in_cwd.is_dir() else in_cwd


DEFAULT_MODEL_DIR = default_model_dir()


class Settings(BaseSettings):
    """Runtime configuration of the HTTP service (env prefix ``NUCLEI_``)."""

    model_config = SettingsConfigDict(env_prefix="NUCLEI_", protected_namespaces=())

    host: str = Field("127.0.0.1", description="Interface to bind.")
    port: int = Field(8000, ge=1, le=65535, description="TCP port.")
    workers: int = Field(1, ge=1, description="Uvicorn worker processes (each loads the model once).")
    model_dir: Path = Field(DEFAULT_MODEL_DIR, description="Exported SavedModel folder with metadata.json.")
    max_upload_bytes: int = Field(50 * 1024 * 1024, ge=1, description="Largest accepted upload, in bytes.")
    max_pixels: int = Field(50_000_000, ge=1, description="Largest accepted image, in pixels (declared size).")
    max_batch_files: int = Field(64, ge=1, description="Most files accepted by /segment/batch.")
    tile_batch_size: int = Field(8, ge=1, description="Pixels one request hands to the model at a time, in tiles "
                                 "of the model's input size; bounds memory.")
    max_tile_size: int = Field(DEFAULT_MAX_TILE, description="Largest tile side (px, a multiple of 32). Tiles are sized to the image "
                               "up to it, so less is computed twice in overlaps; the batch shrinks to the same pixels.")
    batch_max_size: int = Field(8, ge=1, description="Most tiles in one model call (dynamic batching), counted in "
                                "tiles of the model's input size.")
    batch_max_wait_ms: float = Field(2.0, ge=0, description="How long a model call waits for more tiles to batch.")
    max_queue_tiles: int = Field(256, ge=1, description="Tiles (of the model's input size) allowed to wait for the "
                                 "model; beyond it, 503.")
    request_timeout_s: float = Field(120.0, gt=0, description="Per-request time limit; beyond it, 504 and the work is dropped.")
    runtime: Runtime = Field(
        "openvino", description="Network runtime: openvino (fast on CPUs, the default) or tensorflow (needs the train extra).")
    precision: Precision = Field(
        "auto", description="Network precision (openvino): auto is bf16 where the CPU computes it natively and the "
        "model passed the parity gate in bf16, else f32; int8 needs a model from training.quantize.")
    threads: int = Field(0, ge=0, description="Threads for the network in each worker (0: the CPUs this process may use, "
                         "affinity and cgroup quota, divided by the workers).")
    streams: int = Field(2, ge=0, description="OpenVINO: besides the network on all its threads (for a request "
                         "alone), compile it as this many streams that split those threads, for model calls made "
                         "while other requests are in progress (at most one per thread; 0: one per thread; 1: "
                         "none, every call on all threads). 2 served 1.01-1.18x the images/s of 1 at "
                         "concurrency 8 and the same at 1 on 2 cores (docs/performance.md).")
    api_key: str | None = Field(None, description="If set, /segment* require 'Authorization: Bearer KEY' or 'X-API-Key: KEY'.")
    cors_origins: list[str] = Field(default_factory=list, description="Allowed CORS origins (none: CORS off).")
    log_level: str = Field("info", description="Uvicorn log level.")

    def runtime_options(self) -> RuntimeOptions:
        """The network's runtime settings, as ``SegmentationModel.load`` takes them."""
        return RuntimeOptions(self.runtime, self.precision, self.threads, self.workers, self.streams)

    def segment_options(self, tiling: bool | None = None, tta: bool = False, min_size: int | None = None,
                        diameter: float | None = None, prob_thresh: float | None = None,
                        seed_thresh: float | None = None) -> SegmentOptions:
        """The pipeline options of one image, the same for /segment, /segment/batch and ``nuclei-seg segment``."""
        return SegmentOptions(tiling=tiling, tta=tta, min_size=min_size, diameter=diameter, prob_thresh=prob_thresh,
                              seed_thresh=seed_thresh, tile_batch_size=self.tile_batch_size,
                              max_tile_size=self.max_tile_size)

    @field_validator("max_tile_size")
    @classmethod
    def _max_tile_on_the_grid(cls, side: int) -> int:
        return check_max_tile(side)


def get_settings() -> Settings:
    """Settings from the environment (a function so tests and the CLI can build fresh ones)."""
    return Settings()

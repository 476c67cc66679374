"""The HTTP API: FastAPI app that segments uploaded microscopy images.

The app only does HTTP: reading uploads within limits, mapping errors to status codes and
choosing the encoding. The work itself is ``service.pipeline`` (decode -> normalise -> model ->
post-process) and ``service.encode``, run off the event loop in a worker thread.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import replace
from enum import Enum
from pathlib import PurePath
from typing import Annotated, Any, AsyncIterator

import numpy as np
from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service import __version__
from service.config import Settings, get_settings
from service.decode import DecodeError, TooLargeError, decode_image
from service.docs import install_docs
from service.schemas import BatchItem, ErrorDetail, Health, ModelInfo, Readiness, RleDocument
from service.encode import (geojson_bytes, imagej_roi_zip, labels_png, mask_png, overlay_png, rle_document,
                            submission_csv)
from service.batching import MicroBatcher, Overloaded
from service.metrics import Metrics
from service.page import install_page
from service.model import SegmentationModel
from service.pipeline import THRESHOLD_RANGE, DeadlineExceeded, SegmentOptions, SizeError, segment
from service.size import DIAMETER_RANGE
from service.postprocess import nucleus_probability
from service.tiling import ImageShapeError

log = logging.getLogger("nuclei_seg")


class MaskFormat(str, Enum):
    png = "png"
    labels = "labels"
    rle = "rle"
    overlay = "overlay"
    geojson = "geojson"
    imagej_roi = "imagej-roi"


class BatchFormat(str, Enum):
    json = "json"
    csv = "csv"


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "An API key is configured and the request did not carry it."},
    413: {"description": "Upload over the byte limit, or image over the pixel limit (decompression bombs included)."},
    415: {"description": "The upload is not an image format we read (PNG, JPEG, TIFF, BMP, GIF, WebP)."},
    422: {"description": "Corrupt, truncated or empty image, unsupported channel layout, or invalid parameters."},
    503: {"description": "The model is not loaded yet, or the server is busy (retry after `Retry-After` seconds)."},
    504: {"description": "The request took longer than the configured time limit."},
}
for _response in ERROR_RESPONSES.values():  # every error body is {"detail": str}
    _response["model"] = ErrorDetail
PNG_RESPONSE = {"content": {"image/png": {}}, "description": "PNG image of the input's height and width."}
RLE_EXAMPLE = {
    "height": 256, "width": 320, "count": 1,
    "nuclei": [{"id": 1, "rle": "5130 6 5386 8 5642 8", "area": 22, "bbox": [9, 20, 17, 23],
                "centroid": [12.23, 21.09], "perimeter": 16.2, "eccentricity": 0.61, "solidity": 0.95,
                "mean_intensity": 187.3, "nucleus_probability": 0.9412}],
}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load (unless injected) and warm the model once per process, attach the batcher, then serve."""
    settings: Settings = app.state.settings
    if app.state.model is None:
        app.state.model = await run_in_threadpool(SegmentationModel.load, settings.model_dir, settings.runtime_options())
    model: SegmentationModel = app.state.model
    await run_in_threadpool(model.warm)
    batcher = MicroBatcher(model.predict_now, settings.batch_max_size, settings.batch_max_wait_ms,
                           settings.max_queue_tiles, on_batch=app.state.metrics.observe_batch,
                           unit_pixels=model.spec.tile_pixels, predict_shared=model.predict_shared,
                           workers=model.streams)
    model.attach_batcher(batcher)
    app.state.ready = True
    log.info("model %s loaded and warmed (%s)", model.model_dir, model.serving())
    if not settings.api_key:
        log.warning("no API key set (NUCLEI_API_KEY): the service is open to every client")
    try:
        yield
    finally:
        app.state.ready = False
        model.attach_batcher(None)
        batcher.close()
        app.state.metrics.close()


def create_app(settings: Settings | None = None, model: SegmentationModel | None = None) -> FastAPI:
    """Build the app; tests and the CLI inject settings and (optionally) an already loaded model."""
    app = FastAPI(
        title="nuclei-seg",
        version=__version__,
        summary="Find cell nuclei in microscopy images: masks, instance labels, run-length encodings.",
        description=(
            "Upload an image (PNG, JPEG, TIFF incl. 16-bit and float, BMP, GIF, WebP) to `POST /segment`. "
            "Nuclei come back as a binary mask, a 16-bit instance label image, an outline overlay, or "
            "DSB2018 run-length encodings with per-nucleus measurements."
        ),
        lifespan=lifespan,
        docs_url=None,  # service.docs serves /docs and /redoc without CDNs
        redoc_url=None,
    )
    app.state.settings = settings = settings or get_settings()
    app.state.model = model
    app.state.ready = False
    app.state.metrics = Metrics()
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"])
    app.add_middleware(BodyLimitMiddleware, settings=settings)
    app.add_middleware(MetricsMiddleware, app_state=app.state)
    _install_error_handlers(app)
    _install_routes(app)
    install_page(app)
    install_docs(app)
    return app


class BodyLimitMiddleware:
    """Refuse request bodies over the upload limits, declared or streamed (chunked), with 413.

    A declared Content-Length over the limit is refused before anything is read; a streamed
    body is counted as it arrives and parsing stops at the limit, so a huge chunked upload never
    reaches the disk.
    """

    OVERHEAD = 1 << 20  # multipart boundaries and headers

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def limit(self, path: str) -> int:
        files = self.settings.max_batch_files if path.endswith("/batch") else 1
        return files * self.settings.max_upload_bytes + self.OVERHEAD

    def describe(self, path: str) -> str:
        """The route's limit in words: bytes, MB and how it is made up."""
        limit = self.limit(path)
        files = self.settings.max_batch_files if path.endswith("/batch") else 1
        images = f"{files} images of at most {{}} bytes each" if files > 1 else "one image of at most {} bytes"
        return (f"the upload limit of {limit} bytes ({limit / 1e6:.1f} MB) for POST {path}: "
                f"{images.format(self.settings.max_upload_bytes)} plus {self.OVERHEAD} bytes for the multipart framing")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        limit = self.limit(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await JSONResponse(status_code=413, content={
                "detail": f"request body of {int(declared)} bytes exceeds {self.describe(scope['path'])}"})(
                scope, receive, send)
            return
        received = 0

        async def counted_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(status_code=413, detail=(
                    f"request body exceeds {self.describe(scope['path'])} (stopped reading at {received} bytes)"))
            return message

        await self.app(scope, counted_receive, send)


class MetricsMiddleware:
    """Count every HTTP request by route and status, time it, and sample the queue depth.

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's ``BaseHTTPMiddleware`` runs
    each request's app in a task of its own and streams its body through memory channels, CPU a
    busy 2-core server takes from the model.
    """

    def __init__(self, app: Any, app_state: Any) -> None:
        self.app = app
        self.state = app_state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # unless a response starts: an exception that escapes is a server error

        async def send_recorded(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_recorded)
        finally:
            metrics: Metrics = self.state.metrics
            path = getattr(scope.get("route"), "path", "unmatched")  # the router records the matched route
            metrics.requests.labels(path, str(status)).inc()
            metrics.latency.labels(path).observe(time.perf_counter() - start)
            metrics.queue_depth.set(_queued(self.state))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        messages = [validation_message(e) for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": "; ".join(messages) or "invalid request"})

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse(status_code=500, content={"detail": "internal error"})


#: What to tell a client that left out a multipart field (e.g. sent ``files`` to /segment).
MULTIPART_HINTS = {
    "file": "send the image as multipart form field 'file'",
    "files": "send the images as repeated multipart form fields 'files'",
}


def validation_message(error: dict[str, Any]) -> str:
    """One validation error as ``field: message``; a missing body field names the field to send."""
    loc = tuple(error.get("loc", ()))
    message = f"{'.'.join(str(p) for p in loc if p != 'body')}: {error.get('msg')}"
    if error.get("type") == "missing" and len(loc) == 2 and loc[0] == "body":
        name = str(loc[1])
        message += f" ({MULTIPART_HINTS.get(name, f'send multipart form field {name!r}')})"
    return message


def _queued(state: Any) -> int:
    """Tiles waiting for the model (``state``: the app's ``app.state``)."""
    model = state.model
    return model.batcher.queued_tiles if model is not None and model.batcher is not None else 0


def require_api_key(request: Request) -> None:
    """Dependency: when an API key is configured, demand it (constant-time comparison)."""
    key = request.app.state.settings.api_key
    if not key:
        return
    supplied = request.headers.get("x-api-key") or ""
    auth = request.headers.get("authorization") or ""
    if auth.lower().startswith("bearer "):
        supplied = supplied or auth[7:].strip()
    if not hmac.compare_digest(supplied.encode(), key.encode()):
        raise HTTPException(status_code=401, detail="missing or wrong API key",
                            headers={"WWW-Authenticate": "Bearer"})


def get_model(request: Request) -> SegmentationModel:
    """Dependency: the process's model, or 503 while it is not ready."""
    if not request.app.state.ready or request.app.state.model is None:
        raise HTTPException(status_code=503, detail="model not loaded yet")
    return request.app.state.model


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


ModelDep = Annotated[SegmentationModel, Depends(get_model)]
AuthDep = Annotated[None, Depends(require_api_key)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]


async def read_upload(upload: UploadFile, settings: Settings) -> bytes:
    """The upload's bytes, refusing more than ``max_upload_bytes`` (413) and empty files (422)."""
    data = await upload.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise HTTPException(status_code=413, detail=f"upload exceeds the limit of {settings.max_upload_bytes} bytes")
    if not data:
        raise HTTPException(status_code=422, detail="empty upload: the file has no bytes")
    return data


def decode_or_raise(data: bytes, settings: Settings, name: str | None, channel: int | None = None) -> np.ndarray:
    """Decode upload bytes, turning decoder errors into HTTP errors that name the file."""
    prefix = f"{name}: " if name else ""
    try:
        return decode_image(data, max_pixels=settings.max_pixels, channel=channel)
    except TooLargeError as exc:
        raise HTTPException(status_code=413, detail=prefix + str(exc)) from None
    except DecodeError as exc:
        raise HTTPException(status_code=415 if exc.unsupported_type else 422, detail=prefix + str(exc)) from None


def run_segmentation(data: bytes, name: str | None, model: SegmentationModel, settings: Settings,
                     options: SegmentOptions, metrics: Metrics,
                     channel: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """decode -> segment, in a worker thread; returns (image, labels, each nucleus' mean P(nucleus))."""
    image = decode_or_raise(data, settings, name, channel)
    with model.request():
        result = segment(image, model, options)
    metrics.images.inc()
    metrics.megapixels.inc(image.shape[0] * image.shape[1] / 1e6)
    return image, result.labels, nucleus_probability(result.labels, result.probabilities)


async def segment_upload(request: Request, data: bytes, name: str | None, model: SegmentationModel,
                         options: SegmentOptions, channel: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run :func:`run_segmentation` off the event loop within the request time limit.

    Overload (full model queue) is 503 with Retry-After; running out of time is 504, and the
    deadline in ``options`` makes the worker thread drop its remaining model calls.
    """
    settings: Settings = request.app.state.settings
    timeout = settings.request_timeout_s
    options = replace(options, deadline=time.monotonic() + timeout)
    try:
        return await asyncio.wait_for(
            run_in_threadpool(run_segmentation, data, name, model, settings, options, request.app.state.metrics,
                              channel),
            timeout)
    except Overloaded:
        raise HTTPException(status_code=503, detail="server busy: too much work queued, retry shortly",
                            headers={"Retry-After": "1"}) from None
    except (asyncio.TimeoutError, DeadlineExceeded):
        raise HTTPException(status_code=504, detail=f"request took longer than {timeout:g} s") from None
    except (ImageShapeError, SizeError) as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None


#: The ``diameter`` query parameter, shared by /segment and /segment/batch.
DIAMETER_QUERY = Query(ge=DIAMETER_RANGE[0], le=DIAMETER_RANGE[1], description=(
    "Typical nucleus diameter in pixels of the uploaded image (as Cellpose's diameter). The image is "
    "rescaled once so its nuclei reach the model's canonical size; nothing is estimated. Default: "
    "estimated from the image (reliable from about 10 to 80 px); give it for very large or very small "
    "nuclei, e.g. images from 60x-100x objectives."))


#: The ``channel`` query parameter, shared by /segment and /segment/batch.
CHANNEL_QUERY = Query(ge=0, le=1023, description=(
    "The nuclear channel (0-based) of a multi-channel image (channels last, an ImageJ hyperstack, "
    "OME-TIFF), or the page of a multi-page file; the chosen plane is segmented as gray. Required "
    "for such images (without it they are refused with 422 naming what was found); gray, RGB and "
    "RGBA images need none. Z-stacks and time series are refused: this is a 2D model."))
PROB_THRESH_QUERY = Query(ge=THRESHOLD_RANGE[0], le=THRESHOLD_RANGE[1], description=(
    "Foreground threshold: pixels whose P(nucleus) is above it belong to a nucleus (like StarDist's "
    "prob_thresh). Lower finds dimmer nuclei and makes them larger. Default: the model's tuned value "
    "(GET /model, postprocess.foreground_threshold, per modality in postprocess_by_modality)."))
SEED_THRESH_QUERY = Query(ge=THRESHOLD_RANGE[0], le=THRESHOLD_RANGE[1], description=(
    "Seed threshold: P(nucleus interior) above it starts a nucleus. Higher merges touching nuclei that "
    "were split, lower splits clumps. Default: the model's tuned value (postprocess.seed_threshold)."))


def image_id(filename: str | None, index: int) -> str:
    """DSB2018 ImageId: the file's base name without extension (never a path)."""
    base = PurePath((filename or "").replace("\\", "/")).name
    return PurePath(base).stem or f"image_{index}"


def _install_routes(app: FastAPI) -> None:
    @app.get("/healthz", tags=["health"], summary="Liveness: the process is up.",
             response_model=None, responses={200: {"model": Health}})
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="Readiness: 200 once the model is loaded and warmed, else 503.",
             responses={200: {"model": Readiness, "description": "Ready: `{\"ready\": true}`."},
                        503: {"model": Readiness, "description": "Not ready yet: `{\"ready\": false}`."}})
    async def readyz(request: Request) -> JSONResponse:
        ready = bool(request.app.state.ready)
        return JSONResponse(status_code=200 if ready else 503, content={"ready": ready})

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics.", response_class=PlainTextResponse)
    async def metrics(request: Request, _: AuthDep) -> Response:
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/model", tags=["model"], summary="The served model's metadata.json plus the service version.",
             response_model=None, responses={200: {"model": ModelInfo}, 401: ERROR_RESPONSES[401],
                                             503: ERROR_RESPONSES[503]})
    async def model_info(model: ModelDep, _: AuthDep) -> dict[str, Any]:
        return {"service_version": __version__, **public_metadata(model.spec.metadata), "serving": model.serving()}

    @app.post(
        "/segment",
        tags=["segment"],
        summary="Segment the nuclei of one image.",
        response_class=Response,
        responses={
            200: {"content": {"image/png": {}, "application/json": {"example": RLE_EXAMPLE},
                              "application/geo+json": {}, "application/zip": {}}, "model": RleDocument,
                  "description": "png/labels/overlay: a PNG of the input's size; rle: JSON (example); geojson: a "
                                 "GeoJSON FeatureCollection of nucleus polygons; imagej-roi: a zip of ImageJ ROIs."},
            **ERROR_RESPONSES,
        },
    )
    async def segment_image(
        request: Request,
        _: AuthDep,
        model: ModelDep,
        settings: SettingsDep,
        file: Annotated[UploadFile, File(description="The image (PNG, JPEG, TIFF, BMP, GIF or WebP).")],
        format: Annotated[MaskFormat, Query(description=(
            "png: binary mask 0/255; labels: 16-bit instance labels 0..N; overlay: the image with "
            "nuclei outlined; rle: JSON with DSB2018 run-length encodings and measurements; geojson: a "
            "FeatureCollection of nucleus polygons (x, y pixels) with measurements, as QuPath imports "
            "detections; imagej-roi: a zip of ImageJ polygon ROIs for Fiji's ROI Manager."))] = MaskFormat.png,
        tiling: Annotated[bool | None, Query(description=(
            "Native-resolution sliding-window tiles (true) or resize to the model input (false, the "
            "reference method). Default: the model's own mode."))] = None,
        tta: Annotated[bool, Query(description="Test-time flips: average 4 flipped predictions (4x slower).")] = False,
        min_size: Annotated[int | None, Query(ge=0, le=1_000_000, description=(
            "Drop nuclei smaller than this many pixels. Default: the model's tuned value."))] = None,
        diameter: Annotated[float | None, DIAMETER_QUERY] = None,
        channel: Annotated[int | None, CHANNEL_QUERY] = None,
        prob_thresh: Annotated[float | None, PROB_THRESH_QUERY] = None,
        seed_thresh: Annotated[float | None, SEED_THRESH_QUERY] = None,
    ) -> Response:
        data = await read_upload(file, settings)
        options = settings.segment_options(tiling, tta, min_size, diameter, prob_thresh, seed_thresh)
        image, labels, probability = await segment_upload(request, data, file.filename, model, options, channel)
        return await run_in_threadpool(encode_response, image, labels, format, probability)

    @app.post(
        "/segment/batch",
        tags=["segment"],
        summary="Segment several images: JSON list of RLE documents, or the DSB2018 submission CSV.",
        response_class=Response,
        responses={200: {"content": {"application/json": {}, "text/csv": {}}, "model": list[BatchItem],
                         "description": "json: list of rle documents with `filename`; csv: ImageId,EncodedPixels."},
                   **ERROR_RESPONSES},
    )
    async def segment_batch(
        request: Request,
        _: AuthDep,
        model: ModelDep,
        settings: SettingsDep,
        files: Annotated[list[UploadFile], File(description="The images, as repeated `files` fields.")],
        format: Annotated[BatchFormat, Query(description="json (default) or csv (DSB2018 submission).")] = BatchFormat.json,
        tiling: Annotated[bool | None, Query(description="As for /segment.")] = None,
        tta: Annotated[bool, Query(description="As for /segment.")] = False,
        min_size: Annotated[int | None, Query(ge=0, le=1_000_000, description="As for /segment.")] = None,
        diameter: Annotated[float | None, DIAMETER_QUERY] = None,
        channel: Annotated[int | None, CHANNEL_QUERY] = None,
        prob_thresh: Annotated[float | None, PROB_THRESH_QUERY] = None,
        seed_thresh: Annotated[float | None, SEED_THRESH_QUERY] = None,
    ) -> Response:
        if len(files) > settings.max_batch_files:
            raise HTTPException(status_code=413, detail=f"{len(files)} files; at most {settings.max_batch_files} per batch")
        options = settings.segment_options(tiling, tta, min_size, diameter, prob_thresh, seed_thresh)
        documents = []
        for index, upload in enumerate(files):  # one image in memory at a time
            data = await read_upload(upload, settings)
            image, labels, probability = await segment_upload(request, data, upload.filename, model, options, channel)
            document = await run_in_threadpool(rle_document, labels, image, probability)
            documents.append((image_id(upload.filename, index), {"filename": upload.filename, **document}))
        if format is BatchFormat.csv:
            return PlainTextResponse(submission_csv(documents), media_type="text/csv")
        return JSONResponse([doc for _, doc in documents])


PUBLIC_METADATA = ("format_version", "input_size", "input", "output", "classes", "inference", "postprocess",
                   "training_config", "training", "validation_metrics", "tensorflow_version", "keras_version")


def public_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """What clients may see of metadata.json: no file paths, commit ids or image ids."""
    public = {k: metadata[k] for k in PUBLIC_METADATA if k in metadata}
    config = dict(public.get("training_config", {}))
    if config.get("encoder_weights") not in (None, "imagenet", "none"):
        config["encoder_weights"] = "file"
    public["training_config"] = config
    split = metadata.get("split", {})
    public["split"] = {k: split[k] for k in ("seed", "val_fraction") if k in split}
    data = metadata.get("data", {})
    public["data"] = {k: data[k] for k in ("fingerprint", "images", "licences") if k in data}
    if data.get("sources"):  # every training source with its licence: users must know what they may do
        public["data"]["sources"] = [{k: source[k] for k in ("name", "images", "licence") if k in source}
                                     for source in data["sources"]]
    return public


def encode_response(image: np.ndarray, labels: np.ndarray, fmt: MaskFormat,
                    probability: np.ndarray | None = None) -> Response:
    """Encode labels in the requested format (``probability``: each nucleus' mean P(nucleus), for rle)."""
    if fmt is MaskFormat.rle:
        return JSONResponse(rle_document(labels, image, probability))
    if fmt is MaskFormat.geojson:
        nuclei = rle_document(labels, image, probability)["nuclei"]
        return Response(content=geojson_bytes(labels, nuclei), media_type="application/geo+json")
    if fmt is MaskFormat.imagej_roi:
        return Response(content=imagej_roi_zip(labels), media_type="application/zip",
                        headers={"Content-Disposition": 'attachment; filename="nuclei-rois.zip"'})
    if fmt is MaskFormat.labels:
        try:
            body = labels_png(labels)
        except ValueError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
    elif fmt is MaskFormat.overlay:
        body = overlay_png(image, labels)
    else:
        body = mask_png(labels)
    return Response(content=body, media_type="image/png")


"""Response models: what the endpoints' JSON bodies look like, for the OpenAPI schema.

These are documentation only. The endpoints build their bodies as plain dicts
(``service.encode.rle_document``, ``nuclei_records``) and return them as ``Response`` /
``JSONResponse`` objects, so nothing here runs on the request path; a test validates a real
``format=rle`` response against :class:`RleDocument` to keep the two in step.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field


class Nucleus(BaseModel):
    """One nucleus of a ``format=rle`` document; measurements are scikit-image ``regionprops``'."""

    id: int = Field(ge=1, description="The nucleus' label: its value in the `labels` image (1..N).")
    rle: str = Field(description=(
        "DSB2018 run-length encoding of the nucleus' pixels: space-separated `start length` pairs, "
        "pixel numbers 1-based and counted column-major (down the first column, then the next)."))
    area: int = Field(ge=1, description="Pixels in the nucleus.")
    bbox: Annotated[list[int], Field(min_length=4, max_length=4, description=(
        "Bounding box `[min_row, min_col, max_row, max_col]` in pixels, max exclusive."))]
    centroid: Annotated[list[float], Field(min_length=2, max_length=2, description=(
        "Centre of mass `[row, col]` in pixels."))]
    perimeter: float = Field(ge=0, description=(
        "Perimeter in pixels: scikit-image's 4-connected weighted estimate of the border length."))
    eccentricity: float = Field(ge=0, le=1, description=(
        "Eccentricity of the ellipse with the same second moments: 0 a circle, towards 1 elongated."))
    solidity: float = Field(ge=0, le=1, description="Area / area of the nucleus' (pixel) convex hull.")
    mean_intensity: float | None = Field(ge=0, le=255, description=(
        "Mean gray level (0-255) over the nucleus of the decoded 8-bit image (the mean of its RGB "
        "channels); null when no image was measured."))
    nucleus_probability: float | None = Field(ge=0, le=1, description=(
        "The model's mean P(nucleus) over the nucleus' pixels (0-1): a confidence to rank nuclei "
        "by, not a calibrated probability; null when not computed."))


class RleDocument(BaseModel):
    """The ``format=rle`` body of ``POST /segment``: image size and one record per nucleus."""

    height: int = Field(ge=1, description="Rows of the input image, in pixels.")
    width: int = Field(ge=1, description="Columns of the input image, in pixels.")
    count: int = Field(ge=0, description="Number of nuclei (the length of `nuclei`).")
    nuclei: list[Nucleus] = Field(description="The nuclei in label order.")


class BatchItem(RleDocument):
    """One image of the ``format=json`` body of ``POST /segment/batch``."""

    filename: str | None = Field(description="The upload's file name as the client sent it.")


class ModelInfo(BaseModel):
    """``GET /model``: the served model's public ``metadata.json`` plus the service version.

    Only loosely described: the metadata keys depend on the model (input size, classes,
    post-processing, training configuration, validation metrics, data sources and licences).
    """

    model_config = ConfigDict(extra="allow")

    service_version: str = Field(description="Version of the nuclei-seg service.")
    serving: dict[str, Any] = Field(description="What runs the network: runtime, precision, threads, streams.")


class Health(BaseModel):
    """``GET /healthz``."""

    status: str = Field(description="`ok` while the process is up.", examples=["ok"])


class Readiness(BaseModel):
    """``GET /readyz``: 200 with `true` once the model is loaded and warmed, 503 with `false` before."""

    ready: bool


class ErrorDetail(BaseModel):
    """Every 4xx/5xx error body: one human-readable message."""

    detail: str = Field(description="What went wrong, e.g. `file: Field required (...)`.")

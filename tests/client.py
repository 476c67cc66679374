"""Helpers to call the real app in-process (httpx over ASGI, inside its lifespan)."""

from __future__ import annotations

import io

import httpx
import numpy as np
from PIL import Image

from service.app import create_app
from service.config import Settings
from service.model import SegmentationModel


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buffer, format="PNG")
    return buffer.getvalue()


def upload(data: bytes, name: str = "cells.png", ctype: str = "image/png") -> dict:
    return {"files": {"file": (name, data, ctype)}}


def make_client(model: SegmentationModel, model_dir, **overrides):
    """A function (method, url, **kwargs) -> response against a fresh app in its lifespan."""
    limits = {"max_upload_bytes": 2_000_000, "max_pixels": 4_000_000, "max_batch_files": 4}
    settings = Settings(model_dir=model_dir, **{**limits, **overrides})
    app = create_app(settings, model)
    transport = httpx.ASGITransport(app=app)

    async def run(method: str, url: str, **kwargs) -> httpx.Response:
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                return await c.request(method, url, **kwargs)

    import anyio

    def call(method: str, url: str, **kwargs) -> httpx.Response:
        return anyio.run(lambda: run(method, url, **kwargs))

    return call



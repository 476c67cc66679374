"""Python client of the HTTP service, with the retries a busy or restarting cluster needs.

``Client(url).segment(image)`` posts one image (a path, bytes or a numpy array) to
``POST /segment`` and returns what the format is in Python: a numpy label image
(``format="labels"``), the JSON document as a dict (``rle``, ``geojson``), a numpy mask or overlay
(``png``, ``overlay``), or the zip's bytes (``imagej-roi``). One client keeps one connection pool.
It retries what a loaded service or a load balancer answers
while replicas start or drain (429, 502, 503, 504, and connection errors), waiting the server's
``Retry-After`` when it gives one, else an exponential backoff with jitter. Every other error is
raised at once as :class:`ServiceError` with the server's own message, because sending the same
corrupt image again cannot help.
"""

from __future__ import annotations

import io
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

#: Statuses worth retrying: overload (503/429) and a proxy that has no healthy replica yet (502/504).
RETRY_STATUSES = frozenset({429, 502, 503, 504})
API_KEY_ENV = "NUCLEI_API_KEY"


class ServiceError(RuntimeError):
    """The service refused the request or could not be reached within the retries."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status, None when the service was never reached


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry: ``retries`` more attempts, waits growing from ``backoff`` seconds."""

    retries: int = 5
    backoff: float = 0.5
    max_wait: float = 30.0

    def wait(self, attempt: int, retry_after: str | None) -> float:
        """Seconds before attempt ``attempt + 1``: the server's Retry-After, else jittered exponential backoff."""
        if retry_after is not None:
            try:
                return min(max(float(retry_after), 0.0), self.max_wait)
            except ValueError:
                pass  # an HTTP date: fall back to our own backoff
        return min(self.backoff * 2 ** attempt, self.max_wait) * random.uniform(0.5, 1.0)


class Client:
    """A connection to one service (or a load balancer in front of many).

    ``http`` lets tests pass FastAPI's ``TestClient`` (an ``httpx.Client``); ``api_key`` defaults to
    the ``NUCLEI_API_KEY`` environment variable, the same name the service reads.
    """

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0,
                 retry: RetryPolicy = RetryPolicy(), http: httpx.Client | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.url = url.rstrip("/")
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.retry = retry
        self.http = http or httpx.Client(timeout=timeout)
        self._sleep = sleep

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def model(self) -> dict[str, Any]:
        """The served model's metadata (``GET /model``)."""
        return self._request("GET", "/model").json()

    def segment(self, image: bytes | str | Path | np.ndarray, filename: str | None = None, format: str = "rle",
                **params: Any) -> Any:
        """Segment one image: a path, the file's bytes, or an array (``(H, W)``, ``(H, W, C)``; sent
        losslessly, as PNG or, past 8 bits or 4 channels, as TIFF).

        ``params`` are the query parameters of ``POST /segment`` (``diameter``, ``channel``,
        ``prob_thresh``, ``seed_thresh``, ``tiling``, ``tta``, ``min_size``); ``None`` values are
        left out, so the server's defaults apply.
        """
        if isinstance(image, np.ndarray):
            filename, image = filename or "array", encode_array(image)
        elif isinstance(image, (str, Path)):
            filename = filename or Path(image).name
            image = Path(image).read_bytes()
        query = {"format": format, **{k: _query_value(v) for k, v in params.items() if v is not None}}
        files = {"file": (filename or "image", image, "application/octet-stream")}
        response = self._request("POST", "/segment", params=query, files=files)
        return parse_answer(response, format)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request, retried on overload and connection errors; other errors raise ServiceError."""
        for attempt in range(self.retry.retries + 1):
            last = attempt == self.retry.retries
            try:
                response = self.http.request(method, self.url + path, headers=self.headers, **kwargs)
            except httpx.TransportError as exc:  # refused, reset, DNS, timeout: the replica may be restarting
                if last:
                    raise ServiceError(f"{self.url}{path}: {type(exc).__name__}: {exc}") from None
                self._sleep(self.retry.wait(attempt, None))
                continue
            if response.status_code < 400:
                return response
            if response.status_code not in RETRY_STATUSES or last:
                raise ServiceError(f"HTTP {response.status_code}: {_detail(response)}", response.status_code)
            self._sleep(self.retry.wait(attempt, response.headers.get("retry-after")))
        raise AssertionError("unreachable")  # the loop returns or raises on its last attempt


def encode_array(array: np.ndarray) -> bytes:
    """An image array as lossless file bytes: PNG where it fits (8-bit gray, RGB, RGBA), else TIFF."""
    array = np.asarray(array)
    buffer = io.BytesIO()
    if array.dtype == np.uint8 and (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    else:
        import tifffile

        tifffile.imwrite(buffer, array, photometric="minisblack" if array.ndim == 3 else None,
                         planarconfig="contig" if array.ndim == 3 else None)
    return buffer.getvalue()


def parse_answer(response: httpx.Response, format: str) -> Any:
    """The answer of ``format`` in Python: dict (rle, geojson), numpy array (labels, png, overlay), bytes."""
    if format in ("rle", "geojson"):
        return response.json()
    if format in ("labels", "png", "overlay"):
        array = np.asarray(Image.open(io.BytesIO(response.content)))
        return array.astype(np.int32) if format == "labels" else array
    return response.content


def _query_value(value: Any) -> Any:
    return str(value).lower() if isinstance(value, bool) else value


def _detail(response: httpx.Response) -> str:
    """The service's error message (its JSON ``detail``), else the start of the body."""
    try:
        return str(response.json()["detail"])
    except Exception:
        return response.text[:200] or response.reason_phrase

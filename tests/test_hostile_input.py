"""Hostile and odd input, tried systematically: every answer is a 2xx or a 4xx with a JSON detail."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.decode import DecodeError, TooLargeError, decode_image
from tests.client import make_client, png, upload

GRAY = (np.arange(48 * 40).reshape(48, 40) % 251).astype(np.uint8)


def tiff(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **kwargs)
    return buffer.getvalue()


def pil_bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header declares ``width`` x ``height`` (a decompression bomb when huge)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def animated_gif() -> bytes:
    frames = [Image.fromarray(GRAY), Image.fromarray(255 - GRAY)]
    return pil_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], loop=0)


def palette_with_transparency() -> bytes:
    image = Image.fromarray(GRAY).convert("P")
    image.info["transparency"] = 0
    return pil_bytes(image, "PNG", transparency=0)


def float_with_nan() -> bytes:
    data = GRAY.astype(np.float32)
    data[0, :5] = np.nan
    data[1, :5] = np.inf
    data[2, :5] = -np.inf
    return tiff(data)


# (name, bytes, filename, content type, expected status, expected (height, width) for 200)
NAMED_CASES = [
    ("empty upload", b"", "a.png", "image/png", 422, None),
    ("1x1 image", png(np.array([[7]], np.uint8)), "a.png", "image/png", 200, (1, 1)),
    ("1x100000 image", png(np.zeros((1, 100_000), np.uint8)), "a.png", "image/png", 200, (1, 100_000)),
    ("100000x1 image", png(np.zeros((100_000, 1), np.uint8)), "a.png", "image/png", 200, (100_000, 1)),
    ("decompression bomb", png_declaring(100_000, 100_000), "a.png", "image/png", 413, None),
    ("1x1,000,000 declared", png_declaring(1_000_000, 1), "a.png", "image/png", 422, None),
    ("animated GIF (several pages: which?)", animated_gif(), "a.gif", "image/gif", 422, None),
    ("3-sample planar TIFF (RGB)", tiff(np.stack([GRAY, GRAY, GRAY])), "a.tif", "image/tiff", 200, (48, 40)),
    ("multi-page TIFF (which page?)", tiff(np.stack([GRAY] * 3), photometric="minisblack"), "a.tif", "image/tiff",
     422, None),
    ("2-channel ImageJ hyperstack (which channel?)", tiff(np.stack([GRAY, GRAY]), imagej=True, metadata={"axes": "CYX"}),
     "a.tif", "image/tiff", 422, None),
    ("z-stack", tiff(np.stack([GRAY] * 4), imagej=True, metadata={"axes": "ZYX"}), "a.tif", "image/tiff", 422, None),
    ("CMYK JPEG", pil_bytes(Image.fromarray(GRAY).convert("CMYK"), "JPEG"), "a.jpg", "image/jpeg", 200, (48, 40)),
    ("palette PNG with transparency", palette_with_transparency(), "a.png", "image/png", 200, (48, 40)),
    ("16-bit TIFF", tiff(GRAY.astype(np.uint16) * 257), "a.tif", "image/tiff", 200, (48, 40)),
    ("float32 TIFF", tiff(GRAY.astype(np.float32) / 255), "a.tif", "image/tiff", 200, (48, 40)),
    ("NaN/inf float TIFF", float_with_nan(), "a.tif", "image/tiff", 200, (48, 40)),
    ("2-channel TIFF", tiff(np.stack([GRAY, GRAY], -1), photometric="minisblack", planarconfig="contig"),
     "a.tif", "image/tiff", 422, None),
    ("5-channel TIFF", tiff(np.stack([GRAY] * 5, -1), photometric="minisblack", planarconfig="contig"),
     "a.tif", "image/tiff", 422, None),
    ("3D TIFF volume in one page", tiff(np.stack([GRAY] * 10), photometric="minisblack", planarconfig="separate"),
     "a.tif", "image/tiff", 422, None),
    ("wrong content type (bytes are sniffed)", png(GRAY), "a.png", "text/plain", 200, (48, 40)),
    ("path separators and non-ASCII name", png(GRAY), "../../etc/ñúcleos\\x.png", "image/png", 200, (48, 40)),
    ("random bytes", bytes(range(256)) * 4, "a.png", "image/png", 415, None),
    ("PDF", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", "a.pdf", "application/pdf", 415, None),
]


@pytest.fixture(scope="module")
def client(loaded_model, tile_model_dir):
    return make_client(loaded_model, tile_model_dir)


@pytest.mark.parametrize(("name", "data", "filename", "ctype", "status", "shape"), NAMED_CASES,
                         ids=[c[0] for c in NAMED_CASES])
def test_named_case(client, name, data, filename, ctype, status, shape):
    r = client("POST", "/segment", **upload(data, filename, ctype))
    assert r.status_code == status, (name, r.status_code, r.text[:300])
    if status == 200:
        assert Image.open(io.BytesIO(r.content)).size == (shape[1], shape[0])
    else:
        detail = r.json()["detail"]
        assert isinstance(detail, str) and detail and "Traceback" not in detail and "/work" not in detail


def test_batch_file_name_becomes_a_safe_image_id(client):
    files = [("files", ("../../etc/ñúcleos\\x.png", png(GRAY), "image/png"))]
    r = client("POST", "/segment/batch?format=csv", files=files)
    assert r.status_code == 200
    image_ids = {line.split(",")[0] for line in r.text.strip().split("\n")[1:]}
    assert image_ids == {"x"}


def test_missing_field_and_too_many_files(client):
    assert client("POST", "/segment", files={"wrong": ("a.png", png(GRAY), "image/png")}).status_code == 422
    assert client("POST", "/segment").status_code == 422
    files = [("files", (f"{i}.png", png(GRAY), "image/png")) for i in range(5)]
    assert client("POST", "/segment/batch", files=files).status_code == 413


VALID = {"png": png(GRAY), "jpeg": pil_bytes(Image.fromarray(GRAY), "JPEG"), "tiff": tiff(GRAY)}


@st.composite
def damaged(draw) -> bytes:
    """A valid PNG/JPEG/TIFF that is truncated, has bytes flipped, or both."""
    data = bytearray(VALID[draw(st.sampled_from(sorted(VALID)))])
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut])


@settings(max_examples=300, deadline=None)
@given(st.one_of(damaged(), st.binary(max_size=2048)))
def test_decoder_only_raises_its_own_errors(data):
    """Corrupt input never escapes as anything but DecodeError/TooLargeError (-> 4xx)."""
    try:
        image = decode_image(data, max_pixels=4_000_000)
    except (DecodeError, TooLargeError):
        return
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damaged())
def test_api_answers_damaged_files_with_2xx_or_json_4xx(client, data):
    r = client("POST", "/segment", **upload(data))
    assert r.status_code in (200, 413, 415, 422), r.text[:300]
    if r.status_code != 200:
        assert isinstance(r.json()["detail"], str)


def test_declared_body_over_the_limit_is_refused_before_reading(client):
    r = client("POST", "/segment", content=b"x" * 10, headers={"content-length": str(10**10),
                                                               "content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413 and "exceeds" in r.json()["detail"]


def test_streamed_body_over_the_limit_is_refused(client):
    head = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")

    async def chunks():  # a well-formed multipart body, streamed without Content-Length
        yield head
        for _ in range(4):
            yield b"\0" * 1_000_000
        yield b"\r\n--b--\r\n"

    r = client("POST", "/segment", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and "exceeds" in r.json()["detail"]


def test_absurdly_elongated_image_is_refused_not_padded(loaded_model, tile_model_dir):
    call = make_client(loaded_model, tile_model_dir, max_pixels=10_000_000)
    r = call("POST", "/segment", **upload(png(np.zeros((1, 5_000_000), np.uint8))))
    assert r.status_code == 422 and "padded" in r.json()["detail"]


def test_model_info_hides_paths_and_ids(client):
    info = client("GET", "/model").json()
    text = str(info)
    assert "validation_ids" not in text and "git_commit" not in text and "path" not in info.get("data", {})
    assert info["classes"] and info["data"]["fingerprint"]
    sources = info["data"]["sources"]  # every training source and its licence, without its path on disk
    assert sources and all(set(s) == {"name", "images", "licence"} for s in sources) and "/tmp" not in text

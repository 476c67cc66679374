"""The HTTP API against the real app (httpx + ASGI) and a tiny model built by the training code."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from service.app import create_app
from service.config import Settings
from service.encode import rle_decode
from tests.client import make_client, png, upload
from tests.synthetic import random_labels, render


@pytest.fixture(scope="module")
def sample_image() -> np.ndarray:
    rng = np.random.default_rng(5)
    return render(random_labels(rng, (333, 517), 30, 7), rng)


@pytest.fixture()
def client(loaded_model, tile_model_dir):
    return make_client(loaded_model, tile_model_dir)


@pytest.mark.parametrize("fmt", ["png", "labels", "overlay"])
def test_png_formats_keep_the_input_size(client, sample_image, fmt):
    r = client("POST", f"/segment?format={fmt}", **upload(png(sample_image)))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    out = Image.open(io.BytesIO(r.content))
    assert out.size == (517, 333)
    arr = np.asarray(out)
    if fmt == "png":
        assert set(np.unique(arr)) <= {0, 255}
    if fmt == "labels":
        assert out.mode.startswith("I") and arr.max() < 65536
    if fmt == "overlay":
        assert arr.shape == (333, 517, 3)


def test_rle_round_trips_to_the_label_image(client, sample_image):
    data = png(sample_image)
    doc = client("POST", "/segment?format=rle", **upload(data)).json()
    labels = np.asarray(Image.open(io.BytesIO(client("POST", "/segment?format=labels", **upload(data)).content)))
    assert (doc["height"], doc["width"]) == (333, 517) and doc["count"] == len(doc["nuclei"]) == labels.max()
    for nucleus in doc["nuclei"]:
        mask = rle_decode(nucleus["rle"], (333, 517)).astype(bool)
        np.testing.assert_array_equal(mask, labels == nucleus["id"])
        assert nucleus["area"] == mask.sum()
        for key in ("bbox", "centroid", "perimeter", "eccentricity", "solidity", "mean_intensity"):
            assert key in nucleus
        assert 0.0 <= nucleus["nucleus_probability"] <= 1.0


def test_batch_json_and_csv(client, sample_image):
    files = [("files", ("a.png", png(sample_image), "image/png")),
             ("files", ("dir/b.tif.png", png(np.zeros((40, 50), np.uint8)), "image/png"))]
    docs = client("POST", "/segment/batch", files=files).json()
    assert [d["filename"] for d in docs] == ["a.png", "dir/b.tif.png"]
    assert all(0.0 <= n["nucleus_probability"] <= 1.0 for n in docs[0]["nuclei"])
    csv_text = client("POST", "/segment/batch?format=csv", files=files)
    assert csv_text.headers["content-type"].startswith("text/csv")
    lines = csv_text.text.strip().split("\n")
    assert lines[0] == "ImageId,EncodedPixels"
    assert sum(line.startswith("a,") for line in lines) == max(1, docs[0]["count"])
    assert "b.tif," in lines  # the empty image gets one row with empty EncodedPixels


def test_percentile_stretch_uses_every_channel():
    from service.normalise import percentile_stretch

    image = np.zeros((1024, 1024, 3), np.uint8)  # 3M values: the sampling stride is a multiple of 3
    image[..., 1] = np.linspace(0, 100, 1024, dtype=np.uint8)[None, :]
    out = percentile_stretch(image)
    assert out[..., 1].max() == 255  # green decides the stretch even though red is all zero


def test_resize_mode_and_options(client, sample_image):
    r = client("POST", "/segment?format=rle&tiling=false&tta=true&min_size=5", **upload(png(sample_image)))
    assert r.status_code == 200 and r.json()["width"] == 517


def test_health_ready_and_model(client):
    assert client("GET", "/healthz").json() == {"status": "ok"}
    assert client("GET", "/readyz").status_code == 200
    info = client("GET", "/model").json()
    assert info["service_version"] and info["classes"] == ["background", "interior", "boundary"]


def test_readyz_is_503_before_the_model_is_loaded(tile_model_dir):
    app = create_app(Settings(model_dir=tile_model_dir))
    import anyio

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            before = (await c.get("/readyz")).status_code
            seg = (await c.post("/segment", files={"file": ("a.png", b"x", "image/png")})).status_code
            async with app.router.lifespan_context(app):
                after = (await c.get("/readyz")).status_code
        return before, seg, after

    assert anyio.run(run) == (503, 503, 200)


@pytest.mark.parametrize("maker", ["jpeg", "tiff16", "float_tiff", "bmp", "palette", "rgba"])
def test_formats_users_bring(client, sample_image, maker):
    import tifffile

    buffer = io.BytesIO()
    gray = sample_image
    if maker == "jpeg":
        Image.fromarray(sample_image).save(buffer, format="JPEG")
    elif maker == "tiff16":
        tifffile.imwrite(buffer, gray.astype(np.uint16) * 200)
    elif maker == "float_tiff":
        tifffile.imwrite(buffer, gray.astype(np.float32) / 7.0)
    elif maker == "bmp":
        Image.fromarray(sample_image).save(buffer, format="BMP")
    elif maker == "palette":
        Image.fromarray(sample_image).convert("P").save(buffer, format="PNG")
    else:
        Image.fromarray(sample_image).convert("RGBA").save(buffer, format="PNG")
    r = client("POST", "/segment", **upload(buffer.getvalue(), name=f"x.{maker}"))
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(r.content)).size == (517, 333), (r.headers, r.content[:60])


def bomb() -> bytes:
    """A tiny PNG that declares 100,000 x 100,000 pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("body", "query", "status"),
    [
        (b"", "", 422),
        (b"this is not an image at all", "", 415),
        (png(np.zeros((50, 50), np.uint8))[:60], "", 422),  # truncated PNG
        (bomb(), "", 413),
        (b"\0" * 2_000_001, "", 413),  # over max_upload_bytes
        (png(np.zeros((50, 50), np.uint8)), "?format=jpeg", 422),
        (png(np.zeros((50, 50), np.uint8)), "?min_size=-1", 422),
        (png(np.zeros((50, 50), np.uint8)), "?diameter=0", 422),
        (png(np.zeros((50, 50), np.uint8)), "?diameter=20&tiling=false", 422),  # no canonical size without tiles
    ],
    ids=["empty", "not-an-image", "truncated", "bomb", "too-many-bytes", "bad-format", "bad-min-size",
         "bad-diameter", "diameter-without-tiles"],
)
def test_bad_input_gets_a_clear_4xx_and_service_keeps_serving(client, sample_image, body, query, status):
    r = client("POST", f"/segment{query}", **upload(body))
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail and "Traceback" not in detail
    assert client("POST", "/segment", **upload(png(sample_image))).status_code == 200


def test_missing_field_and_too_many_batch_files(client, sample_image):
    assert client("POST", "/segment", files={"other": ("a.png", b"x", "image/png")}).status_code == 422
    files = [("files", (f"{i}.png", png(sample_image[:40, :40]), "image/png")) for i in range(5)]
    r = client("POST", "/segment/batch", files=files)
    assert r.status_code == 413 and "at most 4" in r.json()["detail"]


def test_openapi_documents_every_parameter(client):
    schema = client("GET", "/openapi.json").json()
    op = schema["paths"]["/segment"]["post"]
    assert {p["name"] for p in op["parameters"]} == {"format", "tiling", "tta", "min_size", "diameter", "channel",
                                                    "prob_thresh", "seed_thresh"}
    batch = schema["paths"]["/segment/batch"]["post"]
    assert {"diameter", "channel", "prob_thresh", "seed_thresh"} <= {p["name"] for p in batch["parameters"]}
    assert all(p.get("description") for p in op["parameters"])
    assert {"200", "413", "415", "422", "503"} <= set(op["responses"])
    assert client("GET", "/docs").status_code == 200
    json.dumps(schema)


def test_metrics_count_requests_and_batches(client, sample_image):
    client("POST", "/segment", **upload(png(sample_image)))
    text = client("GET", "/metrics").text
    assert "nuclei_requests_total" in text and "nuclei_model_batch_tiles_bucket" in text
    assert "nuclei_queue_tiles" in text and "nuclei_megapixels_total" in text


def test_metrics_reflect_traffic_within_one_app(loaded_model, tile_model_dir, sample_image):
    settings = Settings(model_dir=tile_model_dir)
    app = create_app(settings, loaded_model)
    import anyio

    async def run():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                await c.post("/segment", files={"file": ("a.png", png(sample_image), "image/png")})
                await c.post("/segment", files={"file": ("a.png", b"junk", "image/png")})
                await c.get("/no-such-page")
                return (await c.get("/metrics")).text

    text = anyio.run(run)
    assert 'nuclei_requests_total{route="/segment",status="200"} 1.0' in text
    assert 'nuclei_requests_total{route="/segment",status="415"} 1.0' in text
    assert 'nuclei_requests_total{route="unmatched",status="404"} 1.0' in text
    assert 'nuclei_request_seconds_count{route="/segment"} 2.0' in text
    assert "nuclei_images_total 1.0" in text


def test_api_key_guards_segment_but_not_health(loaded_model, tile_model_dir, sample_image):
    call = make_client(loaded_model, tile_model_dir, api_key="s3cret")
    body = upload(png(sample_image[:64, :64]))
    assert call("POST", "/segment", **body).status_code == 401
    assert call("POST", "/segment", headers={"X-API-Key": "wrong"}, **body).status_code == 401
    assert call("POST", "/segment", headers={"X-API-Key": "s3cret"}, **body).status_code == 200
    assert call("POST", "/segment", headers={"Authorization": "Bearer s3cret"}, **body).status_code == 200
    assert call("GET", "/healthz").status_code == 200 and call("GET", "/readyz").status_code == 200


def test_cors_is_off_unless_configured(loaded_model, tile_model_dir):
    headers = {"Origin": "https://example.org", "Access-Control-Request-Method": "POST"}
    off = make_client(loaded_model, tile_model_dir)("OPTIONS", "/segment", headers=headers)
    assert "access-control-allow-origin" not in off.headers
    on = make_client(loaded_model, tile_model_dir, cors_origins=["https://example.org"])("OPTIONS", "/segment",
                                                                                        headers=headers)
    assert on.headers.get("access-control-allow-origin") == "https://example.org"


def test_timeout_gives_504_and_overload_gives_503(loaded_model, tile_model_dir, sample_image, monkeypatch):
    import time as _time

    slow = make_client(loaded_model, tile_model_dir, request_timeout_s=0.05)
    original = loaded_model.predict_now
    monkeypatch.setattr(loaded_model, "predict_now", lambda b: (_time.sleep(0.2), original(b))[1])
    r = slow("POST", "/segment", **upload(png(sample_image)))
    assert r.status_code == 504 and "longer than" in r.json()["detail"]
    monkeypatch.setattr(loaded_model, "predict_now", original)

    from service.batching import Overloaded

    def overloaded(batch):
        raise Overloaded("full")

    busy = make_client(loaded_model, tile_model_dir)
    monkeypatch.setattr(loaded_model, "predict", overloaded)
    r = busy("POST", "/segment", **upload(png(sample_image)))
    assert r.status_code == 503 and r.headers["retry-after"] == "1"


def test_a_given_diameter_sets_the_scale_of_one_request_and_of_a_batch(client, sample_image, loaded_model):
    """The sample's nuclei are 14 px across; told they are 3x that, the service shrinks the image 3x
    more than it would for its own estimate, and the batch endpoint takes the same parameter."""
    from service.decode import decode_image
    from service.pipeline import SegmentOptions, segment

    canonical = loaded_model.spec.canonical_diameter
    data = png(sample_image)
    r = client("POST", "/segment?format=rle&diameter=42", **upload(data))
    assert r.status_code == 200
    expected = segment(decode_image(data), loaded_model, SegmentOptions(diameter=42.0))
    assert expected.scale == pytest.approx(canonical / 42.0)
    assert r.json()["count"] == expected.labels.max()
    files = [("files", ("a.png", data, "image/png"))]
    batch = client("POST", "/segment/batch?diameter=42", files=files)
    assert batch.status_code == 200 and batch.json()[0]["count"] == expected.labels.max()

"""Offline API docs, the OpenAPI schema's file pickers and response models, and clear 413/422 messages."""

from __future__ import annotations

import re

import numpy as np
import pytest
from pydantic import TypeAdapter

from service.app import create_app
from service.config import Settings
from service.docs import ASSETS, REDOC_REMOTE_LOGO, asset_dir
from service.encode import rle_document
from service.schemas import BatchItem, ErrorDetail, Health, ModelInfo, Nucleus, Readiness, RleDocument
from tests.client import make_client, png, upload
from tests.synthetic import random_labels, render

#: Any absolute http(s) URL; the test client's own host is ``test``.
ABSOLUTE_URL = re.compile(r"https?://([^/\s\"'<>]+)", re.IGNORECASE)
#: Where the pages point: attributes and Swagger UI's ``url: '...'``.
REFERENCES = re.compile(r"""(?:href|src|spec-url)\s*=\s*["']([^"']+)["']|\burl:\s*["']([^"']+)["']""")


@pytest.fixture(scope="module")
def sample_image() -> np.ndarray:
    rng = np.random.default_rng(11)
    return render(random_labels(rng, (150, 170), 12, 7), rng)


@pytest.fixture()
def client(loaded_model, tile_model_dir):
    return make_client(loaded_model, tile_model_dir)


@pytest.fixture()
def app(loaded_model, tile_model_dir):
    return create_app(Settings(model_dir=tile_model_dir), loaded_model)


def resolve(schema: dict, node: dict) -> dict:
    ref = node.get("$ref")
    return schema["components"]["schemas"][ref.rsplit("/", 1)[-1]] if ref else node


# --- offline docs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_doc_pages_reference_only_this_server(client, page):
    r = client("GET", page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    foreign = [m.group(0) for m in ABSOLUTE_URL.finditer(html) if m.group(1).lower() != "test"]
    assert not foreign, f"{page} references other hosts: {foreign}"
    assert "fonts.googleapis" not in html and "cdn." not in html
    refs = {a or b for a, b in REFERENCES.findall(html)}
    assets = {ref for ref in refs if ref.startswith("/static/docs/")}
    assert "/openapi.json" in refs and assets, refs
    assert all(ref.startswith("/") and not ref.startswith("//") for ref in refs), refs
    expected = {"/docs": {"swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"},
                "/redoc": {"redoc.standalone.js", "favicon.png"}}[page]
    assert {ref.rsplit("/", 1)[-1] for ref in assets} == expected
    media = {"js": "text/javascript", "css": "text/css", "png": "image/png"}
    for ref in sorted(refs):
        asset = client("GET", ref)
        assert asset.status_code == 200, ref
        extension = ref.rsplit(".", 1)[-1]
        want = media.get(extension, "application/json")
        assert asset.headers["content-type"].split(";")[0] == want, (ref, asset.headers["content-type"])
        if ref in assets:
            shipped = (asset_dir() / ref.rsplit("/", 1)[-1]).read_bytes()
            if ref.endswith("redoc.standalone.js"):  # its one remote image replaced, nothing else
                assert REDOC_REMOTE_LOGO[0] in shipped and b"cdn.redoc.ly" not in asset.content
                shipped = shipped.replace(*REDOC_REMOTE_LOGO)
            assert asset.content == shipped
    if page == "/docs":
        assert '"validatorUrl": null' in html  # no badge fetched from validator.swagger.io


def test_only_the_docs_assets_are_served(client):
    assert set(ASSETS) <= {p.name for p in asset_dir().iterdir()}
    for name in ("core.py", "..%2Fcore.py", "__init__.py", "nothing.js"):
        assert client("GET", f"/static/docs/{name}").status_code == 404


def test_fastapi_cdn_pages_are_not_installed(app):
    assert app.docs_url is None and app.redoc_url is None
    assert {"/docs", "/redoc"} <= {getattr(route, "path", None) for route in app.routes}


# --- file pickers ---------------------------------------------------------------------------------

def test_upload_fields_are_file_pickers(app):
    schema = app.openapi()

    def body(path: str) -> dict:
        content = schema["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]
        return resolve(schema, content["schema"])["properties"]

    files = body("/segment/batch")["files"]
    assert files["type"] == "array"
    assert files["items"] == {"type": "string", "format": "binary"}
    file = body("/segment")["file"]
    assert file["type"] == "string" and file["format"] == "binary" and "contentMediaType" not in file
    assert app.openapi() is schema  # post-processed once, then cached


def test_served_openapi_json_has_the_file_pickers(client):
    schema = client("GET", "/openapi.json").json()
    body = schema["paths"]["/segment/batch"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert resolve(schema, body["schema"])["properties"]["files"]["items"] == {"type": "string", "format": "binary"}


# --- response schemas -----------------------------------------------------------------------------

def test_segment_json_response_schema_references_nucleus(app):
    schema = app.openapi()
    ok = schema["paths"]["/segment"]["post"]["responses"]["200"]
    assert "image/png" in ok["content"]
    json_content = ok["content"]["application/json"]
    assert json_content["schema"] == {"$ref": "#/components/schemas/RleDocument"}
    assert "example" in json_content
    document = resolve(schema, json_content["schema"])
    assert document["properties"]["nuclei"]["items"] == {"$ref": "#/components/schemas/Nucleus"}
    nucleus = schema["components"]["schemas"]["Nucleus"]["properties"]
    assert set(nucleus) == {"id", "rle", "area", "bbox", "centroid", "perimeter", "eccentricity", "solidity",
                            "mean_intensity", "nucleus_probability"}
    assert all(field.get("description") for field in nucleus.values())
    RleDocument.model_validate(json_content["example"])

    batch = schema["paths"]["/segment/batch"]["post"]["responses"]["200"]["content"]
    assert batch["application/json"]["schema"]["items"] == {"$ref": "#/components/schemas/BatchItem"}
    assert "text/csv" in batch
    for path, method in (("/segment", "post"), ("/segment/batch", "post"), ("/model", "get")):
        for status in ("413", "422", "503") if method == "post" else ("503",):
            error = schema["paths"][path][method]["responses"][status]["content"]["application/json"]
            assert error["schema"] == {"$ref": "#/components/schemas/ErrorDetail"}, (path, status)
    for path, model in (("/healthz", "Health"), ("/readyz", "Readiness"), ("/model", "ModelInfo")):
        ok = schema["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]
        assert ok["schema"] == {"$ref": f"#/components/schemas/{model}"}
    ready = schema["paths"]["/readyz"]["get"]["responses"]["503"]["content"]["application/json"]
    assert ready["schema"] == {"$ref": "#/components/schemas/Readiness"}


def test_real_rle_response_validates_against_the_model(client, sample_image):
    r = client("POST", "/segment?format=rle", **upload(png(sample_image)))
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    document = RleDocument.model_validate(r.json())
    assert document.count == len(document.nuclei) and (document.height, document.width) == (150, 170)
    for raw in r.json()["nuclei"]:
        assert set(raw) == set(Nucleus.model_fields)  # nothing undocumented


def test_rle_document_with_nuclei_validates_against_the_model(sample_image):
    # the tiny test model may find few nuclei; known labels exercise every field for sure
    labels = random_labels(np.random.default_rng(3), sample_image.shape[:2], 12, 7)
    probability = np.linspace(0.2, 0.9, int(labels.max()))
    for image, prob in ((sample_image, probability), (None, None)):
        raw = rle_document(labels, image, prob)
        document = RleDocument.model_validate(raw)
        assert document.count == len(document.nuclei) > 0
        for record in raw["nuclei"]:
            assert set(record) == set(Nucleus.model_fields)
        assert (document.nuclei[0].mean_intensity is None) == (image is None)


def test_endpoint_responses_with_nuclei_validate_against_the_models(loaded_model, tile_model_dir, sample_image,
                                                                     monkeypatch):
    # the tiny test model finds no nuclei; known labels through the real endpoints fill every field
    import service.app
    from service.pipeline import Segmentation

    def known_nuclei(image, model, options):
        rng = np.random.default_rng(7)
        labels = random_labels(rng, image.shape[:2], 12, 7)
        return Segmentation(labels=labels, scale=1.0, probabilities=rng.random((*image.shape[:2], 3)))

    monkeypatch.setattr(service.app, "segment", known_nuclei)
    client = make_client(loaded_model, tile_model_dir)
    r = client("POST", "/segment?format=rle", **upload(png(sample_image)))
    assert r.status_code == 200, r.text
    document = RleDocument.model_validate(r.json())
    assert document.count == len(document.nuclei) > 0
    assert all(n.mean_intensity is not None and n.nucleus_probability is not None for n in document.nuclei)
    assert all(set(raw) == set(Nucleus.model_fields) for raw in r.json()["nuclei"])
    files = [("files", ("a.png", png(sample_image), "image/png")), ("files", ("b.png", png(sample_image), "image/png"))]
    r = client("POST", "/segment/batch", files=files)
    assert r.status_code == 200, r.text
    items = TypeAdapter(list[BatchItem]).validate_python(r.json())
    assert [item.filename for item in items] == ["a.png", "b.png"] and all(item.count > 0 for item in items)
    assert all(set(raw) == set(BatchItem.model_fields) for raw in r.json())


def test_other_responses_validate_against_their_models(client, sample_image):
    Health.model_validate(client("GET", "/healthz").json())
    assert Readiness.model_validate(client("GET", "/readyz").json()).ready
    info = ModelInfo.model_validate(client("GET", "/model").json())
    assert info.service_version and "runtime" in info.serving
    files = [("files", ("a.png", png(sample_image), "image/png")),
             ("files", ("b.png", png(np.zeros((40, 50), np.uint8)), "image/png"))]
    r = client("POST", "/segment/batch", files=files)
    items = TypeAdapter(list[BatchItem]).validate_python(r.json())
    assert [item.filename for item in items] == ["a.png", "b.png"]
    ErrorDetail.model_validate(client("POST", "/segment?format=jpeg", **upload(png(sample_image))).json())


# --- clearer errors -------------------------------------------------------------------------------

def test_missing_file_field_names_the_expected_field(client, sample_image):
    r = client("POST", "/segment", files={"files": ("a.png", png(sample_image), "image/png")})
    assert r.status_code == 422
    assert r.json()["detail"] == "file: Field required (send the image as multipart form field 'file')"
    r = client("POST", "/segment/batch", files={"file": ("a.png", png(sample_image), "image/png")})
    assert r.status_code == 422
    assert r.json()["detail"] == "files: Field required (send the images as repeated multipart form fields 'files')"
    r = client("POST", "/segment")  # no body at all
    assert r.status_code == 422 and "multipart form field 'file'" in r.json()["detail"]


def test_other_validation_errors_keep_their_message(client, sample_image):
    r = client("POST", "/segment?format=jpeg", **upload(png(sample_image)))
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail.startswith("query.format: Input should be") and "multipart" not in detail, detail


@pytest.mark.parametrize(("path", "limit", "mb"), [("/segment", 2_000_000 + (1 << 20), "3.0 MB"),
                                                   ("/segment/batch", 4 * 2_000_000 + (1 << 20), "9.0 MB")])
def test_declared_body_over_the_limit_states_the_limit(client, path, limit, mb):
    r = client("POST", path, content=b"x" * 10, headers={"content-length": str(10**10),
                                                         "content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413
    detail = r.json()["detail"]
    assert f"{10**10} bytes" in detail and f"{limit} bytes ({mb})" in detail and path in detail, detail


def test_streamed_body_over_the_limit_states_the_limit(client):
    head = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")

    async def chunks():
        yield head
        for _ in range(4):
            yield b"\0" * 1_000_000
        yield b"\r\n--b--\r\n"

    r = client("POST", "/segment", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    detail = r.json()["detail"]
    assert f"{2_000_000 + (1 << 20)} bytes (3.0 MB)" in detail and "/segment" in detail, detail

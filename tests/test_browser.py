"""The page at ``GET /`` and the API docs in a real browser: headless Chromium driven by Playwright.

A real ``nuclei-serve`` with the shipped model (``models/default``) on loopback; Debian's Chromium
(``/usr/bin/chromium``, which ``.ci/run`` installs). Every page is checked for console errors,
uncaught exceptions and requests to any other host (those are also aborted, so nothing can reach
the network). ``NUCLEI_SCREENSHOTS=1`` also writes ``docs/figures/page.png`` for the README.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from benchmarks.harness import Server
from tests.synthetic import random_labels

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
MODEL_DIR = ROOT / "models" / "default"
SCREENSHOT = ROOT / "docs" / "figures" / "page.png"
API_KEY = "browser-test-key"

try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    sync_playwright = None

_missing = [what for what, ok in (("the playwright package", sync_playwright is not None),
                                  (f"Chromium at {CHROMIUM}", CHROMIUM.is_file())) if not ok]
if _missing:
    reason = f"browser tests need {' and '.join(_missing)} (.ci/run installs Debian's chromium and the dev extra)"
    if os.environ.get("NUCLEI_REQUIRE_BROWSER"):  # set by .ci/run: in CI a missing browser is a failure
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason, allow_module_level=True)


# ---------------------------------------------------------------- fixtures
def nuclei_image(seed: int = 7, shape: tuple[int, int] = (320, 384), count: int = 40) -> np.ndarray:
    """A fluorescence-like gray image: blurred discs of varied brightness on a dim, uneven background."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    labels = random_labels(rng, shape, count, 10)
    brightness = np.concatenate([[0.0], rng.uniform(110, 230, labels.max())])
    image = gaussian_filter(brightness[labels], 1.5) + 15 + gaussian_filter(rng.normal(0, 40, shape), 25)
    image += rng.normal(0, 6, shape)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def fixture_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("browser") / "nuclei.png"
    Image.fromarray(nuclei_image()).save(path)
    return path


@pytest.fixture(scope="module")
def two_channel_tiff(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Channels last, (H, W, 2): noise in channel 0, the nuclei in channel 1 (the API then needs ``channel``)."""
    import tifffile

    rng = np.random.default_rng(1)
    planes = np.stack([rng.integers(0, 60, (256, 256), dtype=np.uint8), nuclei_image(3, (256, 256), 25)], axis=-1)
    path = tmp_path_factory.mktemp("browser") / "two_channels.tif"
    tifffile.imwrite(path, planes)
    return path


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = Server({"NUCLEI_MODEL_DIR": str(MODEL_DIR), "NUCLEI_API_KEY": ""})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[Server]:
    s = Server({"NUCLEI_MODEL_DIR": str(MODEL_DIR), "NUCLEI_API_KEY": API_KEY})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--disable-dev-shm-usage"])
        yield b
        b.close()


@dataclass
class Session:
    """A page of one browser context with what it logged and asked for."""

    page: Page
    origin: str
    errors: list[str] = field(default_factory=list)
    external: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def api_calls(self) -> list[tuple[str, str, dict[str, list[str]]]]:
        """(method, path, query) of every request the page sent to the server."""
        calls = []
        for entry in self.requests:
            method, url = entry.split(" ", 1)
            parts = urlsplit(url)
            calls.append((method, parts.path, parse_qs(parts.query)))
        return calls


@pytest.fixture
def session(browser: Browser, request: pytest.FixtureRequest) -> Iterator[callable]:
    contexts = []

    def open_(base: Server, path: str = "/") -> Session:
        context = browser.new_context(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
        contexts.append(context)
        page = context.new_page()
        s = Session(page, f"{urlsplit(base.url).scheme}://{urlsplit(base.url).netloc}")

        def route(r):  # anything that is not the server (or data:/blob:) is recorded and aborted
            url = r.request.url
            if url.startswith(s.origin + "/"):
                s.requests.append(f"{r.request.method} {url}")
                r.continue_()
            else:
                s.external.append(url)
                r.abort()

        context.route(re.compile(r"^(https?|wss?|ftp)://"), route)
        page.on("console", lambda m: s.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: s.errors.append(f"uncaught: {e}"))
        page.goto(base.url + path, wait_until="load")
        return s

    yield open_
    for c in contexts:
        c.close()


def api_rle(server: Server, path: Path, key: str | None = None, **params: str) -> dict:
    headers = {"X-API-Key": key} if key else {}
    r = httpx.post(server.url + "/segment", params={"format": "rle", **params}, headers=headers,
                   files={"file": (path.name, path.read_bytes())}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def upload(s: Session, path: Path, state: str = "done") -> None:
    s.page.set_input_files("#file", str(path))
    s.page.wait_for_selector(f"body[data-state={state}]", timeout=120_000)


def table_column(page: Page, key: str) -> list[float]:
    index = page.eval_on_selector_all("#nuclei thead th", "ths => ths.map(t => t.dataset.key)").index(key)
    texts = page.eval_on_selector_all(f"#nuclei tbody tr td:nth-child({index + 1})", "tds => tds.map(t => t.textContent)")
    return [float(t) for t in texts]


def highlighted(page: Page, bbox: list[int]) -> tuple[int, int]:
    """(painted pixels inside ``bbox`` [min_row, min_col, max_row, max_col), painted pixels in all) of the canvas."""
    return tuple(page.evaluate("""([r0, c0, r1, c1]) => {
        const canvas = document.getElementById('highlight');
        const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let inside = 0, all = 0;
        for (let p = 0; p < data.length / 4; p++) {
            if (!data[4 * p + 3]) continue;
            all++;
            const r = Math.floor(p / canvas.width), c = p % canvas.width;
            if (r >= r0 && r < r1 && c >= c0 && c < c1) inside++;
        }
        return [inside, all];
    }""", bbox))


# ---------------------------------------------------------------- the page
def test_page_segments_an_upload_and_shows_the_apis_count(session, server, fixture_png):
    s = session(server)
    assert s.page.title() == "nuclei-seg"
    assert s.page.is_hidden("#key-field"), "no API key is configured, so no key field"
    upload(s, fixture_png)
    expected = api_rle(server, fixture_png)
    assert expected["count"] >= 20, "the shipped model should find the fixture's nuclei"
    assert s.page.text_content("#count") == str(expected["count"])
    assert s.page.locator("#nuclei tbody tr").count() == expected["count"]
    assert table_column(s.page, "id") == [n["id"] for n in expected["nuclei"]]
    assert table_column(s.page, "area") == [n["area"] for n in expected["nuclei"]]
    overlay = s.page.eval_on_selector("#overlay", "img => [img.complete, img.naturalHeight, img.naturalWidth]")
    assert overlay == [True, expected["height"], expected["width"]]
    assert s.page.eval_on_selector("#preview", "img => img.naturalWidth") == expected["width"]
    assert s.page.is_hidden("#error")
    calls = s.api_calls()
    assert sorted((m, p, q.get("format")) for m, p, q in calls if p == "/segment") == [
        ("POST", "/segment", ["overlay"]), ("POST", "/segment", ["rle"])]
    assert {p for _, p, _ in calls} <= {"/", "/model", "/segment"}, calls  # a client of the public API only
    assert s.errors == [] and s.external == []


def test_clicking_a_row_highlights_that_nucleus_and_clicking_a_nucleus_selects_its_row(session, server, fixture_png):
    s = session(server)
    upload(s, fixture_png)
    nuclei = api_rle(server, fixture_png)["nuclei"]
    assert highlighted(s.page, [0, 0, 10**6, 10**6]) == (0, 0)
    target = max(nuclei, key=lambda n: n["solidity"] * n["area"])
    s.page.click(f"#nuclei tbody tr[data-id='{target['id']}']")
    row = s.page.locator(f"#nuclei tbody tr[data-id='{target['id']}']")
    assert row.get_attribute("class") == "selected" and row.get_attribute("aria-selected") == "true"
    assert s.page.locator("#nuclei tbody tr.selected").count() == 1
    inside, painted = highlighted(s.page, target["bbox"])
    assert inside == target["area"], "the highlight inside the bbox is the nucleus' RLE mask, pixel for pixel"
    assert painted > inside, "and a box is drawn around it"

    other = next(n for n in sorted(nuclei, key=lambda n: -n["solidity"]) if n["id"] != target["id"])
    canvas = s.page.locator("#highlight")
    box = canvas.bounding_box()
    height, width = s.page.eval_on_selector("#highlight", "c => [c.height, c.width]")
    row_, col = other["centroid"]
    canvas.click(position={"x": (col + 0.5) * box["width"] / width, "y": (row_ + 0.5) * box["height"] / height})
    assert s.page.get_attribute(f"#nuclei tbody tr[data-id='{other['id']}']", "class") == "selected"
    assert s.page.locator("#nuclei tbody tr.selected").count() == 1
    assert highlighted(s.page, other["bbox"])[0] == other["area"]

    if os.environ.get("NUCLEI_SCREENSHOTS") == "1":  # for the README: sorted by area, a typical nucleus selected
        s.page.click("#nuclei thead th[data-key='area']")
        typical = sorted(nuclei, key=lambda n: n["area"])[len(nuclei) // 3]
        s.page.click(f"#nuclei tbody tr[data-id='{typical['id']}']")
        s.page.evaluate("window.scrollTo(0, 0)")
        s.page.screenshot(path=str(SCREENSHOT))
    assert s.errors == [] and s.external == []


def test_table_sorts_by_clicking_headers(session, server, fixture_png):
    s = session(server)
    upload(s, fixture_png)
    areas = table_column(s.page, "area")
    header = s.page.locator("#nuclei thead th[data-key='area']")
    header.click()
    assert table_column(s.page, "area") == sorted(areas)
    assert s.page.get_attribute("#nuclei thead th[data-key='area']", "aria-sort") == "ascending"
    s.page.locator("#nuclei thead th[data-key='area']").click()
    assert table_column(s.page, "area") == sorted(areas, reverse=True)
    assert s.page.get_attribute("#nuclei thead th[data-key='area']", "aria-sort") == "descending"
    s.page.locator("#nuclei thead th[data-key='eccentricity']").click()
    assert table_column(s.page, "eccentricity") == sorted(table_column(s.page, "eccentricity"))
    assert s.page.get_attribute("#nuclei thead th[data-key='area']", "aria-sort") is None
    assert s.errors == [] and s.external == []


def test_downloads_are_the_apis_labels_geojson_overlay_and_a_measurements_csv(session, server, fixture_png):
    s = session(server)
    upload(s, fixture_png)
    expected = api_rle(server, fixture_png)

    def download(kind: str) -> tuple[str, bytes]:
        with s.page.expect_download() as info:
            s.page.click(f"[data-download={kind}]")
        d = info.value
        return d.suggested_filename, Path(d.path()).read_bytes()

    name, body = download("csv")
    assert name == "nuclei_measurements.csv"
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert len(rows) == expected["count"] and "rle" not in rows[0]
    assert list(rows[0]) == ["id", "area", "bbox_min_row", "bbox_min_col", "bbox_max_row", "bbox_max_col",
                             "centroid_row", "centroid_col", "perimeter", "eccentricity", "solidity",
                             "mean_intensity", "nucleus_probability"]
    first = expected["nuclei"][0]
    assert [float(rows[0][k]) for k in ("area", "bbox_max_col", "centroid_row", "solidity")] == [
        first["area"], first["bbox"][3], first["centroid"][0], first["solidity"]]

    name, body = download("labels")
    labels = np.asarray(Image.open(io.BytesIO(body)))
    assert name == "nuclei_labels.png" and labels.dtype == np.uint16
    assert labels.shape == (expected["height"], expected["width"])
    assert len(np.unique(labels[labels > 0])) == expected["count"]

    name, body = download("overlay")
    api_overlay = httpx.post(server.url + "/segment", params={"format": "overlay"},
                             files={"file": (fixture_png.name, fixture_png.read_bytes())}, timeout=120).content
    assert name == "nuclei_overlay.png" and body == api_overlay

    name, body = download("geojson")
    assert name == "nuclei.geojson"
    assert len(json.loads(body)["features"]) == expected["count"]
    assert s.page.is_hidden("#error")
    assert s.errors == [] and s.external == []


def test_options_are_sent_as_the_apis_query_parameters(session, server, fixture_png, two_channel_tiff):
    s = session(server)
    s.page.fill("#diameter", "24")
    s.page.check("#tta")
    upload(s, fixture_png)
    expected = api_rle(server, fixture_png, diameter="24", tta="true")
    assert s.page.text_content("#count") == str(expected["count"])
    queries = [q for _, p, q in s.api_calls() if p == "/segment"]
    assert queries and all(q["diameter"] == ["24"] and q["tta"] == ["true"] and "channel" not in q for q in queries)

    # A 2-channel image: without channel the API refuses it, and the page shows the API's own message.
    s.page.fill("#diameter", "")
    s.page.uncheck("#tta")
    upload(s, two_channel_tiff, state="error")
    detail = httpx.post(server.url + "/segment", files={"file": (two_channel_tiff.name, two_channel_tiff.read_bytes())},
                        timeout=60).json()["detail"]
    assert s.page.is_visible("#error") and detail in s.page.text_content("#error")
    assert s.page.text_content("#error").startswith("422: ")
    assert s.page.text_content("#count") == "–" and s.page.is_disabled("[data-download=csv]")
    assert s.page.evaluate("document.activeElement.id") == "channel", "the page points at the channel field"
    s.page.fill("#channel", "1")
    s.page.click("#run")
    s.page.wait_for_selector("body[data-state=done]", timeout=120_000)
    assert s.page.is_hidden("#error")
    assert s.page.text_content("#count") == str(api_rle(server, two_channel_tiff, channel="1")["count"])
    assert s.api_calls()[-1][2]["channel"] == ["1"]
    # the 422s of the refused upload are the only console messages
    assert len(s.errors) == 2 and all("status of 422" in e for e in s.errors), s.errors
    assert s.external == []


def test_api_key_field_appears_when_the_server_needs_one(session, keyed_server, fixture_png):
    s = session(keyed_server)
    s.page.wait_for_selector("#key-field:not([hidden])")
    assert "API key" in s.page.text_content("#status")
    s.page.fill("#api-key", "wrong")
    upload(s, fixture_png, state="error")
    assert "401: missing or wrong API key" in s.page.text_content("#error")
    s.page.fill("#api-key", API_KEY)
    s.page.click("#run")
    s.page.wait_for_selector("body[data-state=done]", timeout=120_000)
    assert s.page.text_content("#count") == str(api_rle(keyed_server, fixture_png, key=API_KEY)["count"])
    assert s.page.is_hidden("#error")
    # GET /model's 401 (how the page learns a key is needed) and the two 401s of the wrong key
    assert len(s.errors) == 3 and all("status of 401" in e for e in s.errors), s.errors
    assert s.external == []


# ---------------------------------------------------------------- the API docs
@pytest.mark.parametrize("path, rendered", [
    ("/docs", ".swagger-ui .info .title"),
    # ReDoc's bundle draws its "API docs by Redocly" logo from https://cdn.redoc.ly/redoc/logo-mini.svg
    pytest.param("/redoc", "h1"),
])
def test_api_docs_load_without_network_or_console_errors(session, server, path, rendered):
    s = session(server, path)
    s.page.wait_for_selector(rendered, timeout=30_000)
    s.page.wait_for_load_state("networkidle")
    assert "nuclei-seg" in s.page.text_content(rendered)
    assert s.external == [], s.external
    assert s.errors == [], s.errors

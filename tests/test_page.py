"""The page at ``GET /`` without a browser: served, self-contained, out of the API schema, packaged.

tests/test_browser.py drives it in Chromium.
"""

from __future__ import annotations

import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.page import PAGE

ROOT = Path(__file__).resolve().parent.parent


def test_page_is_served_and_is_not_part_of_the_api():
    client = TestClient(create_app(Settings()))  # no lifespan: the page needs no model
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<title>nuclei-seg</title>" in r.text
    assert "/" not in client.get("/openapi.json").json()["paths"]


def test_page_is_self_contained_and_uses_only_the_public_api():
    html = PAGE.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "no external scripts, styles or images"
    assert not re.search(r"@import|url\(\s*['\"]?(https?:)?//", html), "no external CSS"
    assert re.findall(r"""fetch\(\s*[`"']([a-z]+)""", html) == ["segment", "model"]  # relative: works under a prefix
    assert len(html.splitlines()) < 400, "small and plain"


def test_page_is_package_data():
    """A non-editable install (the Dockerfile's ``pip install .``) must ship service/static/."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = config.get("package-data", {}).get("service", [])
    shipped = [p for p in (ROOT / "service" / "static").rglob("*") if p.is_file()]
    missing = [str(p.relative_to(ROOT / "service")) for p in shipped
               if not any(fnmatch(str(p.relative_to(ROOT / "service")), pattern) for pattern in patterns)]
    assert shipped and not missing, (
        f"not in [tool.setuptools.package-data] service = [...] of pyproject.toml: {missing}")

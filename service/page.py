"""The page for people at ``GET /``: upload an image, see the overlay, the count and a table of nuclei.

One self-contained HTML file (``service/static/index.html``: inline CSS and JavaScript, no CDN,
no fonts, no external requests), a client of the public API and nothing more: it calls
``POST /segment`` (``format=overlay``, ``rle``, ``labels``, ``geojson``) and ``GET /model`` (to
learn whether the server wants an API key), with the same query parameters as any other client.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

PAGE = files("service") / "static" / "index.html"


def page_html() -> str:
    """The page's HTML (read once per app; a missing file is a packaging error, said so at start)."""
    try:
        return PAGE.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RuntimeError(f"{PAGE} is missing: service/static/*.html must be installed as package data") from None


def install_page(app: FastAPI) -> None:
    """Serve the page at ``GET /`` (left out of the OpenAPI schema: it is not part of the API)."""
    html = page_html()

    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(html, headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

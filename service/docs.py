"""Offline API docs: Swagger UI at ``/docs``, ReDoc at ``/redoc``, and the OpenAPI fix-ups they need.

FastAPI's own pages load their JavaScript, CSS and favicon from CDNs (and ReDoc's from Google
Fonts), so on an air-gapped cluster they come up blank. Here the app serves those assets itself,
at ``/static/docs/<name>``, from the files the installed ``fastapi-offline`` package ships in
``fastapi_offline/static``; the pages are FastAPI's ``get_swagger_ui_html`` / ``get_redoc_html``
pointed at them, without Google Fonts and without Swagger UI's online validator badge
(``validatorUrl: null``), and with ReDoc's one hard-coded remote image (the Redocly logo in its
footer, from cdn.redoc.ly) replaced by an empty ``data:`` URL, which ReDoc then hides, so no
page makes a request to another host.

Licences of what is served: ``fastapi-offline`` itself is MIT (Copyright (c) 2021 Neal Turett,
its dist-info ``licenses/LICENSE``); the files it bundles are upstream builds of Swagger UI 5
(``swagger-ui-bundle.js``, ``swagger-ui.css``; SmartBear, Apache-2.0) and ReDoc 2
(``redoc.standalone.js``; Redocly, MIT). The bundles' headers refer to ``*.LICENSE.txt`` files
that the wheel does not include.

``app.openapi`` is wrapped to rewrite file uploads: FastAPI's OpenAPI 3.1 schema gives them
``contentMediaType: application/octet-stream``, which Swagger UI does not render as a file
picker; ``format: binary`` it does, so "Try it out" offers one picker per image, also for the
``files`` list of ``/segment/batch``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response

#: The remote image ReDoc's bundle loads, and what it is served with instead (ReDoc hides an image that fails).
REDOC_REMOTE_LOGO = (b'src:"https://cdn.redoc.ly/redoc/logo-mini.svg"', b'src:"data:,"')
#: Where the assets are served.
STATIC_URL = "/static/docs"
#: The served assets (nothing else in the package directory is reachable) and their media types.
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}


def asset_dir() -> Path:
    """The installed ``fastapi_offline/static`` directory."""
    return Path(fastapi_offline.__file__).resolve().parent / "static"


def install_docs(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Serve the assets, the two doc pages and the post-processed OpenAPI schema.

    Create the app with ``docs_url=None, redoc_url=None`` so FastAPI's CDN pages are not installed.
    """
    directory = asset_dir()
    missing = [name for name in ASSETS if not (directory / name).is_file()]
    if missing:
        raise RuntimeError(f"fastapi-offline's docs assets are missing from {directory}: {', '.join(missing)}")

    def urls(request: Request) -> tuple[str, str]:
        root = request.scope.get("root_path", "").rstrip("/")
        return f"{root}{app.openapi_url}", f"{root}{STATIC_URL}"

    redoc_js = (directory / "redoc.standalone.js").read_bytes().replace(*REDOC_REMOTE_LOGO)
    cache = {"Cache-Control": "public, max-age=86400"}

    @app.get(f"{STATIC_URL}/{{name}}", include_in_schema=False)
    async def docs_asset(name: str) -> Response:
        if name not in ASSETS:
            raise HTTPException(status_code=404, detail="not found")
        if name == "redoc.standalone.js":
            return Response(redoc_js, media_type=ASSETS[name], headers=cache)
        return FileResponse(directory / name, media_type=ASSETS[name], headers=cache)

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        openapi_url, static = urls(request)
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{static}/swagger-ui-bundle.js",
            swagger_css_url=f"{static}/swagger-ui.css",
            swagger_favicon_url=f"{static}/favicon.png",
            swagger_ui_parameters={**(app.swagger_ui_parameters or {}), "validatorUrl": None},
        )

    @app.get(redoc_url, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        openapi_url, static = urls(request)
        return get_redoc_html(
            openapi_url=openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{static}/redoc.standalone.js",
            redoc_favicon_url=f"{static}/favicon.png",
            with_google_fonts=False,
        )

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = file_pickers(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def file_pickers(schema: dict[str, Any]) -> dict[str, Any]:
    """Rewrite the file fields of every multipart request body to ``{"type": "string", "format": "binary"}``
    (lists of files: their items), in place; returns ``schema``."""
    components = schema.get("components", {}).get("schemas", {})
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            if not isinstance(operation, dict):
                continue
            body = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data")
            if body and "schema" in body:
                _binary(_resolve(body["schema"], components))
    return schema


def _resolve(node: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref", "")
    prefix = "#/components/schemas/"
    return components.get(ref[len(prefix):], {}) if ref.startswith(prefix) else node


def _binary(node: Any) -> None:
    if isinstance(node, dict):
        if node.get("type") == "string" and "contentMediaType" in node:
            del node["contentMediaType"]
            node["format"] = "binary"
        for value in node.values():
            _binary(value)
    elif isinstance(node, list):
        for value in node:
            _binary(value)

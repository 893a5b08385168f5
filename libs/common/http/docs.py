"""``/docs``: the service's API reference for people, rendered by Redoc from
``/openapi.json``. Redoc 2.5.4 (MIT, licence beside it in ``static/``) ships in the package:
nothing is fetched from a CDN, so the page works on a machine without internet access."""

from __future__ import annotations

import html
from importlib import resources

from aiohttp import web

from libs.common.http.contract import contract

REDOC_VERSION = "2.5.4"
_ASSET = "redoc.standalone.js"
_PAGE = """<!doctype html>
<html lang="ja">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} — API</title>
<style>body {{ margin: 0; }}</style>
</head>
<body>
<redoc spec-url="/openapi.json" hide-download-button="false"></redoc>
<script src="/docs/{asset}?v={version}"></script>
</body>
</html>
"""


def add_routes(app: web.Application, title: str) -> None:
    page = _PAGE.format(title=html.escape(title), asset=_ASSET, version=REDOC_VERSION)
    script = resources.files("libs.common.http").joinpath("static", _ASSET).read_bytes()

    @contract(media={"text/html": "the API reference page"})
    async def api_docs(_: web.Request) -> web.Response:
        """The API reference of this service (Redoc over /openapi.json)."""
        return web.Response(text=page, content_type="text/html")

    async def api_docs_script(request: web.Request) -> web.Response:
        """The Redoc script the reference page loads (shipped in the package)."""
        return web.Response(
            body=script,
            content_type="application/javascript",
            headers={"Cache-Control": "public, max-age=86400"},
        )

    api_docs.tayori_role = None  # type: ignore[attr-defined]
    api_docs_script.tayori_role = None  # type: ignore[attr-defined]
    api_docs_script.tayori_hidden = True  # type: ignore[attr-defined]
    app.router.add_get("/docs", api_docs)
    app.router.add_get(f"/docs/{_ASSET}", api_docs_script)

"""キャンペーン / ステップメール / バウンス: their screens come in a later issue."""

from __future__ import annotations

from aiohttp import web

from services.console.web import page, render

routes = web.RouteTableDef()
SOON = {"/campaigns": "キャンペーン", "/steps": "ステップメール", "/bounces": "バウンス"}


def _view(label: str):  # type: ignore[no-untyped-def]
    @page("viewer")
    async def view(request: web.Request) -> web.Response:
        return render(request, "soon.html", title=label)

    return view


for _path, _label in SOON.items():
    routes.get(_path)(_view(_label))

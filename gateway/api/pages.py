"""The gateway's own pages: the demo shop and its catalog, the browser snippet's files, the OpenAPI
document and the human-readable API page."""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from gateway.api import demo, openapi
from gateway.api.http import JSON, ApiError
from gateway.api.recommend import serving
from gateway.runtime import Gateway


class PagesApi:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._demo_page, self._scripts = demo.read_files()
        self._demo_catalog: tuple[str, bytes] | None = None

    async def demo_page(self, request: Request) -> Response:
        if not self.gateway.settings.demo:
            raise ApiError(404, "not-found", "the demo page is off (setting demo)")
        return HTMLResponse(self._demo_page)

    async def demo_catalog(self, request: Request) -> Response:
        if not self.gateway.settings.demo:
            raise ApiError(404, "not-found", "the demo page is off (setting demo)")
        rec = serving(self.gateway)
        cached = self._demo_catalog
        if cached is None or cached[0] != rec.snap.version:
            cached = self._demo_catalog = (rec.snap.version, msgspec.json.encode(demo.catalog(rec.snap)))
        return Response(cached[1], media_type=JSON)

    async def client_script(self, request: Request) -> Response:
        name = request.path_params["name"]
        script = self._scripts.get(name)
        if script is None:
            raise ApiError(404, "not-found", f"no {name}; served: {', '.join(sorted(self._scripts))}", field="name")
        return Response(script, media_type="text/javascript", headers={"cache-control": "public, max-age=300"})

    async def openapi_json(self, request: Request) -> Response:
        return Response(openapi.document_bytes(self.gateway.settings), media_type=JSON)

    async def docs(self, request: Request) -> Response:
        return HTMLResponse(openapi.html_page(self.gateway.settings))

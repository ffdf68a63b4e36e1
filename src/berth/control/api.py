"""The Databricks-compatible control-plane REST API (`/api/2.0/serving-endpoints`).

Off the hot path, so a small framework (Starlette) does the routing; errors become the
Databricks `{"error_code", "message"}` shape here and nowhere else.
"""

from __future__ import annotations

import traceback
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from berth.control.openapi import endpoint_openapi
from berth.control.service import EndpointService
from berth.errors import BerthError, InternalError, MalformedRequest
from berth.http import error_body

BASE = "/api/2.0/serving-endpoints"


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def error_response(exc: BerthError) -> Response:
    status, body, headers = error_body(exc)
    return Response(body, status_code=status, headers={k.decode(): v.decode() for k, v in headers})


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedRequest(f"Request body is not valid JSON: {exc}") from exc


def build_control_app(service: EndpointService) -> Starlette:
    """The control plane's ASGI app over an `EndpointService`."""

    async def create(request: Request) -> Response:
        return json_response(service.create(await _json_body(request), creator="admin"))

    async def list_endpoints(request: Request) -> Response:
        return json_response(service.list())

    async def get(request: Request) -> Response:
        return json_response(service.get(request.path_params["name"]))

    async def delete(request: Request) -> Response:
        await service.delete(request.path_params["name"])
        return json_response({})

    async def update_config(request: Request) -> Response:
        body = await _json_body(request)
        return json_response(service.update_config(request.path_params["name"], body))

    async def patch_tags(request: Request) -> Response:
        body = await _json_body(request)
        return json_response(service.patch_tags(request.path_params["name"], body))

    async def logs(request: Request) -> Response:
        p = request.path_params
        return json_response(service.logs(p["name"], p["served"]))

    async def build_logs(request: Request) -> Response:
        p = request.path_params
        return json_response(service.logs(p["name"], p["served"], build=True))

    async def openapi(request: Request) -> Response:
        # The serving config's entities (the pending one's while the endpoint is being created).
        name = request.path_params["name"]
        view = service.get(name)
        config = view.get("config") or view.get("pending_config") or {}
        pairs = [(e["name"], e["entity_name"]) for e in config.get("served_entities", [])]
        doc = await run_in_threadpool(endpoint_openapi, name, pairs, str(request.base_url))
        accept = request.headers.get("accept", "")
        media = "application/json" if "application/json" in accept and "text/plain" not in accept else "text/plain"
        return Response(orjson.dumps(doc, option=orjson.OPT_INDENT_2), media_type=media)

    async def metrics(request: Request) -> Response:
        text = service.metrics(request.path_params["name"])
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def decisions(request: Request) -> Response:
        q = request.query_params
        return json_response(service.decisions(request.path_params["name"], q.get("served_entity_name"),
                                               q.get("limit", "100")))

    async def on_berth_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, BerthError)
        return error_response(exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "ENDPOINT_NOT_FOUND", 405: "BAD_REQUEST"}.get(exc.status_code, "BAD_REQUEST")
        message = f"No API found for '{request.method} {request.url.path}'."
        return json_response({"error_code": code, "message": message}, exc.status_code)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        traceback.print_exception(exc)
        return error_response(InternalError(f"Internal error: {type(exc).__name__}: {exc}"))

    routes = [
        Route(BASE, create, methods=["POST"]),
        Route(BASE, list_endpoints, methods=["GET"]),
        Route(BASE + "/{name}", get, methods=["GET"]),
        Route(BASE + "/{name}", delete, methods=["DELETE"]),
        Route(BASE + "/{name}/config", update_config, methods=["PUT"]),
        Route(BASE + "/{name}/tags", patch_tags, methods=["PATCH"]),
        Route(BASE + "/{name}/served-models/{served}/logs", logs, methods=["GET"]),
        Route(BASE + "/{name}/served-models/{served}/build-logs", build_logs, methods=["GET"]),
        Route(BASE + "/{name}/openapi", openapi, methods=["GET"]),
        Route(BASE + "/{name}/metrics", metrics, methods=["GET"]),
        Route(BASE + "/{name}/autoscaler/decisions", decisions, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={
            BerthError: on_berth_error,
            HTTPException: on_http_error,
            Exception: on_unexpected,
        },
    )

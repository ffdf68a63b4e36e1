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
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from berth.access import oauth
from berth.access.permissions import Caller, Level
from berth.control.access import AccessService
from berth.control.api_doc import DOC_PATH, platform_openapi, route_pairs
from berth.control.openapi import endpoint_openapi
from berth.control.secrets import SecretService
from berth.control.service import EndpointService
from berth.errors import BerthError, InternalError, MalformedRequest, Unauthenticated
from berth.http import error_body
from berth.payload import PayloadLimits, is_depth_error, too_deep, too_deep_error

BASE = "/api/2.0/serving-endpoints"
SCIM = "/api/2.0/preview/scim/v2"
PERMISSIONS = "/api/2.0/permissions/serving-endpoints/{endpoint_id}"
SECRETS = "/api/2.0/secrets"
OIDC_METADATA, OIDC_TOKEN = oauth.METADATA_PATH, oauth.TOKEN_PATH  # answered without a token


class _ScimCollection(Convertor[str]):
    regex = "Users|ServicePrincipals"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("scim", _ScimCollection())


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def error_response(exc: BerthError) -> Response:
    status, body, headers = error_body(exc)
    return Response(body, status_code=status, headers={k.decode(): v.decode() for k, v in headers})


async def _json_body(request: Request) -> Any:
    raw = await request.body()  # at most BERTH_MAX_BODY_MB: the gateway's `limit_body` stops longer ones
    if not raw.strip():
        return {}
    depth = request.app.state.payload_limits.max_json_depth
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if is_depth_error(exc):
            raise too_deep_error(depth) from exc
        raise MalformedRequest(f"Request body is not valid JSON: {exc}") from exc
    if too_deep(body, depth):
        raise too_deep_error(depth)
    return body


def caller_of(request: Request) -> Caller:
    """The principal the gateway authenticated for this request."""
    caller = request.scope.get("berth.caller")
    if caller is None:
        raise Unauthenticated("Missing credentials: send 'Authorization: Bearer <token>'.")
    return caller  # type: ignore[no-any-return]


def build_control_app(service: EndpointService, access: AccessService, *,
                      payload_limits: PayloadLimits | None = None, secrets: SecretService | None = None) -> Starlette:
    """The control plane's ASGI app over an `EndpointService`, an `AccessService` and a `SecretService`; request
    bodies are held to `payload_limits`' JSON depth (their size is the gateway's to check)."""

    def allowed(request: Request, needed: Level) -> tuple[Caller, Level]:
        caller = caller_of(request)
        return caller, access.require(caller, request.path_params["name"], needed)

    async def create(request: Request) -> Response:
        caller = caller_of(request)
        view = await service.create(await _json_body(request), creator=caller.name, owner=caller.id, caller=caller)
        access.changed()  # the creator may query it
        return json_response({**view, "permission_level": Level.CAN_MANAGE.name})

    async def list_endpoints(request: Request) -> Response:
        return json_response(service.list(access.visible(caller_of(request))))

    async def get(request: Request) -> Response:
        _, level = allowed(request, Level.CAN_VIEW)
        return json_response({**service.get(request.path_params["name"]), "permission_level": level.name})

    async def delete(request: Request) -> Response:
        allowed(request, Level.CAN_MANAGE)
        await service.delete(request.path_params["name"])
        access.changed()
        return json_response({})

    async def update_config(request: Request) -> Response:
        caller, _ = allowed(request, Level.CAN_MANAGE)
        body = await _json_body(request)
        return json_response(await service.update_config(request.path_params["name"], body, caller=caller))

    async def patch_tags(request: Request) -> Response:
        allowed(request, Level.CAN_MANAGE)
        body = await _json_body(request)
        return json_response(service.patch_tags(request.path_params["name"], body))

    async def put_ai_gateway(request: Request) -> Response:
        allowed(request, Level.CAN_MANAGE)
        body = await _json_body(request)
        return json_response(service.put_ai_gateway(request.path_params["name"], body))

    async def put_rate_limits(request: Request) -> Response:
        allowed(request, Level.CAN_MANAGE)
        body = await _json_body(request)
        return json_response(service.put_ai_gateway(request.path_params["name"], body, legacy=True))

    async def logs(request: Request) -> Response:
        allowed(request, Level.CAN_MANAGE)  # replica output may show what the model's environment holds
        p = request.path_params
        return json_response(service.logs(p["name"], p["served"]))

    async def build_logs(request: Request) -> Response:
        allowed(request, Level.CAN_MANAGE)
        p = request.path_params
        return json_response(service.logs(p["name"], p["served"], build=True))

    async def openapi(request: Request) -> Response:
        # The serving config's entities (the pending one's while the endpoint is being created).
        allowed(request, Level.CAN_VIEW)
        name = request.path_params["name"]
        doc = await run_in_threadpool(endpoint_openapi, name, service.model_locations(name), str(request.base_url))
        accept = request.headers.get("accept", "")
        media = "application/json" if "application/json" in accept and "text/plain" not in accept else "text/plain"
        return Response(orjson.dumps(doc, option=orjson.OPT_INDENT_2), media_type=media)

    async def metrics(request: Request) -> Response:
        allowed(request, Level.CAN_VIEW)
        text = service.metrics(request.path_params["name"])
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def series(request: Request) -> Response:
        allowed(request, Level.CAN_VIEW)
        return json_response(service.series(request.path_params["name"]))

    async def decisions(request: Request) -> Response:
        allowed(request, Level.CAN_VIEW)
        q = request.query_params
        return json_response(service.decisions(request.path_params["name"], q.get("served_entity_name"),
                                               q.get("limit", "100")))

    async def platform_doc(request: Request) -> Response:
        caller_of(request)  # any authenticated caller
        return json_response(platform_openapi(route_pairs(request.app.routes), str(request.base_url)))

    # Identities and credentials
    async def scim_create(request: Request) -> Response:
        return json_response(access.scim_create(caller_of(request), request.path_params["kind"],
                                                await _json_body(request)), 201)

    async def scim_list(request: Request) -> Response:
        return json_response(access.scim_list(caller_of(request), request.path_params["kind"]))

    async def scim_get(request: Request) -> Response:
        p = request.path_params
        return json_response(access.scim_get(caller_of(request), p["kind"], p["id"]))

    async def scim_delete(request: Request) -> Response:
        p = request.path_params
        access.scim_delete(caller_of(request), p["kind"], p["id"])
        return Response(status_code=204)

    async def me(request: Request) -> Response:
        return json_response(access.me(caller_of(request)))

    async def new_secret(request: Request) -> Response:
        return json_response(access.new_secret(caller_of(request), request.path_params["id"]))

    async def token_create(request: Request) -> Response:
        return json_response(access.create_token(caller_of(request), await _json_body(request)))

    async def token_on_behalf(request: Request) -> Response:
        return json_response(access.create_token_for(caller_of(request), await _json_body(request)))

    async def token_list(request: Request) -> Response:
        return json_response(access.list_tokens(caller_of(request)))

    async def token_delete(request: Request) -> Response:
        access.delete_token(caller_of(request), await _json_body(request))
        return json_response({})

    async def oidc_metadata(request: Request) -> Response:
        return json_response(oauth.metadata(str(request.base_url)))

    async def host_metadata(request: Request) -> Response:
        return json_response(oauth.host_metadata(str(request.base_url)))

    async def oidc_token(request: Request) -> Response:
        try:
            answer = access.oauth_token(await request.body(), request.headers.get("authorization"))
        except oauth.OAuthError as exc:
            return json_response(exc.to_dict(), exc.status)
        return json_response(answer)

    async def permissions_get(request: Request) -> Response:
        return json_response(access.get_permissions(caller_of(request), request.path_params["endpoint_id"]))

    async def permissions_put(request: Request) -> Response:
        return json_response(access.set_permissions(caller_of(request), request.path_params["endpoint_id"],
                                                    await _json_body(request), replace=True))

    async def permissions_patch(request: Request) -> Response:
        return json_response(access.set_permissions(caller_of(request), request.path_params["endpoint_id"],
                                                    await _json_body(request), replace=False))

    async def permission_levels(request: Request) -> Response:
        return json_response(access.permission_levels(caller_of(request), request.path_params["endpoint_id"]))

    # Secrets (berth.control.secrets): no route answers a value
    def secret_store() -> SecretService:
        if secrets is None:
            raise InternalError("This server has no secret store.")
        return secrets

    async def secrets_scope_create(request: Request) -> Response:
        return json_response(secret_store().create_scope(caller_of(request), await _json_body(request)))

    async def secrets_scope_delete(request: Request) -> Response:
        return json_response(secret_store().delete_scope(caller_of(request), await _json_body(request)))

    async def secrets_scope_list(request: Request) -> Response:
        return json_response(secret_store().list_scopes(caller_of(request)))

    async def secrets_put(request: Request) -> Response:
        return json_response(secret_store().put(caller_of(request), await _json_body(request)))

    async def secrets_list(request: Request) -> Response:
        return json_response(secret_store().list_secrets(caller_of(request), dict(request.query_params)))

    async def secrets_delete(request: Request) -> Response:
        return json_response(secret_store().delete(caller_of(request), await _json_body(request)))

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
        Route(BASE + "/{name}/ai-gateway", put_ai_gateway, methods=["PUT"]),
        Route(BASE + "/{name}/rate-limits", put_rate_limits, methods=["PUT"]),
        Route(BASE + "/{name}/served-models/{served}/logs", logs, methods=["GET"]),
        Route(BASE + "/{name}/served-models/{served}/build-logs", build_logs, methods=["GET"]),
        Route(BASE + "/{name}/openapi", openapi, methods=["GET"]),
        Route(BASE + "/{name}/metrics", metrics, methods=["GET"]),
        Route(BASE + "/{name}/autoscaler/decisions", decisions, methods=["GET"]),
        Route(BASE + "/{name}/series", series, methods=["GET"]),
        Route(DOC_PATH, platform_doc, methods=["GET"]),
        Route(SCIM + "/Me", me, methods=["GET"]),
        Route(SCIM + "/{kind:scim}", scim_create, methods=["POST"]),
        Route(SCIM + "/{kind:scim}", scim_list, methods=["GET"]),
        Route(SCIM + "/{kind:scim}/{id}", scim_get, methods=["GET"]),
        Route(SCIM + "/{kind:scim}/{id}", scim_delete, methods=["DELETE"]),
        Route("/api/2.0/accounts/servicePrincipals/{id}/credentials/secrets", new_secret, methods=["POST"]),
        Route("/api/2.0/token/create", token_create, methods=["POST"]),
        Route("/api/2.0/token/list", token_list, methods=["GET"]),
        Route("/api/2.0/token/delete", token_delete, methods=["POST"]),
        Route("/api/2.0/token-management/on-behalf-of/tokens", token_on_behalf, methods=["POST"]),
        Route(oauth.HOST_METADATA_PATH, host_metadata, methods=["GET"]),
        Route(OIDC_METADATA, oidc_metadata, methods=["GET"]),
        Route(OIDC_TOKEN, oidc_token, methods=["POST"]),
        Route(PERMISSIONS, permissions_get, methods=["GET"]),
        Route(PERMISSIONS, permissions_put, methods=["PUT"]),
        Route(PERMISSIONS, permissions_patch, methods=["PATCH"]),
        Route(PERMISSIONS + "/permissionLevels", permission_levels, methods=["GET"]),
        Route(SECRETS + "/scopes/create", secrets_scope_create, methods=["POST"]),
        Route(SECRETS + "/scopes/delete", secrets_scope_delete, methods=["POST"]),
        Route(SECRETS + "/scopes/list", secrets_scope_list, methods=["GET"]),
        Route(SECRETS + "/put", secrets_put, methods=["POST"]),
        Route(SECRETS + "/list", secrets_list, methods=["GET"]),
        Route(SECRETS + "/delete", secrets_delete, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            BerthError: on_berth_error,
            HTTPException: on_http_error,
            Exception: on_unexpected,
        },
    )
    app.state.payload_limits = payload_limits or PayloadLimits()
    return app

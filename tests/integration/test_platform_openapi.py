"""`GET /api/2.0/openapi`: the platform's OpenAPI 3.1 document names exactly the routes the server has
(every route of `build_control_app` plus the gateway's own paths), validates, and loads in schemathesis."""

from __future__ import annotations

import re
from typing import Any, cast

import httpx
import pytest
import schemathesis
from openapi_spec_validator import validate
from starlette.routing import Route

from berth.control.api import build_control_app
from berth.control.api_doc import OPERATIONS, platform_openapi, route_pairs

DOC = "/api/2.0/openapi"
# Answered by berth.gateway.app itself, before the control plane's app.
GATEWAY = {("/serving-endpoints/{name}/invocations", "POST"), ("/ping", "GET"), ("/health", "GET"),
           ("/metrics", "GET"), ("/dashboard", "GET")}
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


def control_routes() -> list[Route]:
    app = build_control_app(cast(Any, None), cast(Any, None))  # the route table needs no service to exist
    return [r for r in app.routes if isinstance(r, Route)]


def documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, method.upper()) for path, item in doc["paths"].items() for method in item if method in HTTP_METHODS}


def alternatives(route: Route) -> int:
    """How many concrete paths one route stands for (SCIM's `{kind:scim}` is Users or ServicePrincipals)."""
    count = 1
    for convertor in route.param_convertors.values():
        if re.fullmatch(r"\w+(\|\w+)+", convertor.regex):
            count *= len(convertor.regex.split("|"))
    return count


def assert_matches_route_table(doc: dict[str, Any]) -> None:
    """Each documented control-plane operation is served by exactly one route (same method), and each
    route's methods (HEAD aside) are documented once per concrete path."""
    routes = control_routes()
    ops = documented(doc)
    assert ops >= GATEWAY
    hits: dict[tuple[int, str], int] = {}
    for path, method in ops - GATEWAY:
        concrete = re.sub(r"\{\w+\}", "x", path)
        served = [(i, method) for i, r in enumerate(routes)
                  if r.path_regex.match(concrete) and method in (r.methods or ())]
        assert len(served) == 1, f"{method} {path} is served by {len(served)} routes"
        hits[served[0]] = hits.get(served[0], 0) + 1
    for i, route in enumerate(routes):
        for method in sorted((route.methods or set()) - {"HEAD"}):
            assert hits.get((i, method), 0) == alternatives(route), f"{method} {route.path} is not documented"


def test_document_covers_the_route_table_exactly() -> None:
    doc = platform_openapi(route_pairs(control_routes()), "http://127.0.0.1:1")
    validate(doc)  # type: ignore[arg-type]
    assert_matches_route_table(doc)
    # No description of a route that does not exist (it would be left out of the document silently).
    assert set(OPERATIONS) == documented(doc)


def test_every_operation_says_how_it_authenticates_and_fails() -> None:
    doc = platform_openapi(route_pairs(control_routes()))
    assert doc["security"] == [{"bearer": []}]
    bearer = doc["components"]["securitySchemes"]["bearer"]
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer")
    open_paths = {"/ping", "/health", "/dashboard", "/oidc/v1/token", "/oidc/.well-known/oauth-authorization-server",
                  "/.well-known/databricks-config"}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            if path in open_paths:
                assert op["security"] == [], (method, path)
                continue
            assert "security" not in op, (method, path)  # the document's bearer requirement
            error = op["responses"]["401"]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/Error"}, (method, path)
            if "requestBody" in op:
                assert "400" in op["responses"], (method, path)
    assert doc["components"]["schemas"]["Error"]["required"] == ["error_code", "message"]


def test_a_route_without_a_description_is_left_out() -> None:
    """Which is what makes `test_document_covers_the_route_table_exactly` fail for an undocumented route."""
    undocumented = ("/api/2.0/serving-endpoints/{name}/undocumented", "POST")
    assert undocumented not in documented(platform_openapi([*route_pairs(control_routes()), undocumented]))


def test_served_document_validates_and_loads_in_schemathesis(shared_server) -> None:
    response = shared_server.client.get(DOC)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    doc = response.json()
    validate(doc)
    assert doc["openapi"] == "3.1.0"
    assert doc["servers"] == [{"url": shared_server.url}]
    assert_matches_route_table(doc)
    operations = [result.ok() for result in schemathesis.openapi.from_dict(doc).get_all_operations()]
    assert {(op.path, op.method.upper()) for op in operations} == documented(doc)


def test_any_authenticated_caller_may_read_it_and_nobody_else(shared_server, unique_name) -> None:
    assert httpx.get(shared_server.url + DOC).status_code == 401
    user = f"{unique_name}@example.com"
    assert shared_server.client.post("/api/2.0/preview/scim/v2/Users", json={"userName": user}).status_code == 201
    token = shared_server.client.post("/api/2.0/token-management/on-behalf-of/tokens", json={"user_name": user})
    assert token.status_code == 200, token.text
    answer = httpx.get(shared_server.url + DOC, headers={"Authorization": f"Bearer {token.json()['token_value']}"})
    assert answer.status_code == 200
    assert answer.json()["paths"] == shared_server.client.get(DOC).json()["paths"]


@pytest.mark.parametrize("count", ["²", "9" * 5000])
def test_odd_digit_strings_as_concurrency_are_a_400_not_a_500(shared_server, unique_name, count) -> None:
    """Regression: `str.isdigit` accepted these and `int()` then raised (500 INTERNAL_ERROR)."""
    entity = {"entity_name": "/models/none", "max_provisioned_concurrency": count}
    response = shared_server.create(unique_name, {"served_entities": [entity]})
    assert response.status_code == 400, response.text
    assert response.json()["error_code"] == "INVALID_PARAMETER_VALUE"

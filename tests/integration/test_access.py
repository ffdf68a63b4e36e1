"""Identities, tokens and permissions against a real server: SCIM, PATs, OAuth m2m with the official SDK,
and per-endpoint grants on the control plane and the hot path."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from databricks.sdk import WorkspaceClient

from tests.conftest import ServerProcess

pytestmark = pytest.mark.both_stores  # every server test here runs on SQLite and on PostgreSQL

SCIM = "/api/2.0/preview/scim/v2"
BODY = {"inputs": [[1.0, 2.0, 3.0]]}


def call(server: ServerProcess, token: str | None, method: str, path: str, body: Any = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, server.url + path, json=body, headers=headers, timeout=30.0)


@pytest.fixture(scope="module")
def endpoint(shared_server: ServerProcess, model_zoo: Any) -> Iterator[dict[str, Any]]:
    name = f"acl-{uuid.uuid4().hex[:8]}"
    shared_server.deploy(name, model_zoo("tensor_model"))
    yield shared_server.get(name)
    shared_server.api("DELETE", f"/{name}")


@pytest.fixture(scope="module")
def bob(shared_server: ServerProcess) -> dict[str, str]:
    """A user with a token the admin made for him."""
    user_name = f"bob-{uuid.uuid4().hex[:6]}@example.com"
    user = call(shared_server, shared_server.token, "POST", f"{SCIM}/Users", {"userName": user_name})
    assert user.status_code == 201, user.text
    token = call(shared_server, shared_server.token, "POST", "/api/2.0/token-management/on-behalf-of/tokens",
                 {"user_name": user_name, "comment": "test"})
    assert token.status_code == 200, token.text
    return {"id": user.json()["id"], "name": user_name, "token": token.json()["token_value"]}


def test_a_user_needs_a_grant_then_can_query_but_not_manage(shared_server, endpoint, bob):  # type: ignore[no-untyped-def]
    name, token = endpoint["name"], bob["token"]
    invocations = f"/serving-endpoints/{name}/invocations"
    assert call(shared_server, token, "GET", f"{SCIM}/Me").json()["userName"] == bob["name"]
    # No grant: refused everywhere, and the endpoint is not listed.
    denied = call(shared_server, token, "POST", invocations, BODY)
    assert denied.status_code == 403, denied.text
    assert denied.json()["error_code"] == "PERMISSION_DENIED"
    assert call(shared_server, token, "GET", f"/api/2.0/serving-endpoints/{name}").status_code == 403
    listed = call(shared_server, token, "GET", "/api/2.0/serving-endpoints").json()["endpoints"]
    assert name not in [e["name"] for e in listed]
    assert call(shared_server, token, "POST", "/serving-endpoints/no-such/invocations", BODY).status_code == 404

    # CAN_QUERY: invoke and view, but not change the config or the permissions.
    perms = f"/api/2.0/permissions/serving-endpoints/{endpoint['id']}"
    granted = call(shared_server, shared_server.token, "PATCH", perms, {"access_control_list": [
        {"user_name": bob["name"], "permission_level": "CAN_QUERY"}]})
    assert granted.status_code == 200, granted.text
    assert call(shared_server, token, "POST", invocations, BODY).status_code == 200
    view = call(shared_server, token, "GET", f"/api/2.0/serving-endpoints/{name}")
    assert view.json()["permission_level"] == "CAN_QUERY"
    config = {"served_entities": endpoint["config"]["served_entities"]}
    changed = call(shared_server, token, "PUT", f"/api/2.0/serving-endpoints/{name}/config", config)
    assert changed.status_code == 403, changed.text
    assert call(shared_server, token, "PUT", perms, {"access_control_list": []}).status_code == 403
    assert call(shared_server, token, "GET", f"{SCIM}/Users").status_code == 403  # admins only
    levels = call(shared_server, token, "GET", perms + "/permissionLevels").json()["permission_levels"]
    assert [x["permission_level"] for x in levels] == ["CAN_VIEW", "CAN_QUERY", "CAN_MANAGE"]

    # A group entry is refused and changes nothing.
    bad = call(shared_server, shared_server.token, "PUT", perms, {"access_control_list": [
        {"group_name": "users", "permission_level": "CAN_QUERY"}]})
    assert bad.status_code == 400
    assert bad.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    assert call(shared_server, token, "POST", invocations, BODY).status_code == 200

    # Taking the grant away stops the next query.
    removed = call(shared_server, shared_server.token, "PUT", perms, {"access_control_list": []})
    assert removed.status_code == 200
    assert call(shared_server, token, "POST", invocations, BODY).status_code == 403


def test_own_tokens_expire_and_a_revoked_one_is_refused_at_once(shared_server, bob):  # type: ignore[no-untyped-def]
    short = call(shared_server, bob["token"], "POST", "/api/2.0/token/create", {"lifetime_seconds": 2,
                                                                                 "comment": "short"})
    assert short.status_code == 200, short.text
    value, info = short.json()["token_value"], short.json()["token_info"]
    assert call(shared_server, value, "GET", f"{SCIM}/Me").status_code == 200
    listed = call(shared_server, bob["token"], "GET", "/api/2.0/token/list").json()["token_infos"]
    assert info["token_id"] in [t["token_id"] for t in listed]
    deadline = info["expiry_time"] / 1000 + 0.5
    time.sleep(max(0.0, deadline - time.time()))
    expired = call(shared_server, value, "GET", f"{SCIM}/Me")
    assert expired.status_code == 401
    assert expired.json()["error_code"] == "UNAUTHENTICATED"

    kept = call(shared_server, bob["token"], "POST", "/api/2.0/token/create", {"comment": "revoke me"}).json()
    assert call(shared_server, kept["token_value"], "GET", f"{SCIM}/Me").status_code == 200
    gone = call(shared_server, bob["token"], "POST", "/api/2.0/token/delete",
                {"token_id": kept["token_info"]["token_id"]})
    assert gone.status_code == 200
    assert call(shared_server, kept["token_value"], "GET", f"{SCIM}/Me").status_code == 401


def test_a_service_principal_lists_and_queries_through_the_sdk_with_oauth_m2m(shared_server, endpoint):  # type: ignore[no-untyped-def]
    admin = shared_server.token
    sp = call(shared_server, admin, "POST", f"{SCIM}/ServicePrincipals", {"displayName": "ci-bot"})
    assert sp.status_code == 201, sp.text
    sp_id, app_id = sp.json()["id"], sp.json()["applicationId"]
    secret = call(shared_server, admin, "POST", f"/api/2.0/accounts/servicePrincipals/{sp_id}/credentials/secrets")
    assert secret.status_code == 200, secret.text
    perms = f"/api/2.0/permissions/serving-endpoints/{endpoint['id']}"
    granted = call(shared_server, admin, "PATCH", perms, {"access_control_list": [
        {"service_principal_name": app_id, "permission_level": "CAN_QUERY"}]})
    assert granted.status_code == 200, granted.text
    assert call(shared_server, None, "GET", "/oidc/.well-known/oauth-authorization-server").json()[
        "token_endpoint"].endswith("/oidc/v1/token")

    ws = WorkspaceClient(host=shared_server.url, client_id=app_id, client_secret=secret.json()["secret"],
                         auth_type="oauth-m2m")
    assert [e.name for e in ws.serving_endpoints.list()] == [endpoint["name"]]
    answer = ws.serving_endpoints.query(name=endpoint["name"], inputs=BODY["inputs"])
    assert answer.predictions is not None

    wrong = httpx.post(shared_server.url + "/oidc/v1/token", data={"grant_type": "client_credentials"},
                       auth=(app_id, "bsec_wrong"), timeout=30.0)
    assert wrong.status_code == 401
    assert wrong.json()["error"] == "invalid_client"
    # Deleting the principal ends its OAuth tokens too.
    token = httpx.post(shared_server.url + "/oidc/v1/token", data={"grant_type": "client_credentials",
                                                                   "scope": "all-apis"},
                       auth=(app_id, secret.json()["secret"]), timeout=30.0).json()["access_token"]
    assert call(shared_server, token, "GET", f"{SCIM}/Me").status_code == 200
    assert call(shared_server, admin, "DELETE", f"{SCIM}/ServicePrincipals/{sp_id}").status_code == 204
    assert call(shared_server, token, "GET", f"{SCIM}/Me").status_code == 401


def test_every_gateway_process_applies_grants_and_revocations(server_factory, model_zoo):  # type: ignore[no-untyped-def]
    server = server_factory(args=["--gateway-workers", "2"])
    server.deploy("shared", model_zoo("tensor_model"))
    endpoint = server.get("shared")
    user = call(server, server.token, "POST", f"{SCIM}/Users", {"userName": "carol@example.com"}).json()
    token = call(server, server.token, "POST", "/api/2.0/token-management/on-behalf-of/tokens",
                 {"user_name": "carol@example.com"}).json()["token_value"]
    assert user["userName"] == "carol@example.com"
    invocations = "/serving-endpoints/shared/invocations"

    def by_gateway(expected: int) -> dict[str, int]:
        seen: dict[str, int] = {}
        for _ in range(40):  # a fresh connection each: the kernel spreads them over both processes
            response = call(server, token, "POST", invocations, BODY)
            assert response.status_code == expected, response.text
            gateway = response.headers["x-berth-gateway"]
            seen[gateway] = seen.get(gateway, 0) + 1
        return seen

    assert set(by_gateway(403)) == {"0", "1"}
    perms = f"/api/2.0/permissions/serving-endpoints/{endpoint['id']}"
    assert call(server, server.token, "PATCH", perms, {"access_control_list": [
        {"user_name": "carol@example.com", "permission_level": "CAN_QUERY"}]}).status_code == 200
    assert set(by_gateway(200)) == {"0", "1"}  # both processes got the grant with the change
    token_id = call(server, token, "GET", "/api/2.0/token/list").json()["token_infos"][0]["token_id"]
    assert call(server, token, "POST", "/api/2.0/token/delete", {"token_id": token_id}).status_code == 200
    assert set(by_gateway(401)) == {"0", "1"}  # and the revocation


def test_the_cli_creates_users_and_service_principals_with_credentials_shown_once(shared_server):  # type: ignore[no-untyped-def]
    from tests.integration.test_cli import berth

    env = {"BERTH_HOST": shared_server.url, "BERTH_TOKEN": shared_server.token}
    name = f"dave-{uuid.uuid4().hex[:6]}@example.com"
    made = berth("users", "create", name, env=env)
    assert made.returncode == 0, made.stderr
    token = made.stdout.split("(shown once):")[1].split()[0]
    assert call(shared_server, token, "GET", f"{SCIM}/Me").json()["userName"] == name
    listed = berth("users", "list", env=env)
    assert name in listed.stdout
    bot = f"bot-{uuid.uuid4().hex[:6]}"
    assert berth("principals", "create", bot, env=env).returncode == 0
    secret = berth("principals", "secret", bot, env=env)
    assert secret.returncode == 0, secret.stderr
    fields = dict(line.split(":", 1) for line in secret.stdout.splitlines() if line.startswith("client_"))
    client_id, client_secret = fields["client_id"].strip(), fields["client_secret"].split()[0]
    answer = httpx.post(shared_server.url + "/oidc/v1/token", data={"grant_type": "client_credentials"},
                        auth=(client_id, client_secret), timeout=30.0)
    assert answer.status_code == 200, answer.text
    refused = berth("users", "create", "eve@example.com", env={**env, "BERTH_TOKEN": token})  # not an admin
    assert refused.returncode == 1
    assert "PERMISSION_DENIED" in refused.stderr
    assert berth("users", "delete", name, env=env).returncode == 0
    assert call(shared_server, token, "GET", f"{SCIM}/Me").status_code == 401


def test_scim_bodies_of_the_wrong_shape_are_refused_and_create_nothing(shared_server):  # type: ignore[no-untyped-def]
    admin = shared_server.token
    before = call(shared_server, admin, "GET", f"{SCIM}/Users").json()["totalResults"]
    name = f"carol-{uuid.uuid4().hex[:6]}@example.com"
    for body in ({"userName": name, "displayName": 7}, {"userName": name, "displayName": "  "},
                 {"userName": name, "displayName": "x" * 257}, {"userName": ""}, {"displayName": "no user name"}):
        bad = call(shared_server, admin, "POST", f"{SCIM}/Users", body)
        assert bad.status_code == 400, (body, bad.text)
        assert bad.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    assert call(shared_server, admin, "GET", f"{SCIM}/Users").json()["totalResults"] == before
    made = call(shared_server, admin, "POST", f"{SCIM}/Users", {"userName": name})
    assert made.status_code == 201, made.text
    assert made.json()["displayName"] == name  # none given: the user name

"""Bearer-token authentication on every path but the few open ones, and the generated admin token."""

from __future__ import annotations

import json
import os
import signal
import ssl
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from berth.gateway.auth import hash_token
from tests.conftest import ADMIN_TOKEN, REPO, SERVER_START_TIMEOUT_S, ServerProcess, start_server

pytestmark = pytest.mark.both_stores  # every server test here runs on SQLite and on PostgreSQL

BASE = "/api/2.0/serving-endpoints"
# Every request goes out on a fresh client (no header, cookie or connection carried over), and httpx
# builds an SSL context, CA bundle and all, for each client: ~30 ms. The server speaks plain HTTP, so
# the clients share one context.
SSL_CONTEXT = ssl.create_default_context()

# Authorization headers that must all be refused (None: no header at all).
BAD_AUTH: dict[str, Callable[[str], str | None]] = {
    "missing": lambda token: None,
    "wrong-token": lambda token: "Bearer berth_this_is_not_the_token",
    "token-plus-suffix": lambda token: f"Bearer {token}x",
    "token-prefix": lambda token: f"Bearer {token[:-1]}",
    "bare-bearer": lambda token: "Bearer",
    "token-without-scheme": lambda token: token,
    "basic-scheme": lambda token: f"Basic {token}",
    "token-scheme": lambda token: f"Token {token}",
    "bearer-as-token": lambda token: f"Bearer Bearer {token}",
}


@pytest.fixture(scope="module")
def endpoint(shared_server: ServerProcess, model_zoo: Any) -> Iterator[str]:
    """A READY endpoint, so refused requests are refused for auth and nothing else."""
    name = f"auth-{uuid.uuid4().hex[:8]}"
    shared_server.deploy(name, model_zoo("tensor_model"))
    yield name
    shared_server.api("DELETE", f"/{name}")


def requests_for(endpoint: str, served: str, model: str) -> list[tuple[str, str, Any]]:
    """(method, path, json body) for every control-plane and data-plane route."""
    config = {"served_entities": [{"entity_name": model}]}
    return [
        ("GET", BASE, None),
        ("POST", BASE, {"name": f"auth-new-{uuid.uuid4().hex[:8]}", "config": config}),
        ("GET", f"{BASE}/{endpoint}", None),
        ("PUT", f"{BASE}/{endpoint}/config", config),
        ("GET", f"{BASE}/{endpoint}/served-models/{served}/logs", None),
        ("GET", f"{BASE}/{endpoint}/served-models/{served}/build-logs", None),
        ("DELETE", f"{BASE}/{endpoint}", None),
        ("POST", f"/serving-endpoints/{endpoint}/invocations", {"inputs": [[1.0, 2.0, 3.0]]}),
        ("POST", "/serving-endpoints/no-such-endpoint/invocations", {"inputs": [[1.0, 2.0, 3.0]]}),
        ("GET", f"{BASE}/no-such-endpoint", None),
        ("GET", "/api/2.0/no-such-api", None),
        ("GET", "/metrics", None),
        ("GET", "/", None),
        ("GET", "/api/2.0/preview/scim/v2/Me", None),
        ("GET", "/api/2.0/preview/scim/v2/Users", None),
        ("POST", "/api/2.0/preview/scim/v2/Users", {"userName": f"u-{uuid.uuid4().hex[:6]}"}),
        ("POST", "/api/2.0/preview/scim/v2/ServicePrincipals", {"displayName": "sp"}),
        ("DELETE", "/api/2.0/preview/scim/v2/Users/1", None),
        ("POST", "/api/2.0/accounts/servicePrincipals/1/credentials/secrets", None),
        ("POST", "/api/2.0/token/create", {"comment": "x"}),
        ("GET", "/api/2.0/token/list", None),
        ("POST", "/api/2.0/token/delete", {"token_id": "x"}),
        ("POST", "/api/2.0/token-management/on-behalf-of/tokens", {"user_name": "admin"}),
        ("GET", "/api/2.0/permissions/serving-endpoints/x", None),
        ("PUT", "/api/2.0/permissions/serving-endpoints/x", {"access_control_list": []}),
        ("PATCH", "/api/2.0/permissions/serving-endpoints/x", {"access_control_list": []}),
        ("GET", "/api/2.0/permissions/serving-endpoints/x/permissionLevels", None),
    ]


def send(
    server: ServerProcess, method: str, path: str, body: Any, authorization: str | None
) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    content = None if body is None else json.dumps(body).encode()
    with httpx.Client(base_url=server.url, timeout=30, verify=SSL_CONTEXT) as client:
        return client.request(method, path, content=content, headers=headers)


def assert_unauthenticated(response: httpx.Response) -> None:
    assert response.status_code == 401, (response.request.method, response.request.url, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error_code"] == "UNAUTHENTICATED"
    assert isinstance(body["message"], str)
    assert body["message"]


@pytest.mark.parametrize("variant", list(BAD_AUTH))
def test_every_route_refuses_a_request_without_a_valid_token(shared_server, endpoint, model_zoo, variant):
    view = shared_server.get(endpoint)
    served = view["config"]["served_entities"][0]["name"]
    authorization = BAD_AUTH[variant](shared_server.token)
    for method, path, body in requests_for(endpoint, served, str(model_zoo("tensor_model"))):
        assert_unauthenticated(send(shared_server, method, path, body, authorization))
    # Nothing the refused requests asked for happened.
    after = shared_server.get(endpoint)
    assert after["config"]["config_version"] == view["config"]["config_version"]
    assert after["state"] == {"ready": "READY", "config_update": "NOT_UPDATING"}
    names = [e["name"] for e in shared_server.api("GET").json()["endpoints"]]
    assert not [n for n in names if n.startswith("auth-new-")]


def test_the_same_requests_with_the_token_are_served(shared_server, endpoint):
    good = f"Bearer {shared_server.token}"
    listed = send(shared_server, "GET", BASE, None, good)
    assert listed.status_code == 200
    assert endpoint in [e["name"] for e in listed.json()["endpoints"]]
    invocations = f"/serving-endpoints/{endpoint}/invocations"
    answer = send(shared_server, "POST", invocations, {"inputs": [[1, 2, 3]]}, good)
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"] == pytest.approx([6.0])
    # The scheme is case-insensitive (RFC 7235).
    lower = send(shared_server, "GET", f"{BASE}/{endpoint}", None, f"bearer {shared_server.token}")
    assert lower.status_code == 200


@pytest.mark.parametrize("authorization", [None, "Bearer berth_wrong", "Basic dXNlcjpwYXNz"])
def test_open_paths_need_no_token(shared_server, authorization):
    for path in ("/ping", "/health"):
        response = send(shared_server, "GET", path, None, authorization)
        assert response.status_code == 200, (path, response.text)
    # The SDK asks this before it authenticates: the OIDC root, for the oauth-m2m flow.
    discovery = send(shared_server, "GET", "/.well-known/databricks-config", None, authorization)
    assert discovery.status_code == 200, discovery.text
    assert discovery.json()["oidc_endpoint"] == shared_server.url + "/oidc"


def test_the_sdk_reports_a_wrong_token_as_unauthenticated(shared_server):
    from databricks.sdk import WorkspaceClient
    from databricks.sdk.errors import Unauthenticated

    ws = WorkspaceClient(host=shared_server.url, token="berth_wrong_token", auth_type="pat")
    with pytest.raises(Unauthenticated, match="Invalid access token"):
        list(ws.serving_endpoints.list())


# A server without BERTH_ADMIN_TOKEN


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _start_keeping_credentials(base: Path, data_dir: Path, store_url: str | None) -> ServerProcess:
    """`start_server`, except the old credentials file stays for the server to find."""
    config_dir = base / "config"
    creds = config_dir / "credentials.json"
    before = creds.stat()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BERTH_")}
    env.update(BERTH_CONFIG_DIR=str(config_dir), PYTHONUNBUFFERED="1")
    if store_url:
        env["BERTH_STORE_URL"] = store_url
    log_path = base / f"server-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "berth", "server", "--port", "0", "--data-dir", str(data_dir)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO), start_new_session=True,
        )
    server = ServerProcess(proc, data_dir, config_dir, log_path, store_url=store_url)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while True:  # rewritten (a new file, atomically) once the server listens
        try:
            now = creds.stat()
            if (now.st_ino, now.st_mtime_ns) != (before.st_ino, before.st_mtime_ns):
                break
        except FileNotFoundError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop(signal.SIGKILL)
            raise AssertionError(f"berth server did not restart:\n{server.log_tail()}")
        time.sleep(0.05)
    saved = json.loads(creds.read_text())
    server.url, server.token = saved["host"], saved["token"]
    server.connect()
    return server


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.stop()


def _stored(server: ServerProcess) -> bytes:
    """Everything the server's store holds: the SQLite files in its data dir, or every PostgreSQL row."""
    if server.store_url is None:
        return b"".join(p.read_bytes() for p in server.data_dir.glob("berth.db*"))
    engine = sa.create_engine(server.store_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            tables = sa.inspect(conn).get_table_names()
            return repr([conn.execute(sa.text(f'SELECT * FROM "{t}"')).all() for t in tables]).encode()
    finally:
        engine.dispose()


def test_generated_admin_token_is_saved_privately_and_survives_restarts(tmp_path, servers, store_url_for):
    base, data_dir = tmp_path / "srv", tmp_path / "srv" / "data"
    store_url = store_url_for(data_dir)
    first = start_server(base, data_dir=data_dir, admin_token=None, store_url=store_url)
    servers.append(first)
    creds = first.config_dir / "credentials.json"
    token = first.token
    assert token.startswith("berth_")
    assert token != ADMIN_TOKEN
    assert len(token) >= 40
    assert _mode(creds) == 0o600
    assert _mode(first.config_dir) & 0o077 == 0
    assert json.loads(creds.read_text()) == {"host": first.url, "token": token}
    assert first.log_tail().count(token) == 1, "the generated token is shown once"

    assert first.client.get(BASE).status_code == 200
    assert_unauthenticated(send(first, "GET", BASE, None, "Bearer berth_wrong"))
    stored = _stored(first)
    assert hash_token(token).encode() in stored, "the store (in the data dir, or PostgreSQL) holds its hash"
    assert token.encode() not in stored, "only a hash of the token is stored"

    # Restart with the credentials file in place: the same token, not shown again.
    first.stop()
    second = _start_keeping_credentials(base, data_dir, store_url)
    servers.append(second)
    assert second.token == token
    assert _mode(creds) == 0o600
    assert json.loads(creds.read_text()) == {"host": second.url, "token": token}
    assert second.client.get("/ping").status_code == 200
    assert second.client.get(BASE).status_code == 200
    assert token not in second.log_path.read_text()

    # Restart without the file (start_server removes it): a new token, and the old one still works.
    second.stop()
    third = start_server(base, data_dir=data_dir, admin_token=None, store_url=store_url)
    servers.append(third)
    assert third.token != token
    assert third.client.get(BASE).status_code == 200
    assert send(third, "GET", BASE, None, f"Bearer {token}").status_code == 200
    assert_unauthenticated(send(third, "GET", BASE, None, "Bearer berth_wrong"))

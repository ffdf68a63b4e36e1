"""Secrets against a real server, on SQLite and PostgreSQL: the Databricks Secrets API through the official
SDK and raw HTTP (shapes and errors), who may manage a scope and name its secrets in an endpoint, and a
real replica that reads a secret from its environment while views, logs, the inference table, the store
and the server's own files never hold the value."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import signal
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import sqlalchemy as sa
from databricks.sdk import WorkspaceClient
from databricks.sdk.errors import InvalidParameterValue, PermissionDenied, ResourceAlreadyExists, ResourceDoesNotExist
from databricks.sdk.service.workspace import ScopeBackendType
from deltalake import DeltaTable

from berth.store.engine import normalise_url
from tests.conftest import ServerProcess
from tests.integration.replica_tools import X_BODY, poll, replicas_named

pytestmark = pytest.mark.both_stores  # every server test here runs on SQLite and on PostgreSQL
SCIM = "/api/2.0/preview/scim/v2"
SECRETS = "/api/2.0/secrets"
TABLE = {"catalog_name": "main", "schema_name": "ml", "table_name_prefix": "env", "enabled": True}


def call(server: ServerProcess, token: str, method: str, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, server.url + path, json=body, headers={"Authorization": f"Bearer {token}"},
                         timeout=30.0, **kwargs)


def new_user(server: ServerProcess) -> dict[str, str]:
    """A non-admin user and a token the admin made for them."""
    name = f"carol-{uuid.uuid4().hex[:6]}@example.com"
    user = call(server, server.token, "POST", f"{SCIM}/Users", {"userName": name})
    assert user.status_code == 201, user.text
    token = call(server, server.token, "POST", "/api/2.0/token-management/on-behalf-of/tokens", {"user_name": name})
    assert token.status_code == 200, token.text
    return {"name": name, "token": token.json()["token_value"]}


def scope_name() -> str:
    return f"scope.{uuid.uuid4().hex[:8]}"


def test_the_sdk_manages_scopes_and_secrets_with_databricks_errors(shared_server: ServerProcess) -> None:
    w = WorkspaceClient(host=shared_server.url, token=shared_server.token, auth_type="pat")
    scope = scope_name()
    w.secrets.create_scope(scope=scope)
    assert (scope, ScopeBackendType.DATABRICKS) in [(s.name, s.backend_type) for s in w.secrets.list_scopes()]
    with pytest.raises(ResourceAlreadyExists, match=f"Scope {scope} already exists!"):
        w.secrets.create_scope(scope=scope)
    with pytest.raises(InvalidParameterValue):
        w.secrets.create_scope(scope="no spaces allowed")
    assert list(w.secrets.list_secrets(scope=scope)) == []

    before = int(time.time() * 1000)
    w.secrets.put_secret(scope=scope, key="api-token", string_value="first")
    w.secrets.put_secret(scope=scope, key="api-token", string_value="second")  # overwrites
    w.secrets.put_secret(scope=scope, key="blob", bytes_value=base64.b64encode(b"\x00\x01").decode())
    listed = {s.key: s.last_updated_timestamp for s in w.secrets.list_secrets(scope=scope)}
    assert sorted(listed) == ["api-token", "blob"]
    assert all(before - 1000 <= t <= int(time.time() * 1000) + 1000 for t in listed.values())
    with pytest.raises(ResourceDoesNotExist, match="Scope nope-nope does not exist!"):
        w.secrets.put_secret(scope="nope-nope", key="k", string_value="v")
    with pytest.raises(InvalidParameterValue):
        w.secrets.put_secret(scope=scope, key="big", string_value="x" * (128 * 1024 + 1))
    with pytest.raises(InvalidParameterValue):
        w.secrets.put_secret(scope=scope, key="k/with/slashes", string_value="v")

    w.secrets.delete_secret(scope=scope, key="blob")
    with pytest.raises(ResourceDoesNotExist):
        w.secrets.delete_secret(scope=scope, key="blob")
    assert [s.key for s in w.secrets.list_secrets(scope=scope)] == ["api-token"]
    w.secrets.delete_scope(scope=scope)
    assert scope not in [s.name for s in w.secrets.list_scopes()]
    with pytest.raises(ResourceDoesNotExist):
        w.secrets.list_secrets(scope=scope)
    with pytest.raises(ResourceDoesNotExist):
        w.secrets.delete_scope(scope=scope)


def test_raw_shapes_and_status_codes(shared_server: ServerProcess) -> None:
    token, scope = shared_server.token, scope_name()
    created = call(shared_server, token, "POST", f"{SECRETS}/scopes/create", {"scope": scope})
    assert (created.status_code, created.json()) == (200, {})
    again = call(shared_server, token, "POST", f"{SECRETS}/scopes/create", {"scope": scope})
    assert again.status_code == 409
    assert again.json() == {"error_code": "RESOURCE_ALREADY_EXISTS", "message": f"Scope {scope} already exists!"}
    put = call(shared_server, token, "POST", f"{SECRETS}/put", {"scope": scope, "key": "k", "string_value": "v"})
    assert (put.status_code, put.json()) == (200, {})
    listed = call(shared_server, token, "GET", f"{SECRETS}/list", params={"scope": scope})
    assert listed.status_code == 200
    assert [s["key"] for s in listed.json()["secrets"]] == ["k"]
    assert set(listed.json()["secrets"][0]) == {"key", "last_updated_timestamp"}  # never a value
    both = call(shared_server, token, "POST", f"{SECRETS}/put",
                {"scope": scope, "key": "k", "string_value": "v", "bytes_value": "dg=="})
    assert (both.status_code, both.json()["error_code"]) == (400, "MALFORMED_REQUEST")
    neither = call(shared_server, token, "POST", f"{SECRETS}/put", {"scope": scope, "key": "k"})
    assert (neither.status_code, neither.json()["error_code"]) == (400, "INVALID_PARAMETER_VALUE")
    no_scope = call(shared_server, token, "GET", f"{SECRETS}/list")
    assert (no_scope.status_code, no_scope.json()["error_code"]) == (400, "INVALID_PARAMETER_VALUE")
    missing = call(shared_server, token, "POST", f"{SECRETS}/delete", {"scope": scope, "key": "other"})
    assert missing.status_code == 404
    assert missing.json() == {"error_code": "RESOURCE_DOES_NOT_EXIST",
                              "message": f"Secret does not exist with scope: {scope} and key: other"}
    assert call(shared_server, token, "GET", f"{SECRETS}/get", params={"scope": scope, "key": "k"}).status_code == 404
    gone = call(shared_server, token, "POST", f"{SECRETS}/scopes/delete", {"scope": scope})
    assert (gone.status_code, gone.json()) == (200, {})
    after = call(shared_server, token, "GET", f"{SECRETS}/list", params={"scope": scope})
    assert after.status_code == 404
    assert after.json() == {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"Scope {scope} does not exist!"}
    assert call(shared_server, "not-a-token", "GET", f"{SECRETS}/scopes/list").status_code == 401


def test_only_a_scopes_manager_may_use_it_in_an_endpoint(shared_server: ServerProcess, model_zoo: Any,
                                                        unique_name: str) -> None:
    admin, carol = shared_server.token, new_user(shared_server)
    theirs, mine = scope_name(), scope_name()
    assert call(shared_server, admin, "POST", f"{SECRETS}/scopes/create", {"scope": theirs}).status_code == 200
    assert call(shared_server, admin, "POST", f"{SECRETS}/put",
                {"scope": theirs, "key": "k", "string_value": "admins-only"}).status_code == 200
    assert call(shared_server, carol["token"], "POST", f"{SECRETS}/scopes/create", {"scope": mine}).status_code == 200
    assert call(shared_server, carol["token"], "POST", f"{SECRETS}/put",
                {"scope": mine, "key": "k", "string_value": "carols"}).status_code == 200

    # Carol sees every scope's name, but cannot read, write or delete in the admin's.
    w = WorkspaceClient(host=shared_server.url, token=carol["token"], auth_type="pat")
    assert {theirs, mine} <= {s.name for s in w.secrets.list_scopes()}
    with pytest.raises(PermissionDenied):
        list(w.secrets.list_secrets(scope=theirs))
    for path, body in ((f"{SECRETS}/put", {"scope": theirs, "key": "k", "string_value": "overwritten"}),
                       (f"{SECRETS}/delete", {"scope": theirs, "key": "k"}),
                       (f"{SECRETS}/scopes/delete", {"scope": theirs})):
        denied = call(shared_server, carol["token"], "POST", path, body)
        assert (denied.status_code, denied.json()["error_code"]) == (403, "PERMISSION_DENIED"), denied.text
    assert call(shared_server, admin, "GET", f"{SECRETS}/list", params={"scope": mine}).status_code == 200  # admin

    # An endpoint may name only secrets the caller manages, that exist; a refusal writes nothing.
    model = str(model_zoo("env_digest_model", variable="API_TOKEN"))

    def config(value: str) -> dict[str, Any]:
        return {"served_entities": [{"entity_name": model, "name": "env", "environment_vars": {"API_TOKEN": value}}]}

    endpoint = f"/api/2.0/serving-endpoints/{unique_name}"
    for value, status, code in ((f"{{{{secrets/{theirs}/k}}}}", 403, "PERMISSION_DENIED"),
                                (f"{{{{secrets/{mine}/missing}}}}", 404, "RESOURCE_DOES_NOT_EXIST"),
                                ("{{secrets/no-such-scope/k}}", 404, "RESOURCE_DOES_NOT_EXIST"),
                                (f"Bearer {{{{secrets/{mine}/k}}}}", 400, "INVALID_PARAMETER_VALUE")):
        refused = call(shared_server, carol["token"], "POST", "/api/2.0/serving-endpoints",
                       {"name": unique_name, "config": config(value)})
        assert (refused.status_code, refused.json()["error_code"]) == (status, code), refused.text
        assert value.split("/")[1] in refused.json()["message"] or status == 400
        assert call(shared_server, admin, "GET", endpoint).status_code == 404
    made = call(shared_server, carol["token"], "POST", "/api/2.0/serving-endpoints",
                {"name": unique_name, "config": config(f"{{{{secrets/{mine}/k}}}}")})
    assert made.status_code == 200, made.text
    try:
        view = shared_server.wait_not_updating(unique_name)
        assert view["state"]["ready"] == "READY", view
        # An update by another manager of the endpoint must manage the scopes it names too.
        other = new_user(shared_server)
        granted = call(shared_server, carol["token"], "PATCH", f"/api/2.0/permissions/serving-endpoints/{view['id']}",
                       {"access_control_list": [{"user_name": other["name"], "permission_level": "CAN_MANAGE"}]})
        assert granted.status_code == 200, granted.text
        updated = call(shared_server, other["token"], "PUT", endpoint + "/config", config(f"{{{{secrets/{mine}/k}}}}"))
        assert (updated.status_code, updated.json()["error_code"]) == (403, "PERMISSION_DENIED"), updated.text
        stolen = call(shared_server, carol["token"], "PUT", endpoint + "/config", config(f"{{{{secrets/{theirs}/k}}}}"))
        assert stolen.status_code == 403, stolen.text
        after = shared_server.get(unique_name)
        assert after["config"]["config_version"] == 1
        assert "pending_config" not in after
        answer = shared_server.invoke(unique_name, X_BODY)
        assert answer.json()["predictions"] == [hashlib.sha256(b"carols").hexdigest()]
    finally:
        call(shared_server, admin, "DELETE", endpoint)


def _children(server: ServerProcess) -> list[psutil.Process]:
    return psutil.Process(server.proc.pid).children(recursive=True)


def _runs(proc: psutil.Process, text: str) -> bool:
    """The live process's command line (or title) names `text`."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE and text in " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def _store_text(server: ServerProcess) -> str:
    """Every row of every table of the server's store, as text."""
    url = server.store_url or f"sqlite:///{server.data_dir / 'berth.db'}"
    engine = sa.create_engine(normalise_url(url), poolclass=sa.pool.NullPool)
    try:
        meta = sa.MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            return "\n".join(f"{t.name}: {conn.execute(t.select()).all()}" for t in meta.sorted_tables)
    finally:
        engine.dispose()


def _files_holding(root: Path, value: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and value in p.read_bytes()]


@pytest.mark.slow
def test_a_replica_reads_its_secret_which_nothing_else_holds(server_factory: Any, model_zoo: Any) -> None:
    server = server_factory()
    value = f"berth-secret-{secrets.token_hex(12)}"
    scope = scope_name()
    assert call(server, server.token, "POST", f"{SECRETS}/scopes/create", {"scope": scope}).status_code == 200
    put = call(server, server.token, "POST", f"{SECRETS}/put", {"scope": scope, "key": "token", "string_value": value})
    assert put.status_code == 200, put.text
    key_file = server.data_dir / "secrets.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    reference = f"{{{{secrets/{scope}/token}}}}"
    env = {"API_TOKEN": reference, "PLAIN": "visible"}
    model = model_zoo("env_digest_model", variable="API_TOKEN")
    created = server.create("env", {"served_entities": [{"entity_name": str(model), "name": "env",
                                                          "environment_vars": env}]},
                            ai_gateway={"inference_table_config": TABLE})
    assert created.status_code == 200, created.text
    view = server.wait_not_updating("env")
    assert view["state"]["ready"] == "READY", view
    assert view["config"]["served_entities"][0]["environment_vars"] == env  # the reference, as given
    listed = call(server, server.token, "GET", "/api/2.0/serving-endpoints").json()
    assert value not in str(listed)
    assert value not in str(view)

    answer = server.invoke("env", X_BODY)
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"] == [hashlib.sha256(value.encode()).hexdigest()]  # the replica saw it
    for kind in ("logs", "build-logs"):
        logs = call(server, server.token, "GET", f"/api/2.0/serving-endpoints/env/served-models/env/{kind}")
        assert logs.status_code == 200
        assert "loading" in logs.json()["logs"]
        assert value not in logs.text

    # A new value reaches the next replica (from a template of its own; the old one is retired).
    rotated = f"{value}-rotated"
    assert call(server, server.token, "POST", f"{SECRETS}/put",
                {"scope": scope, "key": "token", "string_value": rotated}).status_code == 200
    (replica,) = replicas_named(server, "env")
    os.kill(replica.pid, signal.SIGKILL)
    digest = hashlib.sha256(rotated.encode()).hexdigest()
    poll(lambda: server.invoke("env", X_BODY).json().get("predictions") == [digest], timeout=60,
         what="a replica with the new value")
    poll(lambda: sum(_runs(p, str(model)) for p in _children(server)) == 2, timeout=30,
         what="one replica and one template")

    # A config naming a secret that is not there is refused, and changes nothing.
    bad = {"served_entities": [{"entity_name": str(model), "name": "env",
                                "environment_vars": {"API_TOKEN": f"{{{{secrets/{scope}/other}}}}"}}]}
    refused = server.api("PUT", "/env/config", json=bad)
    assert refused.status_code == 404, refused.text
    assert "other" in refused.json()["message"]
    assert server.get("env")["config"]["config_version"] == 1

    # The secret goes; the next replica cannot start, and the entity fails naming the reference.
    gone = call(server, server.token, "POST", f"{SECRETS}/delete", {"scope": scope, "key": "token"})
    assert gone.status_code == 200
    (replica,) = replicas_named(server, "env")
    assert sum(_runs(p, str(model)) for p in _children(server)) == 2  # the replica and its template
    os.kill(replica.pid, signal.SIGKILL)
    failed = server.wait_until("env", lambda v: v["config"]["served_entities"][0]["state"]["deployment"]
                               == "DEPLOYMENT_FAILED", timeout=60)
    message = failed["config"]["served_entities"][0]["state"]["deployment_state_message"]
    assert reference in message
    assert "does not exist" in message
    assert value not in message
    # Its replicas and its template (which holds the environment it forks with) are gone.
    poll(lambda: not any(_runs(p, str(model)) for p in _children(server)), timeout=30,
         what="the entity's replicas and template to stop")

    rows = poll(lambda: len(_table(server, "env")) >= 2 and _table(server, "env"), timeout=30,
                what="the inference table's rows")
    assert value not in str(rows)
    assert digest in str(rows)
    assert call(server, server.token, "DELETE", "/api/2.0/serving-endpoints/env").status_code == 200
    assert server.stop() == 0
    assert value not in server.log_path.read_text(errors="replace")
    assert value not in _store_text(server)
    assert _files_holding(server.data_dir, value.encode()) == []  # store, logs, inference table, key file


def _table(server: ServerProcess, endpoint: str) -> list[dict[str, Any]]:
    path = server.data_dir / "inference" / endpoint
    if not (path / "_delta_log").exists():
        return []
    return DeltaTable(str(path)).to_pyarrow_table().to_pylist()


def test_a_server_with_another_key_refuses_to_start_on_the_same_store(server_factory: Any) -> None:
    first = server_factory()
    assert call(first, first.token, "POST", f"{SECRETS}/scopes/create", {"scope": "s"}).status_code == 200
    assert call(first, first.token, "POST", f"{SECRETS}/put",
                {"scope": "s", "key": "k", "string_value": "v"}).status_code == 200
    assert first.stop() == 0
    (first.data_dir / "secrets.key").unlink()  # a new key file will be made: not the one the store knows
    with pytest.raises(AssertionError, match="written with another key"):
        server_factory(data_dir=first.data_dir)


@pytest.mark.parametrize("variable", ["BERTH_ADMIN_TOKEN", "BERTH_CONFIG_DIR"])  # both set for every test server
def test_a_model_never_inherits_the_platforms_own_settings(shared_server: ServerProcess, model_zoo: Any,
                                                           unique_name: str, variable: str) -> None:
    """The server runs with BERTH_ADMIN_TOKEN and BERTH_CONFIG_DIR set (tests/conftest.py); a model that reads
    one gets nothing, while a variable its entity names reaches it."""
    model = str(model_zoo("env_digest_model", variable=variable))
    assert shared_server.create(unique_name, {"served_entities": [{"entity_name": model, "name": "env"}]}
                                ).status_code == 200
    try:
        assert shared_server.wait_not_updating(unique_name)["state"]["ready"] == "READY"
        answer = shared_server.invoke(unique_name, {"dataframe_records": [{"x": 1.0}]})
        assert answer.json()["predictions"] == ["unset"], answer.text
    finally:
        shared_server.api("DELETE", f"/{unique_name}")

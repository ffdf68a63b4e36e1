"""A server started on the store as Berth left it before migrations (ba18f4b's dumps, with an endpoint, a user, a
grant and tokens) migrates it and carries on; a server that cannot reach its database says so in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, ServerProcess
from tests.fixtures import previous_schema

pytestmark = pytest.mark.both_stores  # every server test here runs on SQLite and on PostgreSQL

SCIM = "/api/2.0/preview/scim/v2"
BODY = {"inputs": [[1.0, 2.0, 3.0]]}


def as_(server: ServerProcess, token: str, method: str, path: str, body: Any = None) -> httpx.Response:
    return httpx.request(method, server.url + path, json=body, headers={"Authorization": f"Bearer {token}"},
                         timeout=30.0)


def ready(view: dict[str, Any]) -> bool:
    return view["state"]["ready"] == "READY"  # type: ignore[no-any-return]


def test_a_server_on_the_schema_before_migrations_keeps_its_state_and_serves(
    server_factory: Callable[..., ServerProcess], store_url_for: Callable[[Path], str | None], tmp_path: Path,
    model_zoo: Callable[..., Path], unique_name: str,
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    url = store_url_for(data_dir) or f"sqlite:///{data_dir / 'berth.db'}"
    old = previous_schema.load(url, model_zoo("tensor_model"))
    server = server_factory(data_dir=data_dir)

    view = server.wait_until("fixture-ep", ready)  # recovering: the server restarts its replicas
    assert view["id"] == old["endpoint_id"]
    assert server.invoke("fixture-ep", BODY).status_code == 200
    bob = old["bob_token"]
    assert as_(server, bob, "GET", f"{SCIM}/Me").json()["userName"] == "bob@example.com"
    assert as_(server, bob, "POST", "/serving-endpoints/fixture-ep/invocations", BODY).status_code == 200, \
        "bob's CAN_QUERY grant came along"
    assert as_(server, bob, "PUT", "/api/2.0/serving-endpoints/fixture-ep/config", {}).status_code == 403
    assert as_(server, old["legacy_token"], "GET", f"{SCIM}/Me").json()["userName"] == "admin", \
        "the pre-identities admin token became the admin user's"

    server.deploy(unique_name, model_zoo("tensor_model"))
    assert sorted(e["name"] for e in server.api("GET").json()["endpoints"]) == sorted(["fixture-ep", unique_name])
    server.stop()

    again = server_factory(data_dir=data_dir)  # the migrated store: nothing to do, all still there
    again.wait_until("fixture-ep", ready)
    again.wait_until(unique_name, ready)
    assert as_(again, old["legacy_token"], "GET", f"{SCIM}/Me").status_code == 200
    assert again.api("DELETE", "/fixture-ep").status_code == 200


def test_a_server_that_cannot_reach_its_database_stops_with_one_clear_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BERTH_")}
    env["BERTH_CONFIG_DIR"] = str(tmp_path / "config")
    result = subprocess.run(
        [sys.executable, "-m", "berth", "server", "--port", "0", "--data-dir", str(tmp_path / "data"),
         "--store-url", "postgresql://berth:hunter2@127.0.0.1:1/berth"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("berth: Cannot connect to the store at postgresql+psycopg://berth:***@127.0.0.1:1/berth:")
    assert "hunter2" not in result.stderr + result.stdout

"""The control-plane REST API against a real server: shapes, lifecycle, validation, failures.

Mirrors what the Databricks SDK and MLflow's deployment client expect: create and update return
at once with `config_update == IN_PROGRESS` and a `pending_config`, the old config serves until
the new one is live (blue/green), and every error is a `{"error_code", "message"}` JSON body.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from berth.settings import host_cores
from tests.conftest import ServerProcess
from tests.integration.replica_tools import poll, replicas_named

pytestmark = pytest.mark.both_stores  # every server test here runs on SQLite and on PostgreSQL

X_BODY = {"dataframe_split": {"columns": ["x"], "data": [[1.0]]}}
HEX32 = set("0123456789abcdef")


# Helpers
def tag(prefix: str) -> str:
    """A served-entity name unique in the session, so replica processes can be told apart."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is a Databricks error: that status, a JSON body of exactly error_code + message."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error_code", "message"}, body
    assert body["error_code"] == code, body
    assert isinstance(body["message"], str), body
    assert body["message"].strip(), body
    return body  # type: ignore[no-any-return]


def endpoint_names(server: ServerProcess) -> list[str]:
    response = server.api("GET")
    assert response.status_code == 200, response.text
    return [e["name"] for e in response.json()["endpoints"]]


def replica_pids(server: ServerProcess, entity: str) -> set[int]:
    """Live replica processes of the server (`python -m berth.replica ... --name <entity>`)."""
    return {r.pid for r in replicas_named(server, entity)}


def served_by(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.headers["served-model-name"]


def only_entity(view: dict[str, Any], slot: str = "config") -> dict[str, Any]:
    (entity,) = view[slot]["served_entities"]
    return entity  # type: ignore[no-any-return]


def deploy(server: ServerProcess, name: str, model: Path, entity: str) -> dict[str, Any]:
    """Create a one-entity endpoint with that served-entity name and wait until it is READY."""
    response = server.create(name, {"served_entities": [{"entity_name": str(model), "name": entity}]})
    assert response.status_code == 200, response.text
    view = server.wait_not_updating(name)
    assert view["state"] == {"config_update": "NOT_UPDATING", "ready": "READY"}, view
    return view


def delete(server: ServerProcess, name: str) -> None:
    response = server.api("DELETE", f"/{name}")
    assert response.status_code == 200, response.text
    assert response.json() == {}


@pytest.fixture(scope="module")
def fast_model(model_zoo: Callable[..., Path]) -> Path:
    return model_zoo("sleep_model", seconds=0.0)


@pytest.fixture(scope="module")
def live(shared_server: ServerProcess, fast_model: Path) -> Iterator[tuple[str, str]]:
    """One READY endpoint (name, served entity) for tests that only read it or are refused."""
    name, entity = f"control-live-{uuid.uuid4().hex[:8]}", tag("live")
    deploy(shared_server, name, fast_model, entity)
    yield name, entity
    shared_server.api("DELETE", f"/{name}")


# 1. Lifecycle and shapes
def test_create_returns_in_progress_then_ready_then_delete(
    shared_server: ServerProcess, fast_model: Path, unique_name: str
) -> None:
    server, entity = shared_server, tag("clf")
    before = time.time() * 1000
    response = server.create(
        unique_name, {"served_entities": [{"entity_name": str(fast_model), "name": entity}]}
    )
    assert response.status_code == 200, response.text
    created = response.json()
    assert created["name"] == unique_name
    assert len(created["id"]) == 32
    assert set(created["id"]) <= HEX32
    assert created["state"] == {"config_update": "IN_PROGRESS", "ready": "NOT_READY"}
    assert "config" not in created  # nothing is live yet
    pending = created["pending_config"]
    assert pending["config_version"] == 1
    assert isinstance(pending["start_time"], int)
    (p_entity,) = pending["served_entities"]
    assert p_entity["name"] == entity
    assert p_entity["entity_name"] == str(fast_model)
    assert p_entity["state"]["deployment"] == "DEPLOYMENT_CREATING"
    assert (
        p_entity["workload_size"],
        p_entity["min_provisioned_concurrency"],
        p_entity["max_provisioned_concurrency"],
    ) == ("Small", 4, 4)
    assert pending["traffic_config"]["routes"] == [
        {"served_model_name": entity, "served_entity_name": entity, "traffic_percentage": 100}
    ]
    assert created["creation_timestamp"] >= before - 1000
    assert created["permission_level"] == "CAN_MANAGE"

    view = server.wait_not_updating(unique_name)
    assert view["state"] == {"config_update": "NOT_UPDATING", "ready": "READY"}, view
    assert "pending_config" not in view
    assert view["id"] == created["id"]
    assert view["config"]["config_version"] == 1
    live_entity = only_entity(view)
    assert live_entity["name"] == entity
    assert live_entity["state"]["deployment"] == "DEPLOYMENT_READY"
    assert "replica" in live_entity["state"]["deployment_state_message"]
    assert view["last_updated_timestamp"] >= view["creation_timestamp"]
    assert served_by(server.invoke(unique_name, X_BODY)) == entity
    assert len(replica_pids(server, entity)) == 1

    # List: summary form (entity names only, no pending_config)
    listed = server.api("GET")
    assert listed.status_code == 200
    assert set(listed.json()) == {"endpoints"}
    (summary,) = [e for e in listed.json()["endpoints"] if e["name"] == unique_name]
    assert summary["id"] == created["id"]
    assert summary["state"] == view["state"]
    assert "pending_config" not in summary
    assert summary["config"]["served_entities"] == [{"name": entity, "entity_name": str(fast_model)}]

    # Delete: then it is gone everywhere
    delete(server, unique_name)
    for response in (
        server.api("GET", f"/{unique_name}"),
        server.api("DELETE", f"/{unique_name}"),
        server.api(
            "PUT", f"/{unique_name}/config", json={"served_entities": [{"entity_name": str(fast_model)}]}
        ),
        server.invoke(unique_name, X_BODY),
    ):
        assert unique_name in assert_error(response, 404, "RESOURCE_DOES_NOT_EXIST")["message"]
    assert unique_name not in endpoint_names(server)
    poll(lambda: not replica_pids(server, entity), timeout=30, what="replicas stopped after delete")


def test_update_config_is_blue_green(
    shared_server: ServerProcess, fast_model: Path, model_zoo: Callable[..., Path], unique_name: str
) -> None:
    server, old, new = shared_server, tag("old"), tag("new")
    slow = model_zoo("slow_load_model", seconds=3.0)  # keeps the rollout IN_PROGRESS for a while
    deploy(server, unique_name, fast_model, old)
    old_pids = replica_pids(server, old)
    assert len(old_pids) == 1

    response = server.api(
        "PUT", f"/{unique_name}/config", json={"served_entities": [{"entity_name": str(slow), "name": new}]}
    )
    assert response.status_code == 200, response.text
    updating = response.json()
    assert updating["state"] == {"config_update": "IN_PROGRESS", "ready": "READY"}
    assert updating["config"]["config_version"] == 1
    assert only_entity(updating)["name"] == old
    assert only_entity(updating)["state"]["deployment"] == "DEPLOYMENT_READY"
    assert updating["pending_config"]["config_version"] == 2
    assert only_entity(updating, "pending_config")["name"] == new
    assert only_entity(updating, "pending_config")["state"]["deployment"] == "DEPLOYMENT_CREATING"

    # A second update while one is in progress is refused and changes nothing
    third = {"served_entities": [{"entity_name": str(fast_model), "name": tag("third")}]}
    assert_error(server.api("PUT", f"/{unique_name}/config", json=third), 409, "RESOURCE_CONFLICT")
    assert only_entity(server.get(unique_name), "pending_config")["name"] == new

    # Queries during the rollout all succeed, from the old entity
    during = 0
    while server.get(unique_name)["state"]["config_update"] == "IN_PROGRESS":
        name = served_by(server.invoke(unique_name, X_BODY))
        if server.get(unique_name)["state"]["config_update"] == "IN_PROGRESS":
            assert name == old
            during += 1
    assert during >= 3, "the rollout ended before it could be observed"

    view = server.get(unique_name)
    assert view["state"] == {"config_update": "NOT_UPDATING", "ready": "READY"}, view
    assert "pending_config" not in view
    assert view["config"]["config_version"] == 2
    assert only_entity(view)["name"] == new
    assert only_entity(view)["state"]["deployment"] == "DEPLOYMENT_READY"
    assert view["config"]["traffic_config"]["routes"][0]["served_model_name"] == new
    # Traffic moves to the new entity (every request still succeeds) and the old replicas stop
    poll(
        lambda: served_by(server.invoke(unique_name, X_BODY)) == new, timeout=15, what="traffic on new entity"
    )
    poll(lambda: not replica_pids(server, old), timeout=45, what="old replicas stopped")
    assert len(replica_pids(server, new)) == 1
    delete(server, unique_name)


def test_list_is_summary_form(shared_server: ServerProcess, live: tuple[str, str], fast_model: Path) -> None:
    name, entity = live
    response = shared_server.api("GET")
    assert response.status_code == 200
    endpoints = response.json()["endpoints"]
    names = [e["name"] for e in endpoints]
    assert names.count(name) == 1
    summary = endpoints[names.index(name)]
    assert {"name", "id", "state", "config", "creator", "creation_timestamp"} <= set(summary)
    assert summary["config"] == {
        "config_version": 1,
        "served_entities": [{"name": entity, "entity_name": str(fast_model)}],
    }


# 2. Validation: 400 INVALID_PARAMETER_VALUE and nothing created
def _entities(model: str, **entity: Any) -> dict[str, Any]:
    return {"served_entities": [{"entity_name": model, **entity}]}


def _two(model: str, routes: list[tuple[str, Any]]) -> dict[str, Any]:
    return {
        "served_entities": [{"entity_name": model, "name": "a"}, {"entity_name": model, "name": "b"}],
        "traffic_config": {"routes": [{"served_model_name": n, "traffic_percentage": p} for n, p in routes]},
    }


BAD_NAMES: list[tuple[str, Any]] = [
    ("space", "has space"),
    ("dot", "dot.ted"),
    ("too-long", "n" * 64),
    ("empty", ""),
    ("newline", "trailing\n"),
    ("slash", "a/b"),
    ("not-a-string", 42),
]

M = "<model>"  # replaced by a real model directory: only the field under test is wrong


def _one(**entity: Any) -> dict[str, Any]:
    return {"config": {"served_entities": [{"entity_name": M, **entity}]}}


def _cfg(config: Any) -> dict[str, Any]:
    return {"config": config}


def _split(*routes: tuple[str, Any]) -> dict[str, Any]:
    return _cfg(_two(M, list(routes)))


AB = [{"entity_name": M, "name": "a"}, {"entity_name": M, "name": "b"}]

# (id, create body without "name", a fragment the message must contain)
BAD_BODIES: list[tuple[str, dict[str, Any], str]] = [
    ("missing-config", {}, "config"),
    ("config-not-object", _cfg("x"), "config"),
    ("no-served-entities", _cfg({}), "served_entities"),
    ("empty-served-entities", _cfg({"served_entities": []}), "at least one"),
    ("entity-name-missing", _cfg({"served_entities": [{"workload_size": "Small"}]}), "entity_name"),
    ("registered-model-name", _one(entity_name="churn_model"), "entity_version"),
    ("uc-three-part-name", _one(entity_name="main.default.churn"), "entity_version"),
    ("bad-served-entity-name", _one(name="a.b"), "name"),
    ("workload-size-invalid", _one(workload_size="XL"), "workload_size"),
    ("size-and-min", _one(workload_size="Small", min_provisioned_concurrency=4), "mutually exclusive"),
    ("size-and-max", _one(workload_size="Large", max_provisioned_concurrency=8), "mutually exclusive"),
    ("min-above-max", _one(min_provisioned_concurrency=16, max_provisioned_concurrency=4), "exceeds"),
    ("negative-min", _one(min_provisioned_concurrency=-4, max_provisioned_concurrency=4), "min"),
    ("negative-max", _one(max_provisioned_concurrency=-8), "max"),
    ("float-concurrency", _one(max_provisioned_concurrency=8.5), "integer"),
    ("string-concurrency", _one(max_provisioned_concurrency="eight"), "integer"),
    ("bool-concurrency", _one(min_provisioned_concurrency=True, max_provisioned_concurrency=4), "integer"),
    ("routes-sum-below-100", _split(("a", 50), ("b", 30)), "sum to 100"),
    ("routes-sum-above-100", _split(("a", 90), ("b", 30)), "sum to 100"),
    ("route-unknown-entity", _split(("a", 50), ("zz", 50)), "'zz'"),
    ("percentage-above-100", _split(("a", 150), ("b", -50)), "[0, 100]"),
    ("percentage-negative", _split(("a", -1), ("b", 101)), "[0, 100]"),
    ("percentage-fraction", _split(("a", 50.5), ("b", 49.5)), "integer"),
    ("two-entities-no-routes", _cfg({"served_entities": AB}), "routes"),
    ("duplicate-entity-names", _cfg({"served_entities": [AB[0], AB[0]]}), "unique"),
    ("duplicate-default-names", _cfg({"served_entities": [{"entity_name": M}] * 2}), "unique"),
    ("env-not-object", _one(environment_vars=["A=1"]), "environment_vars"),
    ("env-int-value", _one(environment_vars={"A": 1}), "environment_vars"),
    ("env-bad-key", _one(environment_vars={"9LIVES": "x"}), "environment_vars"),
    ("env-too-many", _one(environment_vars={f"V{i}": "x" for i in range(31)}), "limit"),
    ("gpu-small", _one(workload_type="GPU_SMALL"), "GPU"),
    ("gpu-large", _one(workload_type="GPU_LARGE"), "GPU"),
    ("multigpu", _one(workload_type="MULTIGPU_MEDIUM"), "GPU"),
    ("workload-type-unknown", _one(workload_type="TPU"), "workload_type"),
    ("workload-type-list", _one(workload_type=["CPU"]), "workload_type"),
    ("route-optimized", {**_one(), "route_optimized": True}, "route_optimized"),
    ("external-model", _one(external_model={"name": "gpt-4o", "provider": "openai"}), "external_model"),
    ("tags-not-list", {**_one(), "tags": {"k": "v"}}, "tags"),
]


@pytest.mark.parametrize("bad_name", [b[1] for b in BAD_NAMES], ids=[b[0] for b in BAD_NAMES])
def test_bad_endpoint_names_are_rejected(
    shared_server: ServerProcess, fast_model: Path, bad_name: Any
) -> None:
    before = endpoint_names(shared_server)
    response = shared_server.create(bad_name, {"served_entities": [{"entity_name": str(fast_model)}]})
    message = assert_error(response, 400, "INVALID_PARAMETER_VALUE")["message"]
    assert "name" in message
    assert endpoint_names(shared_server) == before
    if isinstance(bad_name, str) and bad_name.isprintable() and bad_name.strip() and "/" not in bad_name:
        assert_error(shared_server.api("GET", f"/{bad_name}"), 404, "RESOURCE_DOES_NOT_EXIST")


def _with_model(value: Any, model: str) -> Any:
    if isinstance(value, dict):
        return {k: _with_model(v, model) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_model(v, model) for v in value]
    return model if value == M else value


@pytest.mark.parametrize(("body", "fragment"), [b[1:] for b in BAD_BODIES], ids=[b[0] for b in BAD_BODIES])
def test_invalid_create_is_rejected_and_creates_nothing(
    shared_server: ServerProcess, fast_model: Path, unique_name: str, body: dict[str, Any], fragment: str
) -> None:
    before = endpoint_names(shared_server)
    response = shared_server.api("POST", json={"name": unique_name, **_with_model(body, str(fast_model))})
    message = assert_error(response, 400, "INVALID_PARAMETER_VALUE")["message"]
    assert fragment in message
    assert_error(shared_server.api("GET", f"/{unique_name}"), 404, "RESOURCE_DOES_NOT_EXIST")
    assert endpoint_names(shared_server) == before


def test_registry_sources_get_a_clear_message(shared_server: ServerProcess, unique_name: str) -> None:
    response = shared_server.create(
        unique_name, {"served_entities": [{"entity_name": "churn", "entity_version": "2"}]}
    )
    message = assert_error(response, 400, "INVALID_PARAMETER_VALUE")["message"]
    assert "models:/churn/2" in message
    assert "BERTH_MLFLOW_TRACKING_URI" in message


def test_malformed_and_non_object_bodies(shared_server: ServerProcess, live: tuple[str, str]) -> None:
    server, (name, _) = shared_server, live
    before = endpoint_names(server)
    headers = {"Content-Type": "application/json"}
    for content in (b'{"name": "x", "config": ', b"not json at all", b"\xff\xfe"):
        assert_error(server.api("POST", content=content, headers=headers), 400, "MALFORMED_REQUEST")
        assert_error(
            server.api("PUT", f"/{name}/config", content=content, headers=headers), 400, "MALFORMED_REQUEST"
        )
    for raw in (b"[]", b'"endpoint"', b"3", b"null"):  # JSON, but not an object
        assert_error(server.api("POST", content=raw, headers=headers), 400, "INVALID_PARAMETER_VALUE")
        assert_error(
            server.api("PUT", f"/{name}/config", content=raw, headers=headers), 400, "INVALID_PARAMETER_VALUE"
        )
    assert_error(server.api("POST", content=b""), 400, "INVALID_PARAMETER_VALUE")
    assert endpoint_names(server) == before
    view = server.get(name)
    assert view["state"] == {"config_update": "NOT_UPDATING", "ready": "READY"}
    assert view["config"]["config_version"] == 1
    assert "pending_config" not in view


def test_invalid_update_leaves_the_endpoint_alone(
    shared_server: ServerProcess, live: tuple[str, str], fast_model: Path
) -> None:
    server, (name, entity) = shared_server, live
    m = str(fast_model)
    for body in (
        {"served_entities": []},
        {"served_entities": [{"entity_name": m, "workload_type": "GPU_MEDIUM"}]},
        _two(m, [("a", 60), ("b", 60)]),
        {"served_entities": [{"entity_name": "registered_name"}]},
        {"served_entities": [{"entity_name": m, "workload_size": "Small", "max_provisioned_concurrency": 4}]},
    ):
        assert_error(server.api("PUT", f"/{name}/config", json=body), 400, "INVALID_PARAMETER_VALUE")
    view = server.get(name)
    assert view["state"] == {"config_update": "NOT_UPDATING", "ready": "READY"}
    assert view["config"]["config_version"] == 1
    assert "pending_config" not in view
    assert served_by(server.invoke(name, X_BODY)) == entity


def test_duplicate_name_is_a_conflict(
    shared_server: ServerProcess, fast_model: Path, unique_name: str
) -> None:
    server, first, second = shared_server, tag("first"), tag("second")
    created = server.create(
        unique_name, {"served_entities": [{"entity_name": str(fast_model), "name": first}]}
    )
    assert created.status_code == 200, created.text
    again = server.create(
        unique_name, {"served_entities": [{"entity_name": str(fast_model), "name": second}]}
    )
    assert unique_name in assert_error(again, 409, "RESOURCE_ALREADY_EXISTS")["message"]
    view = server.get(unique_name)
    assert view["id"] == created.json()["id"]
    assert only_entity(view, "config" if "config" in view else "pending_config")["name"] == first
    assert endpoint_names(server).count(unique_name) == 1
    # Deleting while it is still being created works and stops what it started
    delete(server, unique_name)
    assert_error(server.api("GET", f"/{unique_name}"), 404, "RESOURCE_DOES_NOT_EXIST")
    poll(lambda: not replica_pids(server, first), timeout=30, what="replicas stopped after delete")
    assert not replica_pids(server, second)
    # ...and frees the name
    recreated = server.create(
        unique_name, {"served_entities": [{"entity_name": str(fast_model), "name": second}]}
    )
    assert recreated.status_code == 200, recreated.text
    assert recreated.json()["id"] != created.json()["id"]
    delete(server, unique_name)
    poll(lambda: not replica_pids(server, second), timeout=30, what="replicas stopped after delete")


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/api/2.0/serving-endpoints/x/unknown", 404),
        ("GET", "/api/2.0/no-such-api", 404),
        ("POST", "/api/2.1/serving-endpoints", 404),
        ("GET", "/serving-endpoints/x/invocations", 404),
        ("GET", "/serving-endpoints/a/b/invocations", 404),
        ("PATCH", "/api/2.0/serving-endpoints/x", 405),
        ("POST", "/api/2.0/serving-endpoints/x/config", 405),
    ],
)
def test_unknown_api_paths_are_json_errors(
    shared_server: ServerProcess, method: str, path: str, status: int
) -> None:
    response = shared_server.client.request(method, path, json={})
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error_code", "message"}
    assert body["error_code"] == ("ENDPOINT_NOT_FOUND" if status == 404 else "BAD_REQUEST")
    assert path in body["message"]


# 3. Concurrency semantics
def test_workload_sizes_are_echoed_as_provisioned_concurrency(
    shared_server: ServerProcess, fast_model: Path, unique_name: str
) -> None:
    sizes = [
        ("Small", False, 4, 4),
        ("Medium", False, 8, 16),
        ("Large", False, 16, 64),
        ("Small", True, 0, 4),
        ("Medium", True, 0, 16),
        ("Large", True, 0, 64),
    ]
    names = [tag(f"{size.lower()}{'-stz' if stz else ''}") for size, stz, _, _ in sizes]
    config = {
        "served_entities": [
            {"entity_name": str(fast_model), "name": n, "workload_size": size, "scale_to_zero_enabled": stz}
            for n, (size, stz, _, _) in zip(names, sizes, strict=True)
        ],
        "traffic_config": {
            "routes": [
                {"served_model_name": n, "traffic_percentage": 100 if i == 0 else 0}
                for i, n in enumerate(names)
            ]
        },
    }
    response = shared_server.create(unique_name, config)
    assert response.status_code == 200, response.text
    for view in (response.json(), shared_server.get(unique_name)):
        cfg = view.get("pending_config") or view["config"]
        for out, n, (size, stz, lo, hi) in zip(cfg["served_entities"], names, sizes, strict=True):
            assert out["name"] == n
            assert out["workload_size"] == size
            assert out["scale_to_zero_enabled"] is stz
            assert (out["min_provisioned_concurrency"], out["max_provisioned_concurrency"]) == (lo, hi), out
            assert out["workload_type"] == "CPU"
    delete(shared_server, unique_name)
    for n in names:
        poll(lambda n=n: not replica_pids(shared_server, n), timeout=30, what=f"{n} replicas stopped")


def test_large_entity_replicas_and_scale_to_zero_entity(
    shared_server: ServerProcess, fast_model: Path, unique_name: str
) -> None:
    server, large, stz = shared_server, tag("large"), tag("stz")
    config = {
        "served_entities": [
            {"entity_name": str(fast_model), "name": large, "workload_size": "Large"},
            {
                "entity_name": str(fast_model),
                "name": stz,
                "workload_size": "Small",
                "scale_to_zero_enabled": True,
            },
        ],
        "traffic_config": {
            "routes": [
                {"served_model_name": large, "traffic_percentage": 50},
                {"served_model_name": stz, "traffic_percentage": 50},
            ]
        },
    }
    assert server.create(unique_name, config).status_code == 200
    view = server.wait_not_updating(unique_name)
    assert view["state"] == {"config_update": "NOT_UPDATING", "ready": "READY"}, view
    by_name = {e["name"]: e for e in view["config"]["served_entities"]}

    # Large: 16-64 concurrency -> at most ceil(64 / 16) = 4 replicas, at most one per core, each
    # admitting enough to reach 64; it starts with what the minimum (16) needs and the autoscaler adds more.
    cores = host_cores()
    most = min(math.ceil(64 / 16), cores)
    per_replica = math.ceil(64 / most)
    replicas = max(1, math.ceil(16 / per_replica))
    assert len(replica_pids(server, large)) == replicas, server.log_tail()
    assert by_name[large]["state"]["deployment"] == "DEPLOYMENT_READY"
    message = by_name[large]["state"]["deployment_state_message"]
    assert f"{replicas} replica" in message, message
    assert f"{per_replica} concurrent" in message, message
    assert (by_name[large]["min_provisioned_concurrency"], by_name[large]["max_provisioned_concurrency"]) == (
        16,
        64,
    )

    # Scale-to-zero (0-4): READY with one replica x 4 until it has been idle
    assert by_name[stz]["state"]["deployment"] == "DEPLOYMENT_READY"
    assert (by_name[stz]["min_provisioned_concurrency"], by_name[stz]["max_provisioned_concurrency"]) == (
        0,
        4,
    )
    assert "1 replica" in by_name[stz]["state"]["deployment_state_message"]
    assert "4 concurrent" in by_name[stz]["state"]["deployment_state_message"]
    assert len(replica_pids(server, stz)) == 1

    seen: set[str] = set()
    for _ in range(60):
        seen.add(served_by(server.invoke(unique_name, X_BODY)))
        if seen == {large, stz}:
            break
    assert seen == {large, stz}
    delete(server, unique_name)


# 4. Models that cannot load
@pytest.mark.parametrize("kind", ["nonexistent", "broken"])
def test_unloadable_model_fails_the_deployment(
    shared_server: ServerProcess, model_zoo: Callable[..., Path], unique_name: str, tmp_path: Path, kind: str
) -> None:
    server, entity = shared_server, tag(kind)
    if kind == "nonexistent":
        uri = str(tmp_path / "no" / "such" / "model")
        expected = f"Failed to load model {uri}: "  # the replica's own line, from its output
    else:
        uri = str(model_zoo("broken_load_model"))
        expected = "weights file is corrupt (deliberate test failure)"
    response = server.create(unique_name, {"served_entities": [{"entity_name": uri, "name": entity}]})
    assert response.status_code == 200, response.text
    assert response.json()["state"]["config_update"] == "IN_PROGRESS"

    view = server.wait_not_updating(unique_name)
    assert view["state"] == {"config_update": "UPDATE_FAILED", "ready": "NOT_READY"}, view
    failed = only_entity(view)
    assert failed["state"]["deployment"] == "DEPLOYMENT_FAILED"
    assert expected in failed["state"]["deployment_state_message"], failed
    assert not replica_pids(server, entity)

    for _ in range(3):
        answer = server.invoke(unique_name, X_BODY)
        message = assert_error(answer, 400, "INVALID_STATE")["message"]
        assert entity in message
        assert "retry-after" not in answer.headers
    delete(server, unique_name)
    assert_error(server.api("GET", f"/{unique_name}"), 404, "RESOURCE_DOES_NOT_EXIST")


def test_failed_update_keeps_the_old_config_serving(
    shared_server: ServerProcess, fast_model: Path, model_zoo: Callable[..., Path], unique_name: str
) -> None:
    server, old, broken, fixed = shared_server, tag("old"), tag("broken"), tag("fixed")
    deploy(server, unique_name, fast_model, old)
    bad = {"served_entities": [{"entity_name": str(model_zoo("broken_load_model")), "name": broken}]}
    response = server.api("PUT", f"/{unique_name}/config", json=bad)
    assert response.status_code == 200, response.text
    assert response.json()["state"]["config_update"] == "IN_PROGRESS"

    requests = 0
    while server.get(unique_name)["state"]["config_update"] == "IN_PROGRESS":
        assert served_by(server.invoke(unique_name, X_BODY)) == old
        requests += 1
    assert requests >= 1

    view = server.get(unique_name)
    assert view["state"] == {"config_update": "UPDATE_FAILED", "ready": "READY"}, view
    assert view["config"]["config_version"] == 1
    assert only_entity(view)["name"] == old
    assert only_entity(view)["state"]["deployment"] == "DEPLOYMENT_READY"
    failed = only_entity(view, "pending_config")
    assert failed["name"] == broken
    assert failed["state"]["deployment"] == "DEPLOYMENT_FAILED"
    assert "weights file is corrupt" in failed["state"]["deployment_state_message"]
    for _ in range(20):
        assert served_by(server.invoke(unique_name, X_BODY)) == old

    # A failed update does not block the next one
    good = {"served_entities": [{"entity_name": str(fast_model), "name": fixed}]}
    response = server.api("PUT", f"/{unique_name}/config", json=good)
    assert response.status_code == 200, response.text
    assert response.json()["state"]["config_update"] == "IN_PROGRESS"
    view = server.wait_not_updating(unique_name)
    assert view["state"] == {"config_update": "NOT_UPDATING", "ready": "READY"}, view
    assert view["config"]["config_version"] > 1
    assert "pending_config" not in view
    assert only_entity(view)["name"] == fixed
    poll(lambda: served_by(server.invoke(unique_name, X_BODY)) == fixed, timeout=15, what="traffic on fixed")
    delete(server, unique_name)


# 5. Still creating
def test_invocations_while_creating_are_503_with_retry_after(
    shared_server: ServerProcess, model_zoo: Callable[..., Path], unique_name: str
) -> None:
    server, entity = shared_server, tag("slow")
    slow = model_zoo("slow_load_model", seconds=3.0)
    assert (
        server.create(
            unique_name, {"served_entities": [{"entity_name": str(slow), "name": entity}]}
        ).status_code
        == 200
    )
    response = server.invoke(unique_name, X_BODY)
    assert_error(response, 503, "TEMPORARILY_UNAVAILABLE")
    assert int(response.headers["retry-after"]) >= 1
    assert server.get(unique_name)["state"]["config_update"] == "IN_PROGRESS"  # it really was still creating
    view = server.wait_not_updating(unique_name)
    assert view["state"]["ready"] == "READY", view
    assert served_by(server.invoke(unique_name, X_BODY)) == entity
    delete(server, unique_name)


def test_autoscaler_decisions_and_the_metrics_export(shared_server: ServerProcess, fast_model: Path,
                                                     unique_name: str) -> None:
    """Every decision is readable with its inputs and reason; the export carries Databricks' names."""
    from prometheus_client.parser import text_string_to_metric_families

    server, entity = shared_server, tag("auto")
    created = server.create(unique_name, {"served_entities": [
        {"entity_name": str(fast_model), "name": entity, "min_provisioned_concurrency": 4,
         "max_provisioned_concurrency": 4}]})
    assert created.status_code == 200, created.text
    assert server.wait_not_updating(unique_name)["state"]["ready"] == "READY"
    logged = poll(lambda: server.api("GET", f"/{unique_name}/autoscaler/decisions").json()["decisions"],
                  timeout=30, what="a decision")
    last = logged[-1]
    assert last["served_entity_name"] == entity
    assert (last["desired"], last["concurrency"]) == (1, 4)
    assert last["reason"]
    assert {"demand", "target", "ready"} <= set(last["inputs"])
    one = server.api("GET", f"/{unique_name}/autoscaler/decisions",
                     params={"served_entity_name": entity, "limit": 1}).json()["decisions"]
    assert len(one) == 1
    assert_error(server.api("GET", f"/{unique_name}/autoscaler/decisions", params={"limit": 0}),
                 400, "INVALID_PARAMETER_VALUE")
    assert_error(server.api("GET", f"/{unique_name}/autoscaler/decisions", params={"limit": "many"}),
                 400, "INVALID_PARAMETER_VALUE")
    assert_error(server.api("GET", f"/{unique_name}/autoscaler/decisions", params={"served_entity_name": "nope"}),
                 404, "RESOURCE_DOES_NOT_EXIST")
    assert_error(server.api("GET", "/no-such-endpoint/autoscaler/decisions"), 404, "RESOURCE_DOES_NOT_EXIST")

    export = server.api("GET", f"/{unique_name}/metrics")
    assert export.status_code == 200, export.text
    assert export.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(export.text)}
    for name in ("provisioned_concurrent_requests_total", "cpu_usage_percentage", "mem_usage_percentage"):
        assert families[name].type == "gauge", name
    (sample,) = families["provisioned_concurrent_requests_total"].samples
    assert sample.labels == {"endpoint_name": unique_name, "served_entity_name": entity}
    assert sample.value == 4.0  # 1 ready replica x 4 for the whole window
    (memory,) = families["mem_usage_percentage"].samples
    assert 0 < memory.value < 100
    assert_error(server.api("GET", "/no-such-endpoint/metrics"), 404, "RESOURCE_DOES_NOT_EXIST")
    server.api("DELETE", f"/{unique_name}")

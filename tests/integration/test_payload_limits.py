"""Limits on input against real servers: bodies over 16 MiB (413), oversized headers (431), JSON nested
too deep and too many rows (400), each a Databricks `{"error_code", "message"}` answer; a refused
request reaches no replica and leaves nothing behind, and the endpoint answers the next one."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import ServerProcess
from tests.fixtures.models import FEATURES
from tests.integration.replica_tools import poll, replica_stats, replicas_named

MIB = 2**20
LIMIT = 16 * MIB
ROW = [0.1] * len(FEATURES)
BODY = {"dataframe_split": {"columns": FEATURES, "data": [ROW]}}


def assert_error(response: httpx.Response, status: int, code: str, *words: str) -> str:
    """A Databricks error: that status, a JSON body of exactly error_code and message (naming `words`)."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error_code", "message"}, body
    assert body["error_code"] == code, body
    for word in words:
        assert word in body["message"], body
    return body["message"]  # type: ignore[no-any-return]


def chunks(total: int, size: int = MIB) -> Iterator[bytes]:
    """A body of `total` bytes sent with Transfer-Encoding: chunked (no Content-Length)."""
    while total > 0:
        yield b"x" * min(size, total)
        total -= size


def nested(levels: int) -> Any:
    value: Any = 1.0
    for _ in range(levels):
        value = [value]
    return value


@pytest.fixture(scope="module")
def endpoint(shared_server: ServerProcess, model_zoo: Callable[..., Any]) -> Iterator[str]:
    """A ready scikit-learn endpoint (the numeric fast path) on the shared server."""
    name = "payload-limits"
    # Its entity's name is its own: replicas are found by entity name, and the shared server has others.
    created = shared_server.create(name, {"served_entities": [
        {"name": name, "entity_name": str(model_zoo("sklearn_classifier"))}]})
    assert created.status_code == 200, created.text
    assert shared_server.wait_not_updating(name)["state"]["ready"] == "READY"
    yield name
    shared_server.api("DELETE", f"/{name}")


def invocations(name: str) -> str:
    return f"/serving-endpoints/{name}/invocations"


def served(server: ServerProcess, name: str) -> int:
    """Requests the endpoint's replica has answered (its own /stats)."""
    entity = server.get(name)["config"]["served_entities"][0]["name"]
    (replica,) = replicas_named(server, entity)
    return int(replica_stats(replica.socket)["requests"])


# Bodies
def test_a_body_over_16_mib_gets_413_and_never_reaches_the_replica(shared_server, endpoint):
    before = served(shared_server, endpoint)
    headers = {"content-type": "application/json"}
    announced = shared_server.client.post(invocations(endpoint), content=b"x" * (LIMIT + 1), headers=headers)
    assert_error(announced, 413, "PAYLOAD_TOO_LARGE", "16 MiB", "BERTH_MAX_BODY_MB")
    chunked = shared_server.client.post(invocations(endpoint), content=chunks(LIMIT + 1), headers=headers)
    assert "content-length" not in chunked.request.headers
    assert_error(chunked, 413, "PAYLOAD_TOO_LARGE", "16 MiB")
    assert served(shared_server, endpoint) == before  # neither reached the replica
    # The endpoint answers on, on the same connection pool.
    response = shared_server.invoke(endpoint, BODY)
    assert response.status_code == 200, response.text
    assert served(shared_server, endpoint) == before + 1


def test_a_body_of_exactly_16_mib_is_forwarded(shared_server, endpoint):
    padding = LIMIT - len(json.dumps(BODY)) - len(', "client_request_id": ""')
    body = json.dumps({**BODY, "client_request_id": "p" * padding}).encode()
    assert len(body) == LIMIT
    response = shared_server.invoke(endpoint, content=body)
    assert response.status_code == 200, response.text


def test_control_plane_bodies_over_16_mib_get_413_and_create_nothing(shared_server, unique_name):
    big = {"name": unique_name, "config": {"served_entities": []}, "description": "d" * LIMIT}
    announced = shared_server.api("POST", content=json.dumps(big).encode())
    assert_error(announced, 413, "PAYLOAD_TOO_LARGE")
    chunked = shared_server.api("POST", content=chunks(LIMIT + 1))
    assert_error(chunked, 413, "PAYLOAD_TOO_LARGE")
    assert shared_server.api("GET", f"/{unique_name}").status_code == 404


# Headers
def test_oversized_headers_get_431(shared_server, endpoint):
    one = shared_server.client.post(invocations(endpoint), json=BODY, headers={"x-big": "a" * (16 * 1024)})
    assert_error(one, 431, "REQUEST_HEADER_FIELDS_TOO_LARGE", "'x-big'", "BERTH_MAX_HEADER_FIELD_KB")
    many = {f"x-h{i}": "a" * 15_000 for i in range(5)}  # each within 16 KiB, 75 kB together
    assert_error(shared_server.client.get("/api/2.0/serving-endpoints", headers=many), 431,
                 "REQUEST_HEADER_FIELDS_TOO_LARGE", "BERTH_MAX_HEADER_KB")
    # Without a token too: the size is checked before anything else.
    assert_error(httpx.get(f"{shared_server.url}/api/2.0/serving-endpoints", headers={"x-big": "a" * 20_000}),
                 431, "REQUEST_HEADER_FIELDS_TOO_LARGE")
    assert shared_server.invoke(endpoint, BODY).status_code == 200


def test_a_huge_header_is_refused_while_it_arrives(shared_server, endpoint):
    """uvicorn and httptools set no limit of their own (a 50 MB header took ~5 s of CPU): the gateway's
    protocol answers 431 once the head passes 64 KiB, and closes the connection."""
    address = urlsplit(shared_server.url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (8 * MIB) + b"\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):  # until the server closes the connection
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), answer[:300]
    assert b"connection: close" in head.lower()
    assert json.loads(payload)["error_code"] == "REQUEST_HEADER_FIELDS_TOO_LARGE"
    assert shared_server.invoke(endpoint, BODY).status_code == 200


# JSON depth and rows
def test_control_plane_json_nested_too_deep_gets_400(shared_server, unique_name):
    entity = {"entity_name": "m", "environment_vars": {"X": "y"}, "extra": nested(70)}
    response = shared_server.create(unique_name, {"served_entities": [entity]})
    assert_error(response, 400, "BAD_REQUEST", "limit of 64", "BERTH_MAX_JSON_DEPTH")
    deeper_than_orjson = b'{"name": "x", "config": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    assert_error(shared_server.api("POST", content=deeper_than_orjson), 400, "BAD_REQUEST", "limit of 64")
    assert shared_server.api("GET", f"/{unique_name}").status_code == 404


def test_a_replica_refuses_more_than_100000_rows_and_json_too_deep(shared_server, endpoint):
    rows = shared_server.invoke(endpoint, {"dataframe_split": {"columns": FEATURES, "data": [ROW] * 100_001}})
    assert_error(rows, 400, "BAD_REQUEST", "100001 rows", "100000", "BERTH_MAX_ROWS")
    deep = {"dataframe_split": {"columns": FEATURES, "data": [[*ROW[:-1], nested(70)]]}}
    assert_error(shared_server.invoke(endpoint, deep), 400, "BAD_REQUEST", "limit of 64", "BERTH_MAX_JSON_DEPTH")
    assert_error(shared_server.invoke(endpoint, content=b"[" * 5000 + b"]" * 5000), 400, "BAD_REQUEST",
                 "limit of 64")
    ok = shared_server.invoke(endpoint, {"dataframe_split": {"columns": FEATURES, "data": [ROW] * 1000}})
    assert ok.status_code == 200, ok.text
    assert len(ok.json()["predictions"]) == 1000


def test_mlflows_path_refuses_rows_over_the_limit(shared_server, model_zoo, unique_name):
    shared_server.deploy(unique_name, model_zoo("no_signature_model"))  # no schema: MLflow parses every body
    rows = shared_server.invoke(unique_name, {"dataframe_records": [{"x": 1}] * 100_001})
    assert_error(rows, 400, "BAD_REQUEST", "100001 rows")
    assert shared_server.invoke(unique_name, {"inputs": nested(64)}).status_code == 400  # 65 levels
    response = shared_server.invoke(unique_name, {"dataframe_records": [{"x": 1}] * 3})
    assert response.status_code == 200, response.text
    shared_server.api("DELETE", f"/{unique_name}")


# Settings, in every gateway process and in the replica
@pytest.mark.slow
def test_the_limits_are_settings_and_hold_in_every_gateway_process(server_factory, model_zoo):
    env = {"BERTH_MAX_BODY_MB": "0.001", "BERTH_MAX_HEADER_FIELD_KB": "1", "BERTH_MAX_ROWS": "5",
           "BERTH_MAX_JSON_DEPTH": "8", "BERTH_REPLICA_FORK": "0"}  # fork off: the replica's limits as arguments
    server = server_factory(extra_env=env, args=["--gateway-workers", "2"])
    server.deploy("small", model_zoo("sklearn_classifier"))
    headers = {"Authorization": f"Bearer {server.token}", "content-type": "application/json"}
    limit = int(0.001 * MIB)
    seen: dict[str, set[str]] = {"body": set(), "chunked": set(), "control": set(), "header": set()}

    def each_process_refused() -> bool:
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as fresh:  # a new connection
            answers = {
                "body": fresh.post("/serving-endpoints/small/invocations", content=b"x" * (limit + 1)),
                "chunked": fresh.post("/serving-endpoints/small/invocations", content=chunks(limit + 1, 100)),
                "control": fresh.post("/api/2.0/serving-endpoints", content=chunks(limit + 1, 100)),
                "header": fresh.get("/api/2.0/serving-endpoints", headers={"x-big": "a" * 1100}),
            }
        for kind, response in answers.items():
            expected = (431, "REQUEST_HEADER_FIELDS_TOO_LARGE") if kind == "header" else (413, "PAYLOAD_TOO_LARGE")
            assert_error(response, *expected)
            seen[kind].add(response.headers["x-berth-gateway"])
        return all(names == {"0", "1"} for names in seen.values())

    poll(each_process_refused, timeout=60, interval=0, what="both gateway processes refusing")
    rows = server.invoke("small", {"dataframe_split": {"columns": FEATURES, "data": [ROW] * 6}})
    assert_error(rows, 400, "BAD_REQUEST", "the limit is 5 rows")
    deep = {"dataframe_split": {"columns": FEATURES, "data": [[*ROW[:-1], nested(5)]]}}  # 4 + 5 levels
    assert_error(server.invoke("small", deep), 400, "BAD_REQUEST", "limit of 8")
    assert server.invoke("small", {"dataframe_split": {"columns": FEATURES, "data": [ROW] * 5}}).status_code == 200

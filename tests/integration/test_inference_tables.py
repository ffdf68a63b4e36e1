"""Inference tables against a real server: every request, errors included, becomes a row of a Delta
table under the data directory (read back with deltalake), from both gateway processes;
rows arrive while the server runs and the rest on a clean shutdown; a store that stalls costs rows
(counted in a metric), never requests."""

from __future__ import annotations

import collections
import concurrent.futures
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from deltalake import DeltaTable

from tests.fixtures.models import FEATURES
from tests.integration.replica_tools import metric_samples, poll

pytestmark = pytest.mark.slow
OK = {"dataframe_split": {"columns": FEATURES, "data": [[0.1] * 20]}}
BAD = {"dataframe_split": {"columns": FEATURES[:-1], "data": [[0.1] * 19]}}
TABLE = {"catalog_name": "main", "schema_name": "ml", "table_name_prefix": "clf", "enabled": True}


def send(server, name: str, bodies: list[object], clients: int = 8) -> list[tuple[int, str]]:  # type: ignore[no-untyped-def]
    """Each body once, over `clients` connections; (status, gateway process) per answer."""
    def client(part: list[object]) -> list[tuple[int, str]]:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.token}"}) as c:
            out = []
            for body in part:
                r = c.post(f"/serving-endpoints/{name}/invocations", json=body)
                out.append((r.status_code, r.headers["x-berth-gateway"]))
            return out

    parts = [bodies[i::clients] for i in range(clients)]
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        return [a for part in pool.map(client, parts) for a in part]


def rows(server, endpoint: str) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """The endpoint's inference table, one dict a row (none before its first write)."""
    path = server.data_dir / "inference" / endpoint
    if not (path / "_delta_log").exists():
        return []
    return DeltaTable(str(path)).to_pyarrow_table().to_pylist()


def test_every_request_is_a_row_from_both_gateway_processes_and_none_is_lost_at_shutdown(server_factory,
                                                                                          model_zoo):
    server = server_factory(args=["--gateway-workers", "2"])
    entity = {"name": "clf", "entity_name": str(model_zoo("sklearn_classifier")),
              "min_provisioned_concurrency": 8, "max_provisioned_concurrency": 8}  # no client gets a 429
    created = server.create("logged", {"served_entities": [entity]}, ai_gateway={"inference_table_config": TABLE})
    assert created.status_code == 200, created.text
    legacy = server.create("legacy", {"served_entities": [entity],
                                      "auto_capture_config": {**TABLE, "table_name_prefix": "old"}})
    assert legacy.status_code == 200, legacy.text
    for name in ("logged", "legacy"):
        assert server.wait_not_updating(name)["state"]["ready"] == "READY"
    view = server.get("logged")
    assert view["ai_gateway"]["inference_table_config"] == TABLE
    assert server.get("legacy")["config"]["auto_capture_config"]["state"]["payload_table"] == {
        "name": "main.ml.old_payload", "status": "ACTIVE"}

    # While it runs: rows arrive within seconds, from both processes.
    first = [{**(BAD if i % 4 == 0 else OK), "client_request_id": f"first-{i}"} for i in range(40)]
    answers = send(server, "logged", first)
    assert collections.Counter(s for s, _ in answers) == {200: 30, 400: 10}
    assert {g for _, g in answers} == {"0", "1"}  # both processes served (and so logged) some
    poll(lambda: len(rows(server, "logged")) == 40, timeout=30, what="40 rows")
    frame = rows(server, "logged")
    assert sorted(r["client_request_id"] for r in frame) == sorted(b["client_request_id"] for b in first)
    assert collections.Counter(r["status_code"] for r in frame) == {200: 30, 400: 10}
    assert len({r["databricks_request_id"] for r in frame}) == 40
    (requester,) = {r["requester"] for r in frame}  # the admin token's user
    assert requester
    (entity_id,) = {r["served_entity_id"] for r in frame}
    assert len(entity_id) == 32
    ok = next(r for r in frame if r["status_code"] == 200)
    assert orjson.loads(ok["request"])["dataframe_split"]["columns"] == FEATURES
    assert "predictions" in orjson.loads(ok["response"])
    assert ok["execution_duration_ms"] >= 0
    assert ok["logging_error_codes"] == []
    assert ok["request_time"].date() == ok["request_date"]
    bad = next(r for r in frame if r["status_code"] == 400)
    assert orjson.loads(bad["response"])["error_code"]  # the error answer, as the client got it

    # A body that is not JSON is logged too, with the replica parser's 400.
    assert server.invoke("logged", content=b"not json").status_code == 400

    # The rest goes in at a clean shutdown: nothing buffered is lost.
    second = [{**OK, "client_request_id": f"second-{i}"} for i in range(60)]
    assert {s for s, _ in send(server, "logged", second)} == {200}
    assert {s for s, _ in send(server, "legacy", second[:10])} == {200}
    assert metric_samples(server, "berth_inference_rows_dropped_total") in ([], [0.0])
    assert server.stop() == 0
    frame = rows(server, "logged")
    assert len(frame) == 40 + 1 + 60
    (garbled,) = [r for r in frame if r["request"] == "not json"]
    assert garbled["status_code"] == 400
    assert sum(1 for r in frame if (r["client_request_id"] or "").startswith("second-")) == 60
    assert len(rows(server, "legacy")) == 10


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A TCP port that accepts connections and never answers: an object store that stalls."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


def test_a_stalled_store_drops_rows_and_counts_them_but_every_request_is_answered(server_factory, model_zoo,
                                                                                  black_hole):
    server = server_factory(extra_env={
        "BERTH_INFERENCE_TABLES_URI": "s3://tables/inference", "BERTH_INFERENCE_BUFFER_MB": "0.05",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{black_hole}", "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
        "AWS_S3_ALLOW_UNSAFE_RENAME": "true"})
    entity = {"name": "clf", "entity_name": str(model_zoo("sklearn_classifier")),
              "min_provisioned_concurrency": 4, "max_provisioned_concurrency": 4}
    created = server.create("stalled", {"served_entities": [entity]}, ai_gateway={"inference_table_config": TABLE})
    assert created.status_code == 200, created.text
    assert server.wait_not_updating("stalled")["state"]["ready"] == "READY"
    answers = send(server, "stalled", [OK] * 200, clients=4)
    assert collections.Counter(s for s, _ in answers) == {200: 200}
    dropped = metric_samples(server, "berth_inference_rows_dropped_total", endpoint="stalled")
    assert dropped
    assert 0 < dropped[0] < 200  # the 50 KB buffer holds some rows (~1.2 KB each); the rest were counted
    assert metric_samples(server, "berth_inference_rows_written_total", endpoint="stalled") in ([], [0.0])
    assert server.invoke("stalled", OK).status_code == 200
    assert server.stop() == 0  # a stalled store does not hold the shutdown (it gives up after a few seconds)

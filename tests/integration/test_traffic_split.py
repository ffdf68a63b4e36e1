"""Traffic split across served entities, measured from real responses under concurrent load.

Every entity serves the same model, which answers with its replica's pid; the test maps pids to
entities from outside (replica processes' command lines), so the `served-model-name` header is
checked against the replica that really answered.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httptools
import httpx
import pytest

from tests.conftest import ServerProcess
from tests.integration.replica_tools import replicas_of

X_BODY = {"dataframe_split": {"columns": ["x"], "data": [[1.0]]}}
TOLERANCE_PP = 3.0


def replica_entities(server: ServerProcess) -> dict[int, str]:
    """pid -> served-entity name of every live replica process of the server."""
    return {r.pid: r.name for r in replicas_of(server)}


def routes(**pcts: int) -> dict[str, Any]:
    return {"routes": [{"served_model_name": n, "traffic_percentage": p} for n, p in pcts.items()]}


class _Answer:
    """httptools callbacks collecting one HTTP/1.1 response."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


async def _blast(
    server: ServerProcess, name: str, total: int, concurrency: int
) -> list[tuple[int, str, Any]]:
    """Send `total` invocations over `concurrency` keep-alive connections; (status, served-model-name,
    predictions) each.

    Plain HTTP/1.1 on asyncio streams, answers parsed by httptools: httpx's client costs some 3 ms of
    CPU per request here, which on 2 cores made the client, not Berth, most of the test's time.
    """
    url = httpx.URL(server.url)
    host, port = url.host, url.port
    assert port is not None, server.url
    body = json.dumps(X_BODY).encode()
    request = (
        f"POST /serving-endpoints/{name}/invocations HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {server.token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    results: list[tuple[int, str, Any]] = []
    remaining = iter(range(total))

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for _ in remaining:
                answer = _Answer()
                parser = httptools.HttpResponseParser(answer)
                writer.write(request)
                while not answer.complete:
                    data = await asyncio.wait_for(reader.read(65536), timeout=60.0)
                    if not data:
                        raise AssertionError("the gateway closed the connection before answering")
                    parser.feed_data(data)
                predictions = json.loads(answer.body).get("predictions")
                results.append((parser.get_status_code(), answer.headers.get("served-model-name", ""), predictions))
                if not parser.should_keep_alive():  # the gateway asked to close: go on on a new connection
                    writer.close()
                    await writer.wait_closed()
                    reader, writer = await asyncio.open_connection(host, port)
        finally:
            writer.close()
            await writer.wait_closed()

    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return results


def blast(server: ServerProcess, name: str, total: int, concurrency: int = 8) -> list[tuple[int, str, Any]]:
    return asyncio.run(_blast(server, name, total, concurrency))


def check_answers(results: list[tuple[int, str, Any]], pid_entity: dict[int, str]) -> Counter[str]:
    """Every answer is a 200 from a replica of the entity its header names; counts per entity."""
    statuses = Counter(status for status, _, _ in results)
    assert statuses == {200: len(results)}, statuses
    for _, served, predictions in results:
        (pid,) = predictions
        assert pid_entity.get(pid) == served, (pid, served, pid_entity)
    return Counter(served for _, served, _ in results)


@pytest.mark.slow
def test_traffic_split_50_30_20_and_zero(
    shared_server: ServerProcess, model_zoo: Callable[..., Path], unique_name: str
) -> None:
    server = shared_server
    model = str(model_zoo("slow_load_model", seconds=0.0))  # loads at once, answers with its pid
    tok = uuid.uuid4().hex[:8]
    pct = {f"a-{tok}": 50, f"b-{tok}": 30, f"c-{tok}": 20, f"z-{tok}": 0}
    config = {
        "served_entities": [{"entity_name": model, "name": n} for n in pct],
        "traffic_config": routes(**pct),
    }
    assert server.create(unique_name, config).status_code == 200
    view = server.wait_not_updating(unique_name)
    assert view["state"] == {"config_update": "NOT_UPDATING", "ready": "READY"}, view
    assert [
        (r["served_model_name"], r["traffic_percentage"]) for r in view["config"]["traffic_config"]["routes"]
    ] == list(pct.items())
    pid_entity = {pid: e for pid, e in replica_entities(server).items() if e in pct}
    assert sorted(pid_entity.values()) == sorted(pct), pid_entity  # one replica each, the 0% one included

    total = 4000
    start = time.monotonic()
    results = blast(server, unique_name, total)
    elapsed = time.monotonic() - start
    assert len(results) == total
    counts = check_answers(results, pid_entity)
    shares = {n: 100.0 * counts[n] / total for n in pct}
    print(f"traffic split over {total} requests in {elapsed:.1f}s: {shares}")
    assert counts[f"z-{tok}"] == 0, shares
    for n, p in pct.items():
        assert abs(shares[n] - p) <= TOLERANCE_PP, (n, shares)
    assert set(counts) == {n for n, p in pct.items() if p > 0}
    assert server.api("DELETE", f"/{unique_name}").status_code == 200


def test_traffic_only_update_reuses_replicas_and_moves_traffic(
    shared_server: ServerProcess, model_zoo: Callable[..., Path], unique_name: str
) -> None:
    server = shared_server
    model = str(model_zoo("slow_load_model", seconds=0.0))
    tok = uuid.uuid4().hex[:8]
    a, b = f"a-{tok}", f"b-{tok}"
    entities = [{"entity_name": model, "name": a}, {"entity_name": model, "name": b}]
    created = server.create(
        unique_name, {"served_entities": entities, "traffic_config": routes(**{a: 100, b: 0})}
    )
    assert created.status_code == 200, created.text
    assert server.wait_not_updating(unique_name)["state"]["ready"] == "READY"
    pid_entity = {pid: e for pid, e in replica_entities(server).items() if e in (a, b)}
    assert sorted(pid_entity.values()) == [a, b]
    assert check_answers(blast(server, unique_name, 300, concurrency=8), pid_entity) == {a: 300}

    # Only the split changes: the same replicas serve, and the new split is live at once
    response = server.api(
        "PUT",
        f"/{unique_name}/config",
        json={"served_entities": entities, "traffic_config": routes(**{a: 0, b: 100})},
    )
    assert response.status_code == 200, response.text
    view = server.wait_not_updating(unique_name, timeout=10)
    assert view["state"] == {"config_update": "NOT_UPDATING", "ready": "READY"}, view
    assert view["config"]["config_version"] == 2
    assert [e["state"]["deployment"] for e in view["config"]["served_entities"]] == ["DEPLOYMENT_READY"] * 2
    assert {pid: e for pid, e in replica_entities(server).items() if e in (a, b)} == pid_entity
    # the gateway's routing table follows the promotion within a reconcile pass
    deadline = time.monotonic() + 5
    while server.invoke(unique_name, X_BODY).headers.get("served-model-name") != b:
        assert time.monotonic() < deadline, "traffic did not move to the new split"
    assert check_answers(blast(server, unique_name, 300, concurrency=8), pid_entity) == {b: 300}
    assert server.api("DELETE", f"/{unique_name}").status_code == 200

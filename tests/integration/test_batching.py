"""Adaptive micro-batching through a real replica process: concurrent requests that were merged
into one model call get exactly the answers they get one at a time."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures.models import FEATURES
from tests.integration.replica_tools import ReplicaProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def replicas(model_zoo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batching")
    models = {"classifier": model_zoo("sklearn_classifier"), "dataframe": model_zoo("dataframe_model")}
    with ThreadPoolExecutor(len(models)) as pool:  # both replicas load at once
        futures = {name: pool.submit(ReplicaProcess, model, tmp, max_concurrency=64) for name, model in models.items()}
    started: dict[str, ReplicaProcess] = {}
    try:
        for name, future in futures.items():
            started[name] = future.result()
        yield started
    finally:
        for replica in started.values():
            replica.stop()


value = st.one_of(
    st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=32),
    st.integers(min_value=-5, max_value=5),
)


@st.composite
def request_body(draw, columns: list[str]) -> tuple[bytes, str]:
    rows = draw(st.lists(st.lists(value, min_size=len(columns), max_size=len(columns)), min_size=1, max_size=5))
    if draw(st.booleans()) and draw(st.integers(0, 9)) == 0:  # now and then a bad row: fails alone
        rows[0][0] = "not-a-number"
    fmt = draw(st.sampled_from(["split", "records", "instances", "inputs", "csv"]))
    if fmt == "csv":
        lines = [",".join(columns)] + [",".join(str(v) for v in row) for row in rows]
        return ("\n".join(lines) + "\n").encode(), "text/csv"
    records = [dict(zip(columns, row, strict=True)) for row in rows]
    body = {
        "split": {"dataframe_split": {"columns": columns, "data": rows}},
        "records": {"dataframe_records": records},
        "instances": {"instances": records},
        "inputs": {"inputs": {c: [row[i] for row in rows] for i, c in enumerate(columns)}},
    }[fmt]
    return json.dumps(body).encode(), "application/json"


async def send_concurrently(socket: str, requests: list[tuple[bytes, str]]) -> list[tuple[int, bytes]]:
    transport = httpx.AsyncHTTPTransport(uds=socket)
    limits = httpx.Limits(max_connections=len(requests))
    async with httpx.AsyncClient(transport=transport, base_url="http://replica", limits=limits, timeout=60) as c:
        responses = await asyncio.gather(
            *(c.post("/invocations", content=b, headers={"content-type": t}) for b, t in requests)
        )
    return [(r.status_code, r.content) for r in responses]


def one_at_a_time(replica: ReplicaProcess, requests: list[tuple[bytes, str]]) -> list[tuple[int, bytes]]:
    with replica.client() as c:
        return [
            (r.status_code, r.content)
            for r in (c.post("/invocations", content=b, headers={"content-type": t}) for b, t in requests)
        ]


def mixes(columns: list[str]):  # type: ignore[no-untyped-def]
    return st.lists(request_body(columns), min_size=2, max_size=40)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_batched_answers_equal_unbatched(replicas, data):
    name = data.draw(st.sampled_from(["classifier", "dataframe"]))
    replica = replicas[name]
    columns = FEATURES if name == "classifier" else ["a", "b"]
    requests = data.draw(mixes(columns))
    together = asyncio.run(send_concurrently(replica.socket, requests))
    alone = one_at_a_time(replica, requests)
    for (status_t, body_t), (status_a, body_a), (sent, _) in zip(together, alone, requests, strict=True):
        assert status_t == status_a, (sent, body_t, body_a)
        assert json.loads(body_t) == json.loads(body_a), sent


def test_concurrent_requests_are_batched(replicas):
    replica = replicas["classifier"]
    before = replica.stats()
    body = json.dumps({"dataframe_split": {"columns": FEATURES, "data": [[0.5] * 20]}}).encode()
    results = asyncio.run(send_concurrently(replica.socket, [(body, "application/json")] * 64))
    assert {status for status, _ in results} == {200}
    after = replica.stats()
    assert after["batches"] > before["batches"], after
    assert after["largest_batch"] > 1, after
    assert after["requests"] - before["requests"] == 64

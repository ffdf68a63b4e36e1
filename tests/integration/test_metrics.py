"""`/metrics`: Prometheus text with request counts, latency and the gateway's own added latency."""

from __future__ import annotations

import collections
import concurrent.futures

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.models import FEATURES
from tests.integration.replica_tools import poll


def samples(server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = server.client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_requests_and_gateway_latency(shared_server, model_zoo, unique_name):
    view = shared_server.deploy(unique_name, model_zoo("sklearn_classifier"))
    entity = view["config"]["served_entities"][0]["name"]
    ok = {"dataframe_split": {"columns": FEATURES, "data": [[0.1] * 20]}}
    bad = {"dataframe_split": {"columns": FEATURES[:-1], "data": [[0.1] * 19]}}
    before = samples(shared_server)
    for _ in range(7):
        assert shared_server.invoke(unique_name, ok).status_code == 200
    for _ in range(3):
        assert shared_server.invoke(unique_name, bad).status_code == 400
    after = samples(shared_server)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("berth_requests_total", endpoint=unique_name, entity=entity, status="200") == 7
    assert delta("berth_requests_total", endpoint=unique_name, entity=entity, status="400") == 3
    assert delta("berth_request_latency_seconds_count", endpoint=unique_name, entity=entity) == 10
    assert delta("berth_queue_wait_seconds_count", endpoint=unique_name, entity=entity) == 10
    assert delta("berth_gateway_added_latency_seconds_count") >= 10
    assert after[("berth_gateway_added_latency_seconds_sum", ())] > 0

    # What the autoscaling loop reads from the replica (once a second): its model calls, their time
    # and the requests they scored (a batch is one call), its memory; and the replica's start.
    labels = (("endpoint", unique_name), ("entity", entity))
    scored = poll(lambda: (now := samples(shared_server)).get(("berth_model_call_requests_total", labels), 0) >= 7
                  and now, timeout=30, what="the model calls to be sampled")
    calls = scored[("berth_model_calls_total", labels)]
    assert 1 <= calls <= scored[("berth_model_call_requests_total", labels)] <= 10
    assert scored[("berth_model_call_seconds_total", labels)] > 0
    assert scored[("berth_replica_start_seconds_count", labels)] == 1
    assert scored[("berth_replica_start_seconds_sum", labels)] > 0
    assert scored[("berth_replica_memory_bytes", labels)] > 10 * 2**20
    assert scored[("berth_in_flight_requests", labels)] == 0
    assert scored[("berth_queued_requests", labels)] == 0


def test_metrics_need_a_token(shared_server):
    assert httpx.get(f"{shared_server.url}/metrics").status_code == 401


def export(server, name: str) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """The endpoint export's samples summed over its served entities, by sample name (`_bucket` by `le`)."""
    response = server.api("GET", f"/{name}/metrics")
    assert response.status_code == 200, response.text
    out: dict[str, float] = collections.defaultdict(float)
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            assert s.labels["endpoint_name"] == name
            key = s.name + (f"@{s.labels['le']}" if "le" in s.labels else "")
            out[key] += s.value
    return out


def test_the_endpoint_export_counts_the_last_minute_over_both_gateway_processes(server_factory, model_zoo):
    """N requests, k of them invalid, through two gateway processes: the export shows N, k and a latency
    histogram of N (parsed with Prometheus' parser); a (time-scaled) minute later it is back at zero."""
    server = server_factory(args=["--gateway-workers", "2"], extra_env={"BERTH_AUTOSCALE_TIME_SCALE": "0.1"})
    server.deploy("window", model_zoo("sklearn_classifier"), min_provisioned_concurrency=8,
                  max_provisioned_concurrency=8)
    ok = {"dataframe_split": {"columns": FEATURES, "data": [[0.1] * 20]}}
    bad = {"dataframe_split": {"columns": FEATURES[:-1], "data": [[0.1] * 19]}}
    n, k, clients = 48, 12, 8

    def client(i: int) -> list[tuple[int, str]]:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.token}"}) as c:
            out = []
            for j in range(n // clients):
                body = bad if (i * (n // clients) + j) % (n // k) == 0 else ok
                r = c.post("/serving-endpoints/window/invocations", json=body)
                out.append((r.status_code, r.headers["x-berth-gateway"]))
            return out

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        answers = [a for part in pool.map(client, range(clients)) for a in part]
    statuses = collections.Counter(status for status, _ in answers)
    assert statuses == {200: n - k, 400: k}, statuses
    assert set(collections.Counter(g for _, g in answers)) == {"0", "1"}  # both processes served some

    now = export(server, "window")
    assert now["request_count_total"] == n
    assert now["request_4xx_count_total"] == k
    assert now["request_5xx_count_total"] == 0
    assert now["request_latency_ms_count"] == n
    assert now["request_latency_ms_bucket@+Inf"] == n
    assert now["request_latency_ms_sum"] > 0
    assert now["model_queue_time_ms_count"] == n
    assert now["provisioned_concurrent_requests_total"] > 0

    later = poll(lambda: (e := export(server, "window"))["request_count_total"] == 0 and e, timeout=60,
                 interval=0.5, what="the export's window to pass")
    assert later["request_4xx_count_total"] == later["request_latency_ms_count"] == 0
    assert later["model_queue_time_ms_count"] == 0

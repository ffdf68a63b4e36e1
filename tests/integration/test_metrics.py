"""`/metrics`: Prometheus text with request counts, latency and the gateway's own added latency."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.models import FEATURES


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
    assert delta("berth_request_latency_seconds_count", endpoint=unique_name) == 10
    assert delta("berth_gateway_added_latency_seconds_count") >= 10
    assert after[("berth_gateway_added_latency_seconds_sum", ())] > 0


def test_metrics_need_a_token(shared_server):
    assert httpx.get(f"{shared_server.url}/metrics").status_code == 401

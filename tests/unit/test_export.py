"""The endpoint metrics export's last-minute arithmetic, and its text read back with Prometheus' parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from berth.autoscaler import Sample
from berth.observability.export import Histo, Totals, Trailing, render_endpoint_metrics
from berth.observability.metrics import LATENCY_BUCKETS, Metrics, no_requests

BOUNDS = (0.01, 0.1, float("inf"))


def totals(requests: float, client: float = 0, server: float = 0, counts=(0, 0, 0), total=0.0) -> Totals:  # type: ignore[no-untyped-def]
    histo = Histo(BOUNDS, tuple(float(c) for c in counts), total)
    return Totals(requests, client, server, histo, histo)


def test_histo_minus_subtracts_each_bucket_and_never_goes_below_zero():
    now = Histo(BOUNDS, (3, 5, 9), 2.0)
    assert now.minus(Histo(BOUNDS, (1, 1, 2), 0.5)) == Histo(BOUNDS, (2, 4, 7), 1.5)
    assert now.minus(None) is now
    assert now.minus(Histo(BOUNDS, (4, 6, 10), 3.0)) == Histo(BOUNDS, (0, 0, 0), 0.0)
    assert now.count == 9


def test_trailing_subtracts_the_newest_snapshot_at_least_a_window_old():
    trail = Trailing(window_s=60)
    key = ("ep", "a")
    trail.add(0, {key: totals(0)})
    trail.add(30, {key: totals(10, client=2)})
    trail.add(61, {key: totals(25, client=3)})
    # Younger than a window: everything since the first snapshot.
    assert trail.over(59, {key: totals(12, client=2)})[key].requests == 12
    # At 90 the base is the snapshot of 30: 25 + 5 more - 10.
    window = trail.over(90, {key: totals(30, client=4)})[key]
    assert (window.requests, window.client_errors) == (20, 2)
    # Two windows after the last request, the series fall back to zero.
    assert trail.over(200, {key: totals(30, client=4)})[key].requests == 30 - 25
    trail.add(200, {key: totals(30, client=4)})
    trail.add(262, {key: totals(30, client=4)})
    assert trail.over(262, {key: totals(30, client=4)})[key].requests == 0


def test_trailing_keeps_only_what_a_later_window_can_need():
    trail = Trailing(window_s=10)
    for t in range(100):
        trail.add(float(t), {("ep", "a"): totals(t)})
    assert len(trail._snapshots) == 11  # the one 10 s old and the ten after it
    assert trail.over(99, {("ep", "a"): totals(99)})[("ep", "a")].requests == 10


def test_a_series_new_in_the_window_counts_from_zero():
    trail = Trailing(window_s=60)
    trail.add(0, {})
    trail.add(100, {("ep", "a"): totals(5)})
    assert trail.over(130, {("ep", "a"): totals(7)})[("ep", "a")].requests == 7  # base: the snapshot at 0
    assert trail.over(170, {("ep", "a"): totals(7), ("ep", "b"): totals(2)}) == {
        ("ep", "a"): totals(2), ("ep", "b"): totals(2)}


def test_metrics_totals_read_the_gateway_series_by_status_class_and_entity():
    metrics = Metrics()
    for status, n in (("200", 7), ("400", 3), ("404", 1), ("503", 2)):
        metrics.requests.labels("ep", "a", status).inc(n)
    metrics.requests.labels("ep", "", "429").inc(4)
    for value in (0.0004, 0.003, 0.2, 7.0):
        metrics.latency.labels("ep", "a").observe(value)
    metrics.queue_wait.labels("ep", "a").observe(0.002)
    got = metrics.totals()
    a = got[("ep", "a")]
    assert (a.requests, a.client_errors, a.server_errors) == (13, 4, 2)
    assert a.latency is not None
    assert a.latency.count == 4
    assert a.latency.counts[0] == 1  # 0.4 ms is under the first bound, 0.5 ms
    assert a.latency.counts[LATENCY_BUCKETS.index(5e-3)] == 2
    assert abs(a.latency.total - 7.2034) < 1e-9
    assert a.queue is not None
    assert a.queue.count == 1
    refused = got[("ep", "")]
    assert (refused.requests, refused.client_errors) == (4, 4)
    assert refused.latency is not None
    assert refused.latency.count == 0


def test_the_export_text_parses_with_databricks_names_and_types():
    metrics = Metrics()
    metrics.requests.labels("ep", "a", "200").inc(3)
    metrics.requests.labels("ep", "a", "400").inc(1)
    for value in (0.001, 0.02, 0.3, 0.3):
        metrics.latency.labels("ep", "a").observe(value)
        metrics.queue_wait.labels("ep", "a").observe(value / 10)
    requests = {"a": metrics.totals()[("ep", "a")], "b": no_requests()}
    samples = [Sample(t=1.0, in_flight=0, ready=2, concurrency=4, cpu=0.5, memory=0.25)]
    text = render_endpoint_metrics("ep", [("a", samples), ("b", [])], requests).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("request_count_total", "request_4xx_count_total", "request_5xx_count_total",
                 "provisioned_concurrent_requests_total", "cpu_usage_percentage", "mem_usage_percentage"):
        assert families[name].type == "gauge", name
    for name in ("request_latency_ms", "model_queue_time_ms"):
        assert families[name].type == "histogram", name

    def value(family: str, sample: str, **labels: str) -> float:
        (found,) = [s.value for s in families[family].samples
                    if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())]
        return found

    a = {"endpoint_name": "ep", "served_entity_name": "a"}
    assert value("request_count_total", "request_count_total", **a) == 4
    assert value("request_4xx_count_total", "request_4xx_count_total", **a) == 1
    assert value("request_5xx_count_total", "request_5xx_count_total", **a) == 0
    assert value("request_latency_ms", "request_latency_ms_count", **a) == 4
    assert value("request_latency_ms", "request_latency_ms_bucket", le="25.0", **a) == 2
    assert value("request_latency_ms", "request_latency_ms_bucket", le="+Inf", **a) == 4
    assert abs(value("request_latency_ms", "request_latency_ms_sum", **a) - 621.0) < 1e-6
    assert value("model_queue_time_ms", "model_queue_time_ms_bucket", le="2.5", **a) == 2
    assert value("request_count_total", "request_count_total", served_entity_name="b") == 0
    assert value("request_latency_ms", "request_latency_ms_count", served_entity_name="b") == 0
    assert value("provisioned_concurrent_requests_total", "provisioned_concurrent_requests_total", **a) == 8
    assert value("cpu_usage_percentage", "cpu_usage_percentage", **a) == 50


def test_quantile_interpolates_within_the_bucket_like_histogram_quantile():
    from berth.observability.series import quantile

    histo = Histo((0.01, 0.1, float("inf")), (10, 20, 20))
    assert quantile(histo, 0.25) == 0.005  # 5 of the first 10, spread over [0, 10 ms]
    assert abs(quantile(histo, 0.75) - 0.055) < 1e-12  # halfway through the second bucket
    assert quantile(Histo((0.01, float("inf")), (0, 4)), 0.5) == 0.01  # in +Inf: its lower bound
    assert quantile(Histo((0.01, float("inf")), (0, 0)), 0.5) is None


def test_request_series_gives_each_second_of_an_endpoint_summed_over_its_entities():
    from berth.observability.series import request_series

    def snap(a: int, b: int, errors: int, fast: int) -> dict:  # type: ignore[type-arg]
        # `fast` of entity a's requests took under 10 ms, the rest under 100 ms
        return {("ep", "a"): Totals(a, errors, 0, Histo(BOUNDS, (fast, a, a))),
                ("ep", "b"): Totals(b, 0, 0, Histo(BOUNDS, (0, 0, b))),
                ("other", "x"): Totals(1000, 0, 0, Histo(BOUNDS, (1000, 1000, 1000)))}

    series = request_series([(100.0, snap(0, 0, 0, 0)), (101.0, snap(10, 0, 2, 10)),
                             (103.0, snap(30, 10, 2, 10))], "ep")
    assert series["t"] == [101.0, 103.0]
    assert series["qps"] == [10.0, 15.0]
    assert series["errors_per_s"] == [2.0, 0.0]
    assert series["p50_ms"][0] == 5.0
    assert series["p99_ms"][1] == 100.0  # entity b's requests are all in +Inf (bound 100 ms)


def test_a_gone_entity_reads_zero_in_the_platform_metrics():
    metrics = Metrics()
    metrics.set_replicas("ep", "a", desired=2, ready=2, starting=0, concurrency=4)
    metrics.in_flight.labels("ep", "a").set(3)
    metrics.replica_memory.labels("ep", "a").set(2**30)
    metrics.zero_entity("ep", "a")
    text = metrics.render().decode()
    values = {(s.name, s.labels.get("state")): s.value for f in text_string_to_metric_families(text)
              for s in f.samples if s.labels.get("entity") == "a"}
    assert values[("berth_in_flight_requests", None)] == 0
    assert values[("berth_replica_memory_bytes", None)] == 0
    assert values[("berth_replicas", "ready")] == 0
    assert values[("berth_provisioned_concurrency", None)] == 0

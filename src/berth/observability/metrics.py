"""Prometheus metrics of the platform, in a registry of its own (served at `/metrics`).

With several gateway processes on a host, every process writes its samples to memory-mapped files in
one directory (prometheus-client's multiprocess mode) and any process's `/metrics` renders the sum
over all of them: one scrape sees the whole gateway.
"""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess, values
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

from berth.observability.export import Histo, Totals

# From 25 µs to 0.1 s: the gateway's own share of a request is measured in fractions of a ms.
GATEWAY_BUCKETS = (
    25e-6, 50e-6, 75e-6, 100e-6, 150e-6, 200e-6, 300e-6, 500e-6, 750e-6,
    1e-3, 2e-3, 5e-3, 10e-3, 25e-3, 100e-3,
)
LATENCY_BUCKETS = (
    0.5e-3, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)

START_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """The gateway's request metrics; `shared_dir` makes them one view over the host's gateway processes."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, shared_dir: Path | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        own: CollectorRegistry | None = self.registry
        if shared_dir is not None:
            # The value class is chosen per metric at creation: these (and only these) go to the files.
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(shared_dir)
            values.ValueClass = values.MultiProcessValue()
            multiprocess.MultiProcessCollector(self.registry, path=str(shared_dir))
            own = None  # rendered from the files, never twice
        self.requests = Counter(
            "berth_requests",
            "Invocations answered, by endpoint, served entity and HTTP status.",
            ["endpoint", "entity", "status"],
            registry=own,
        )
        self.latency = Histogram(
            "berth_request_latency_seconds",
            "Invocation latency inside the gateway, from the request's last byte read to the response written, "
            "by endpoint and served entity (\"\": refused before one was chosen).",
            ["endpoint", "entity"],
            buckets=LATENCY_BUCKETS,
            registry=own,
        )
        self.queue_wait = Histogram(
            "berth_queue_wait_seconds",
            "Time an invocation waited in front of the replicas (held for a ready one, or in the admission "
            "queue) before the gateway sent it on, by endpoint and served entity.",
            ["endpoint", "entity"],
            buckets=LATENCY_BUCKETS,
            registry=own,
        )
        self.gateway_added = Histogram(
            "berth_gateway_added_latency_seconds",
            "Time the gateway adds to a request: from reading its last byte to forwarding its first, plus "
            "from reading the replica response's last byte to writing the response.",
            buckets=GATEWAY_BUCKETS,
            registry=own,
        )

        self.held = Histogram(
            "berth_held_request_wait_seconds",
            "How long invocations waited for a ready replica (an entity starting, restarting or at zero), "
            "by endpoint and served entity.",
            ["endpoint", "entity"],
            buckets=LATENCY_BUCKETS,
            registry=own,
        )
        self.rate_limited = Counter(
            "berth_rate_limited",
            "Invocations refused 429 REQUEST_LIMIT_EXCEEDED by an endpoint's rate limits.",
            ["endpoint"],
            registry=own,
        )
        self.admission_refused = Counter(
            "berth_admission_refused",
            "Invocations refused 429 RESOURCE_EXHAUSTED: the served entity's provisioned concurrency was in "
            "use and its queue full.",
            ["endpoint", "entity"],
            registry=own,
        )
        self.inference_written = Counter(
            "berth_inference_rows_written",
            "Rows written to endpoints' inference tables (one per request logged).",
            ["endpoint"], registry=own)
        self.inference_dropped = Counter(
            "berth_inference_rows_dropped",
            "Inference-table rows dropped: the writer's buffer was full (the table's store slow or down). "
            "The requests themselves were answered.",
            ["endpoint"], registry=own)
        self.limiter_errors = Counter(
            "berth_rate_limiter_errors",
            "Rate-limit checks that failed (the shared store unreachable); those requests were admitted unchecked.",
            registry=own,
        )

        # Set by the main process's autoscaling loop only ("max" over processes is its value).
        self.replicas = Gauge(
            "berth_replicas",
            "Replicas of a served entity by state: desired (what the autoscaler asks for), starting, ready.",
            ["endpoint", "entity", "state"],
            registry=own,
            multiprocess_mode="max",
        )
        self.replica_concurrency = Gauge(
            "berth_replica_concurrency",
            "Requests each replica of a served entity admits at once (the autoscaler's vertical axis).",
            ["endpoint", "entity"],
            registry=own,
            multiprocess_mode="max",
        )
        self.provisioned = Gauge(
            "berth_provisioned_concurrency",
            "Provisioned concurrency of a served entity: ready replicas × per-replica concurrency.",
            ["endpoint", "entity"],
            registry=own,
            multiprocess_mode="max",
        )

        # Read from the replicas by the main process's autoscaling loop, once a sampling period.
        def level(name: str, doc: str) -> Gauge:  # a level the main process sets ("max": its value)
            return Gauge(name, doc, ["endpoint", "entity"], registry=own, multiprocess_mode="max")

        def count(name: str, doc: str) -> Counter:
            return Counter(name, doc, ["endpoint", "entity"], registry=own)

        self.in_flight = level("berth_in_flight_requests",
                               "Requests the served entity's replicas hold (being scored, or waiting for the model).")
        self.queued = level("berth_queued_requests",
                            "Requests waiting for the model: in front of the replicas (gateway) and in their own "
                            "queues.")
        self.replica_cpu = level("berth_replica_cpu_ratio",
                                 "Mean CPU use of the ready replicas over the last sampling period (1.0: one core "
                                 "each).")
        self.replica_memory = level("berth_replica_memory_bytes",
                                    "Largest resident memory among the served entity's ready replicas.")
        self.model_calls = count("berth_model_calls",
                                 "Model calls (predict) made by the served entity's replicas; one call may score "
                                 "a batch.")
        self.model_call_seconds = count("berth_model_call_seconds",
                                        "Seconds the replicas spent in model calls (÷ berth_model_calls_total: mean "
                                        "execution time).")
        self.model_call_requests = count("berth_model_call_requests",
                                         "Requests scored by model calls (÷ berth_model_calls_total: mean batch "
                                         "size).")
        self.replica_start = Histogram(
            "berth_replica_start_seconds",
            "Replica starts (cold starts included) and how long each took to become ready: from the start "
            "asked of the backend to the first successful readiness check.",
            ["endpoint", "entity"], buckets=START_BUCKETS, registry=own)

    def set_replicas(self, endpoint: str, entity: str, *, desired: int, ready: int, starting: int,
                     concurrency: int) -> None:
        for state, value in (("desired", desired), ("ready", ready), ("starting", starting)):
            self.replicas.labels(endpoint, entity, state).set(value)
        self.replica_concurrency.labels(endpoint, entity).set(concurrency)
        self.provisioned.labels(endpoint, entity).set(ready * concurrency)

    def zero_entity(self, endpoint: str, entity: str) -> None:
        """A served entity that is gone: its levels read 0 (in multiprocess mode a series cannot be removed)."""
        self.set_replicas(endpoint, entity, desired=0, ready=0, starting=0, concurrency=0)
        for gauge in (self.in_flight, self.queued, self.replica_cpu, self.replica_memory):
            gauge.labels(endpoint, entity).set(0)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def totals(self) -> dict[tuple[str, str], Totals]:
        """Each (endpoint, served entity)'s cumulative request series, summed over the host's gateway
        processes: what the per-endpoint export subtracts a minute-old copy of."""
        counts: dict[tuple[str, str], list[float]] = {}
        histos: dict[tuple[str, str, str], dict[str, float]] = {}
        for family in self.registry.collect():
            if family.name == "berth_requests":
                for s in family.samples:
                    if s.name.endswith("_total"):
                        row = counts.setdefault((s.labels["endpoint"], s.labels["entity"]), [0.0, 0.0, 0.0])
                        row[0] += s.value
                        status = s.labels["status"]
                        if status.startswith("4"):
                            row[1] += s.value
                        elif status.startswith("5"):
                            row[2] += s.value
            elif family.name in _HISTOGRAMS:
                for s in family.samples:
                    key = (family.name, s.labels["endpoint"], s.labels["entity"])
                    if s.name.endswith("_bucket"):
                        histos.setdefault(key, {})[s.labels["le"]] = s.value
                    elif s.name.endswith("_sum"):
                        histos.setdefault(key, {})["sum"] = s.value
        out: dict[tuple[str, str], Totals] = {}
        for key in {*counts, *((e, n) for _, e, n in histos)}:
            requests, client, server = counts.get(key, (0.0, 0.0, 0.0))
            latency, queue = (_histo(histos.get((name, *key))) for name in _HISTOGRAMS)
            out[key] = Totals(requests, client, server, latency, queue)
        return out


_HISTOGRAMS = ("berth_request_latency_seconds", "berth_queue_wait_seconds")
_BOUNDS = (*LATENCY_BUCKETS, float("inf"))


def no_requests() -> Totals:
    """The totals of a served entity that has answered nothing yet (histograms at zero)."""
    return Totals(latency=_histo(None), queue=_histo(None))


def _histo(values: dict[str, float] | None) -> Histo:
    """A `Histo` from one labelled histogram's `le` → cumulative count and its "sum" (zeros if absent)."""
    if not values:
        return Histo(_BOUNDS, (0.0,) * len(_BOUNDS))
    counts = tuple(values.get(floatToGoString(b), 0.0) for b in _BOUNDS)
    return Histo(_BOUNDS, counts, values.get("sum", 0.0))

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

# From 25 µs to 0.1 s: the gateway's own share of a request is measured in fractions of a ms.
GATEWAY_BUCKETS = (
    25e-6, 50e-6, 75e-6, 100e-6, 150e-6, 200e-6, 300e-6, 500e-6, 750e-6,
    1e-3, 2e-3, 5e-3, 10e-3, 25e-3, 100e-3,
)
LATENCY_BUCKETS = (
    0.5e-3, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)


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
            "Invocation latency inside the gateway, from the request's last byte read to the response written.",
            ["endpoint"],
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

    def set_replicas(self, endpoint: str, entity: str, *, desired: int, ready: int, starting: int,
                     concurrency: int) -> None:
        for state, value in (("desired", desired), ("ready", ready), ("starting", starting)):
            self.replicas.labels(endpoint, entity, state).set(value)
        self.replica_concurrency.labels(endpoint, entity).set(concurrency)
        self.provisioned.labels(endpoint, entity).set(ready * concurrency)

    def render(self) -> bytes:
        return generate_latest(self.registry)

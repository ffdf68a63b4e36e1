"""Prometheus metrics of the platform, in a registry of its own (served at `/metrics`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
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
    """The gateway's request metrics."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "berth_requests",
            "Invocations answered, by endpoint, served entity and HTTP status.",
            ["endpoint", "entity", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "berth_request_latency_seconds",
            "Invocation latency inside the gateway, from the request's last byte read to the response written.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.gateway_added = Histogram(
            "berth_gateway_added_latency_seconds",
            "Time the gateway adds to a request: from reading its last byte to forwarding its first, plus "
            "from reading the replica response's last byte to writing the response.",
            buckets=GATEWAY_BUCKETS,
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""The per-endpoint metrics export, `GET /api/2.0/serving-endpoints/{name}/metrics`, under Databricks' names.

Databricks' values describe the last minute: the `*_total` series are gauges over the trailing 60 s,
not cumulative counters. This module renders what the autoscaling loop sampled over that window:
provisioned concurrency (ready replicas × per-replica concurrency), and the replicas' CPU and memory
use. (Request counts and latency histograms join them with the observability work.)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from berth.autoscaler import Sample

LABELS = ["endpoint_name", "served_entity_name"]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


class _Window:
    def __init__(self, endpoint: str, entities: Iterable[tuple[str, Sequence[Sample]]]) -> None:
        self.endpoint = endpoint
        self.entities = list(entities)

    def collect(self) -> Iterator[Metric]:
        provisioned = GaugeMetricFamily("provisioned_concurrent_requests_total",
                                        "Provisioned concurrency over the last minute (mean of 1 s samples).",
                                        labels=LABELS)
        cpu = GaugeMetricFamily("cpu_usage_percentage", "Mean CPU use of the replicas over the last minute.",
                                labels=LABELS)
        memory = GaugeMetricFamily("mem_usage_percentage",
                                   "Mean resident memory of the replicas over the last minute, % of the limit.",
                                   labels=LABELS)
        for name, samples in self.entities:
            labels = [self.endpoint, name]
            provisioned.add_metric(labels, _mean([s.ready * s.concurrency for s in samples]))
            cpu.add_metric(labels, 100 * _mean([s.cpu for s in samples if s.cpu is not None]))
            memory.add_metric(labels, 100 * _mean([s.memory for s in samples if s.memory is not None]))
        yield from (provisioned, cpu, memory)


def render_endpoint_metrics(endpoint: str, entities: Iterable[tuple[str, Sequence[Sample]]]) -> bytes:
    """Prometheus text for one endpoint from each served entity's samples of the last minute."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Window(endpoint, entities))  # type: ignore[arg-type]
    return generate_latest(registry)

"""Per-second series for the dashboard, from the gateway's cumulative request series. Pure.

`RequestWindow` keeps a snapshot of every (endpoint, entity)'s `Totals` each second; two
consecutive snapshots differ by that second's requests, errors and latency histogram, which give
the second's QPS, error rate and latency percentiles (interpolated within a bucket, as Prometheus'
`histogram_quantile` does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from berth.observability.export import Histo, Key, Totals


def quantile(histo: Histo, q: float) -> float | None:
    """The `q` quantile (0–1) of a cumulative histogram, in its unit; None when it counted nothing.
    Linear within the bucket that holds it; the +Inf bucket answers its lower bound."""
    total = histo.count
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in zip(histo.bounds, histo.counts, strict=True):
        if count >= rank:
            if bound == float("inf"):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return lower


def _endpoint_totals(snapshot: Mapping[Key, Totals], endpoint: str) -> Totals:
    """One endpoint's totals, summed over its served entities."""
    requests = client = server = 0.0
    latency: Histo | None = None
    for (name, _), totals in snapshot.items():
        if name != endpoint:
            continue
        requests += totals.requests
        client += totals.client_errors
        server += totals.server_errors
        if totals.latency is not None:
            latency = totals.latency if latency is None else latency.plus(totals.latency)
    return Totals(requests, client, server, latency)


def request_series(history: Sequence[tuple[float, Mapping[Key, Totals]]], endpoint: str) -> dict[str, list[Any]]:
    """`t` (epoch s, the end of each interval), `qps`, `errors_per_s` (4xx + 5xx), `p50_ms`, `p99_ms`
    (None for an interval without requests) of one endpoint."""
    out: dict[str, list[Any]] = {"t": [], "qps": [], "errors_per_s": [], "p50_ms": [], "p99_ms": []}
    previous: tuple[float, Totals] | None = None
    for t, snapshot in history:
        totals = _endpoint_totals(snapshot, endpoint)
        if previous is not None and t > previous[0]:
            span = t - previous[0]
            delta = totals.minus(previous[1])
            out["t"].append(round(t, 3))
            out["qps"].append(round(delta.requests / span, 3))
            out["errors_per_s"].append(round((delta.client_errors + delta.server_errors) / span, 3))
            for q, name in ((0.5, "p50_ms"), (0.99, "p99_ms")):
                value = quantile(delta.latency, q) if delta.latency is not None else None
                out[name].append(None if value is None else round(value * 1e3, 3))
        previous = (t, totals)
    return out

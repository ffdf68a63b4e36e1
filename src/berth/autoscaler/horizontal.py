"""The horizontal axis: how many replicas, from concurrent demand.

Demand counts what admission hides: requests the replicas hold, those waiting in front of them,
and capacity refusals turned into concurrency (429s per second × latency). The target is a
utilisation fraction of each replica's concurrency, so replicas are added before the cap is hit.
Scale-up looks at the last `up_window` (or the last cycle, if higher) and may at most double what
the latest demand needs (or add `up_limit_min` replicas). Between cycles, a surge (the latest sample
needing `surge_ratio` × the replicas, Knative's panic threshold) scales up at once rather than up to
a cycle later. Scale-down keeps capacity for the highest load of the last `down_window`, each cycle's
weighted down linearly with its age, so a dip does not shed capacity and a peak's is shed across the
window. It counts load without the backlog: a queue that formed while capacity caught up is gone
once it has.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from berth.autoscaler.settings import AutoscalerSettings
from berth.autoscaler.signals import Sample, mean, since


def per_replica_target(concurrency: int, settings: AutoscalerSettings) -> float:
    """Demand one replica should carry: a fraction of its concurrency cap."""
    return max(1e-9, settings.target_utilisation * max(1, concurrency))


def replicas_for(demand: float, concurrency: int, settings: AutoscalerSettings) -> int:
    """The HPA formula against the per-replica target: ceil(demand ÷ target)."""
    if demand <= 0:
        return 0
    return math.ceil(demand / per_replica_target(concurrency, settings) - 1e-9)


def recent(samples: Sequence[Sample], now: float, settings: AutoscalerSettings,
           value: Callable[[Sample], float]) -> float:
    """Mean of `value` over the up window, or over the last up period when that is higher: a step is
    acted on at the next cycle, not a whole window later."""
    return max(mean([value(x) for x in since(samples, now - window)])
               for window in (settings.up_window_s, settings.up_period_s))


def scale_up(current: int, demand: float, latest: float, concurrency: int, settings: AutoscalerSettings) -> int:
    """Replicas after one scale-up cycle: the recommendation, capped relative to the current load.

    `demand` is the window mean, `latest` the last sample's demand. Within the tolerance band of the
    current provisioning nothing changes.
    """
    wanted = replicas_for(demand, concurrency, settings)
    if wanted <= current:
        return current
    if current > 0:
        ratio = demand / (current * per_replica_target(concurrency, settings))
        if ratio <= 1 + settings.tolerance:
            return current
    limit = max(math.ceil(settings.up_limit_factor * replicas_for(latest, concurrency, settings)),
                current + settings.up_limit_min)
    return min(wanted, limit)


def surge(current: int, latest: float, concurrency: int, settings: AutoscalerSettings) -> int:
    """Replicas after a check between cycles: unchanged unless the latest sample's demand needs at
    least `surge_ratio` × the current replicas and `up_limit_min` more; then one scale-up cycle now."""
    if current <= 0:
        return current
    need = replicas_for(latest, concurrency, settings)
    if need < max(settings.surge_ratio * current, current + settings.up_limit_min):
        return current
    return scale_up(current, latest, latest, concurrency, settings)


def stabilised_load(history: Sequence[tuple[float, float]], now: float, window_s: float) -> float:
    """The load scale-down keeps capacity for: the highest of the window's cycle loads, each weighted
    down linearly with its age (1 now, 0 at `window_s`), so capacity for a peak is shed over the window
    rather than all at its end."""
    return max((load * max(0.0, 1 - (now - t) / window_s) for t, load in history), default=0.0)


def scale_down(current: int, recommendations: Sequence[int]) -> int:
    """Replicas after one scale-down cycle: the highest recommendation of the stabilisation window."""
    if not recommendations:
        return current
    return min(current, max(recommendations))

"""The vertical axis: how many requests each replica admits, from what the model shows.

Every `vertical_period` the replicas' signals over that period are compared with stable
thresholds: latency relative to the model's uncontended latency, memory, CPU, and whether the
replicas use the concurrency they have. Stressed (latency or memory over the stress threshold)
cuts the per-replica concurrency at once by `down_step`; relaxed (latency and CPU well under their
thresholds, concurrency in use) for `stable_cycles` periods in a row raises it by `up_step`. Between
the two bands nothing moves, so a signal sitting at a threshold does not make it oscillate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from berth.autoscaler.settings import AutoscalerSettings
from berth.autoscaler.signals import Bounds, Sample, mean


@dataclass(frozen=True, slots=True)
class VerticalSignals:
    """One vertical period of one served entity."""

    latency_s: float | None  # mean replica latency of completed requests
    uncontended_s: float | None  # the model's latency with little concurrency (learned)
    cpu: float | None
    memory: float | None
    utilisation: float  # mean in-flight per replica ÷ per-replica concurrency
    queued: float  # mean requests waiting in front of the replicas
    in_flight: float  # mean requests the replicas hold
    rejected: int
    completed: int = 0  # requests answered in the period (evidence behind `latency_s`)
    per_replica: float = 0.0  # mean requests each replica held

    @property
    def cpu_per_slot(self) -> float | None:
        """CPU the replicas would use with every slot busy: near 1 for a CPU-bound model, ≪ 1 for one that waits."""
        if self.cpu is None or self.utilisation <= 0:
            return None
        return self.cpu / self.utilisation

    @property
    def latency_ratio(self) -> float | None:
        if self.latency_s is None or not self.uncontended_s:
            return None
        return self.latency_s / self.uncontended_s


def signals(samples: Sequence[Sample], uncontended_s: float | None) -> VerticalSignals:
    """Summarise one period's samples (those with ready replicas)."""
    live = [s for s in samples if s.ready > 0]
    done = [s for s in live if s.completed > 0 and s.latency_s is not None]
    total = sum(s.completed for s in done)
    latency = sum(s.latency_s * s.completed for s in done) / total if total else None  # type: ignore[operator]
    cpus = [s.cpu for s in live if s.cpu is not None]
    mems = [s.memory for s in live if s.memory is not None]
    return VerticalSignals(
        latency_s=latency,
        uncontended_s=uncontended_s,
        cpu=mean(cpus) if cpus else None,
        memory=max(mems) if mems else None,
        utilisation=mean([s.in_flight / (s.ready * max(1, s.concurrency)) for s in live]),
        queued=mean([s.queued for s in live]),
        in_flight=mean([s.in_flight for s in live]),
        rejected=sum(s.rejected for s in live),
        completed=total,
        per_replica=mean([s.in_flight / s.ready for s in live]),
    )


def classify(sig: VerticalSignals, settings: AutoscalerSettings) -> str:
    """'stressed', 'relaxed' or 'steady' for one period.

    Stressed: memory near the limit, or contention that shows in the service latency (requests in a
    replica slow each other down: at least `contention_level` in flight per replica and the latency
    ≥ `stress_latency_ratio` × uncontended, or ≥ `relaxed_latency_ratio` × with the CPU saturated).
    Relaxed: latency near uncontended, the concurrency in use, and a model that waits rather than
    computes (CPU per busy slot well under one). Too little evidence is steady.
    """
    if sig.memory is not None and sig.memory >= settings.stress_memory:
        return "stressed"
    ratio = sig.latency_ratio
    if ratio is None or sig.completed < settings.min_completions:
        return "steady"
    if sig.per_replica >= settings.contention_level:
        if ratio >= settings.stress_latency_ratio:
            return "stressed"
        if sig.cpu is not None and sig.cpu >= settings.stress_cpu and ratio >= settings.relaxed_latency_ratio:
            return "stressed"
    if ratio > settings.relaxed_latency_ratio or sig.utilisation < 0.5 * settings.target_utilisation:
        return "steady"  # slower than uncontended, or the replicas do not use what they have
    per_slot = sig.cpu_per_slot
    if per_slot is not None and per_slot > settings.relaxed_cpu:
        return "steady"  # CPU-bound: more concurrency would only queue on the cores
    return "relaxed"


def next_concurrency(current: int, verdict: str, streak: int, floor: int, ceiling: int,
                     settings: AutoscalerSettings) -> int:
    """Per-replica concurrency after a period with `verdict`, seen `streak` periods in a row.

    A cut never goes below `floor`; a raise never above `ceiling` (and never lowers it); steady keeps it.
    """
    floor = max(floor, settings.min_concurrency)
    if verdict == "stressed":
        return max(floor, min(current - 1, math.floor(current * (1 - settings.down_step))))
    if verdict == "relaxed" and streak >= settings.stable_cycles:
        ceiling = min(ceiling, settings.max_concurrency)
        return max(current, min(ceiling, max(current + 1, math.floor(current * (1 + settings.up_step)))))
    return current


def concurrency_range(bounds: Bounds, replicas: int) -> tuple[int, int]:
    """(floor, ceiling) of per-replica concurrency: the minimum must stay reachable within the replica
    cap, and a raise must not put more in flight than the maximum on the replicas there are."""
    floor = math.ceil(bounds.min_concurrency / bounds.max_replicas) if bounds.max_replicas > 0 else 1
    ceiling = max(1, bounds.max_concurrency // max(1, replicas))
    return max(1, floor), ceiling


def uncontended(previous: float | None, samples: Sequence[Sample], settings: AutoscalerSettings) -> float | None:
    """Update the estimate of the model's uncontended latency from one period's samples.

    Samples where the replicas held at most one request each measure it directly: their
    completion-weighted mean enters an exponentially weighted mean. A busy entity rarely has such
    samples (the autoscaler keeps replicas near their target), so otherwise the period's mean latency
    stands in when it is lower than the estimate (contention only adds), and the estimate drifts up
    slowly (`uncontended_drift` a period) so that a model that got slower for good re-bases. Means
    over at least `min_completions` requests, never minima of noisy samples.
    """
    direct = [s for s in samples if s.latency_s is not None and s.completed and s.ready and s.in_flight <= s.ready]
    count = sum(s.completed for s in direct)
    if count >= settings.min_completions:
        value = sum(s.latency_s * s.completed for s in direct) / count  # type: ignore[operator]
        if previous is None:
            return value
        return (1 - settings.uncontended_weight) * previous + settings.uncontended_weight * value
    done = [s for s in samples if s.latency_s is not None and s.completed]
    count = sum(s.completed for s in done)
    if count < settings.min_completions:
        return previous
    period = sum(s.latency_s * s.completed for s in done) / count  # type: ignore[operator]
    if previous is None:
        return period
    return min(period, previous * (1 + settings.uncontended_drift))

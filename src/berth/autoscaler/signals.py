"""What an autoscaling policy sees and what it answers.

A caller (the live reconciler, or the simulator) samples each served entity once per sampling
period into a `Sample`, keeps a window of recent samples, and every `policy.period_s` calls
`policy.decide(now, samples, state, bounds)`. Policies are deterministic and do no I/O: the same
samples give the same decisions, which is what lets the simulator and the live platform share
them and lets unit tests pin them to hand-computed cases.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Sample:
    """One served entity over one sampling period (1 s unless time-scaled), ending at `t`.

    Counts are for the period; levels are the value at `t` (or the period's mean where the
    caller has it). `in_flight` counts requests a replica holds (executing or in its own queue);
    `queued` counts requests waiting in front of the replicas (held at the gateway or in its
    admission queue); `rejected` counts capacity refusals (429), not validation errors.
    """

    t: float
    in_flight: float
    queued: float = 0.0
    rejected: int = 0
    arrived: int = 0
    completed: int = 0
    latency_s: float | None = None  # mean time in the replica of the requests completed in the period
    ready: int = 0
    starting: int = 0
    concurrency: int = 1  # per-replica concurrency in force
    cpu: float | None = None  # the ready replicas' mean CPU use, as a fraction of the cores they may use
    memory: float | None = None  # their mean resident memory, as a fraction of the memory limit

    @property
    def demand(self) -> float:
        """Concurrent demand: held by replicas + waiting in front + refused (as concurrency, by Little's law)."""
        latency = self.latency_s or 0.0
        return self.in_flight + self.queued + self.rejected * latency

    @property
    def load(self) -> float:
        """Demand without the backlog: what is being served plus what was refused. A queue that
        forms while capacity catches up drains once it has; scaling down must not keep capacity for it."""
        return self.in_flight + self.rejected * (self.latency_s or 0.0)


@dataclass(frozen=True, slots=True)
class Bounds:
    """Provisioned-concurrency range of a served entity (replicas × per-replica concurrency).

    `max_replicas` (0: none) caps the replica count on its own, e.g. one replica per core for a
    CPU-bound model on one host.
    """

    min_concurrency: int
    max_concurrency: int
    scale_to_zero: bool = False
    max_replicas: int = 0

    def replica_range(self, per_replica: int) -> tuple[int, int]:
        """(min, max) replicas at this per-replica concurrency (enough to reach the maximum, as the
        plan does), and at least one replica unless scale to zero is on."""
        per_replica = max(1, per_replica)
        high = max(1, math.ceil(self.max_concurrency / per_replica))
        if self.max_replicas > 0:
            high = min(high, self.max_replicas)
        low = min(high, math.ceil(self.min_concurrency / per_replica))
        if not self.scale_to_zero:
            low = max(1, low)
        return low, high


@dataclass(frozen=True, slots=True)
class ScaleState:
    """What is in force now: replicas asked for (ready or starting) and per-replica concurrency."""

    desired: int
    concurrency: int


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision with its inputs and reason (the decision log keeps these)."""

    t: float
    policy: str
    desired: int
    concurrency: int
    previous: int
    previous_concurrency: int
    reason: str
    axis: str = "horizontal"  # horizontal | vertical | zero | none
    cycle: int = 0  # the policy's decision count (the live test reads cycles, not wall time)
    inputs: Mapping[str, float] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return self.desired != self.previous or self.concurrency != self.previous_concurrency


class Policy(Protocol):
    """An autoscaling policy: called every `period_s` with the samples so far (oldest first).

    A policy may also define `surge(now, samples, state, bounds) -> Decision | None`, which callers
    invoke at every sample between `decide` calls; None means no decision (nothing is recorded).
    """

    name: str
    period_s: float

    def decide(self, now: float, samples: Sequence[Sample], state: ScaleState, bounds: Bounds) -> Decision: ...


def since(samples: Sequence[Sample], t0: float) -> Sequence[Sample]:
    """The samples with `t > t0` (samples are in time order; scans from the newest)."""
    i = len(samples)
    while i > 0 and samples[i - 1].t > t0:
        i -= 1
    if isinstance(samples, list | tuple):
        return samples[i:]
    return list(itertools.islice(samples, i, None))  # a deque: no slicing


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0

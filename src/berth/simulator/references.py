"""Reference points, not baselines: fixed provisioning at the peak, and a clairvoyant oracle.

Both implement the `Policy` protocol and are called like any policy (period 1 s, metric lag 0).

- `Fixed(replicas, concurrency)`: a constant answer (the tests use it to pin the engine).
- `FixedPeak(trace)`: the replicas the trace's highest one-second arrival count needs at the initial
  per-replica concurrency and the 0.7 target, under the most expensive model profile of the trace, for the
  whole run. It is what "provision for the peak" costs.
- `Oracle(trace)`: knows every future arrival (the trace's per-second counts) and the model-profile schedule.
  At time t it asks for the most replicas any second in [t, t + lead] needs, so a replica it starts is ready
  when its load arrives; lead is the cold start's 95th percentile (it cannot know whether the warm pool will
  turn a start into an attach), plus one second. The need of a second is Little's law at the 0.7 target:
  ceil(count × mean service at the operating level (slowdown included, under the profile in force) ÷
  (0.7 × concurrency)). By default it keeps the trace's initial per-replica concurrency, the one every
  baseline uses: it is then the cost of perfect-foresight horizontal scaling, and each policy's
  replica-seconds are reported as a gap to it (a policy that tunes concurrency well can beat it: a
  negative gap). `concurrency="best"` lets it pick, per profile, the largest concurrency whose slowdown at
  the cap is ≤ 2 (`ReplicaModel.best_concurrency`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from berth.autoscaler.signals import Bounds, Decision, Sample, ScaleState
from berth.simulator.traces import TARGET, Trace


def _decision(name: str, now: float, desired: int, concurrency: int, state: ScaleState, reason: str,
              cycle: int) -> Decision:
    return Decision(t=now, policy=name, desired=desired, concurrency=concurrency, previous=state.desired,
                    previous_concurrency=state.concurrency, reason=reason,
                    axis="horizontal" if desired != state.desired else "none", cycle=cycle)


class Fixed:
    """Always the same replica count (and, if given, per-replica concurrency)."""

    def __init__(self, replicas: int, concurrency: int | None = None, *, name: str = "fixed",
                 period_s: float = 1.0) -> None:
        self.name = name
        self.period_s = period_s
        self.replicas = replicas
        self.concurrency = concurrency
        self.cycle = 0

    def decide(self, now: float, samples: Sequence[Sample], state: ScaleState, bounds: Bounds) -> Decision:
        self.cycle += 1
        conc = self.concurrency or state.concurrency
        return _decision(self.name, now, self.replicas, conc, state, f"fixed at {self.replicas}", self.cycle)


class FixedPeak(Fixed):
    """Fixed provisioning for the trace's peak demand."""

    def __init__(self, trace: Trace, *, target: float = TARGET, name: str = "fixed-peak") -> None:
        peak = float(trace.per_second.max(initial=0))
        models = [trace.model] + [trace.model_at(c.t) for c in trace.profile]
        replicas = max(m.needed_replicas(peak, trace.model.concurrency, target, trace.cost.mean) for m in models)
        super().__init__(max(1, replicas), trace.model.concurrency, name=name)
        self.peak_rate = peak


class Oracle:
    """Clairvoyant provisioning (see the module docstring)."""

    def __init__(self, trace: Trace, *, target: float = TARGET, lead_s: float | None = None,
                 concurrency: str = "initial", name: str = "oracle") -> None:
        if concurrency not in ("initial", "best"):
            raise ValueError("concurrency is 'initial' or 'best'")
        self.name = name
        self.period_s = 1.0
        self.cycle = 0
        self.lead_s = lead_s if lead_s is not None else trace.model.cold_start_p95() + 1.0
        counts = trace.per_second.astype(float)
        n = counts.size
        self.conc = np.empty(n, dtype=np.int64)
        need = np.zeros(n, dtype=np.int64)
        cache: dict[tuple[int, float], float] = {}
        for s in range(n):
            model = trace.model_at(s)
            conc = model.best_concurrency() if concurrency == "best" else trace.model.concurrency
            self.conc[s] = conc
            key = (conc, model.knee + 1000 * model.cost_factor)
            per_request = cache.get(key)
            if per_request is None:
                level = target * conc
                per_request = cache[key] = model.mean_service_s(level, trace.cost.mean) / level
            if counts[s] > 0:
                need[s] = max(1, math.ceil(counts[s] * per_request - 1e-9))
        self.need = need
        self.n = n

    def decide(self, now: float, samples: Sequence[Sample], state: ScaleState, bounds: Bounds) -> Decision:
        self.cycle += 1
        s0 = min(self.n - 1, max(0, math.floor(now)))
        s1 = min(self.n, math.ceil(now + self.lead_s) + 1)
        desired = int(self.need[s0:s1].max(initial=0))
        conc = int(self.conc[s0])
        return _decision(self.name, now, desired, conc, state, f"the next {self.lead_s:.0f} s need {desired}",
                         self.cycle)

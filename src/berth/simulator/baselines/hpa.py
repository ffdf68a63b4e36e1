"""Kubernetes HPA (autoscaling/v2) on a Pods metric, with the upstream defaults (reference §a.1).

Every `sync_period_s` (15 s) the controller (`horizontal.go reconcileAutoscaler`):
1. turns the latest scrape into a proposal (`replica_calculator.go calcPlainMetricReplicas`): the mean
   metric per ready pod over the target, a ±10 % dead band, `ceil(ratio × ready)`; starting (Pending) pods
   count as 0 on a scale-up, and the proposal stays put if that flips the direction;
2. stabilises it against its recommendation history (`stabilizeRecommendationWithBehaviors`): the min over
   the scale-up window (0 s) and the max over the scale-down window (300 s);
3. rate-limits it with its record of scale events (`convertDesiredReplicasWithBehaviorRate`,
   `calculateScaleUpLimitWithScalingRules`, `calculateScaleDownLimitWithBehaviors`): by default at most
   max(+4, ×2) per 15 s up, and down only to minReplicas (Percent 100).
The metric is `Sample.demand` of the latest sample (in flight + queued + refused×latency, summed over the
ready pods); the caller models any metric-pipeline lag by delaying the samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from berth.autoscaler.signals import Bounds, Decision, Sample, ScaleState

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


@dataclass(frozen=True, slots=True)
class ScalingPolicy:
    """One `HPAScalingPolicy`: `kind` is "Pods" or "Percent"; `value` per `period_s`."""

    kind: str
    value: int
    period_s: float


@dataclass(frozen=True, slots=True)
class ScalingRules:
    """`HPAScalingRules` without the window: the policies and how to pick among them (Max | Min | Disabled)."""

    policies: tuple[ScalingPolicy, ...]
    select: str = "Max"


# defaults.go: scaleUp {Pods 4 / 15 s, Percent 100 / 15 s, Max}; scaleDown {Percent 100 / 15 s, Max}.
DEFAULT_SCALE_UP = ScalingRules((ScalingPolicy("Pods", 4, 15.0), ScalingPolicy("Percent", 100, 15.0)))
DEFAULT_SCALE_DOWN = ScalingRules((ScalingPolicy("Percent", 100, 15.0),))


class HPA:
    """HorizontalPodAutoscaler with `spec.behavior` defaulted, on an AverageValue Pods metric of `target`."""

    def __init__(self, target: float, *, sync_period_s: float = 15.0, tolerance: float = 0.1,
                 downscale_stabilization_s: float = 300.0, upscale_stabilization_s: float = 0.0,
                 scale_up_policies: ScalingRules = DEFAULT_SCALE_UP,
                 scale_down_policies: ScalingRules = DEFAULT_SCALE_DOWN, name: str = "hpa") -> None:
        if target <= 0:
            raise ValueError("the HPA target must be positive")
        self.name = name
        self.period_s = sync_period_s
        self.target = target
        self.tolerance = tolerance
        self.downscale_stabilization_s = downscale_stabilization_s
        self.upscale_stabilization_s = upscale_stabilization_s
        self.scale_up = scale_up_policies
        self.scale_down = scale_down_policies
        self.cycle = 0
        self._recommendations: list[tuple[float, int]] = []  # (t, unstabilised proposal)
        self._up_events: list[tuple[float, int]] = []  # (t, replicas added)
        self._down_events: list[tuple[float, int]] = []  # (t, replicas removed)
        periods = [p.period_s for p in (*self.scale_up.policies, *self.scale_down.policies)]
        self._longest_period_s = max(periods, default=0.0)

    def decide(self, now: float, samples: Sequence[Sample], state: ScaleState, bounds: Bounds) -> Decision:
        """One sync (`horizontal.go reconcileAutoscaler`)."""
        self.cycle += 1
        low, high = bounds.replica_range(state.concurrency)
        low = max(1, low)  # minReplicas >= 1: HPA never scales to zero
        high = max(low, high)
        current = state.desired
        latest = samples[-1] if samples else None
        demand = latest.demand if latest else 0.0
        ready = latest.ready if latest else 0
        starting = latest.starting if latest else 0
        inputs: dict[str, float] = {"current": current, "ready": ready, "starting": starting, "demand": demand,
                                    "target": self.target, "min": low, "max": high}
        if current == 0:
            # Upstream leaves a target at 0 replicas alone; the simulator's cold start brings it to minReplicas.
            desired = low if demand > 0 else 0
            reason = ("Cold start: demand is waiting at zero replicas, so scale to minReplicas." if desired
                      else "At zero replicas with nothing waiting: HPA does not act.")
        elif current > high:
            desired, reason = high, "Current number of replicas above maxReplicas."
        elif current < low:
            desired, reason = low, "Current number of replicas below minReplicas."
        elif ready == 0:
            desired, reason = current, "No metrics from ready pods: keep the current replica count."
        else:
            proposal = self._proposal(current, demand, ready, starting, inputs)
            stabilized = self._stabilize(now, current, proposal, inputs)
            desired = self._rate_limit(now, current, stabilized, low, high, inputs)
            reason = (f"Mean demand per ready pod is {inputs['ratio']:.2f}× the target: proposal {proposal}, "
                      f"stabilised {stabilized}, rate-limited {desired}.")
        if desired != current:
            self._store_event(now, current, desired)
        axis = "zero" if (desired == 0) != (current == 0) else "horizontal"
        return Decision(t=now, policy=self.name, desired=desired, concurrency=state.concurrency, previous=current,
                        previous_concurrency=state.concurrency, reason=reason, axis=axis, cycle=self.cycle,
                        inputs=inputs)

    def _proposal(self, current: int, demand: float, ready: int, unready: int, inputs: dict[str, float]) -> int:
        """`replica_calculator.go calcPlainMetricReplicas` (every ready pod has a metric: none missing)."""
        ratio = (demand / ready) / self.target  # metricsclient.GetMetricUsageRatio
        inputs["ratio"] = ratio
        if not (unready > 0 and ratio > 1.0):  # !scaleUpWithUnready && no missing pods
            proposal = current if abs(1.0 - ratio) <= self.tolerance else math.ceil(ratio * ready)
        else:  # on a scale-up, unready (starting) pods count as using 0
            pods = ready + unready
            new_ratio = (demand / pods) / self.target
            inputs["ratio_with_unready"] = new_ratio
            if abs(1.0 - new_ratio) <= self.tolerance or new_ratio < 1.0:  # dead band, or the direction flips
                proposal = current
            else:
                proposal = math.ceil(new_ratio * pods)
                if proposal < current:
                    proposal = current
        inputs["proposal"] = proposal
        return proposal

    def _stabilize(self, now: float, current: int, proposal: int, inputs: dict[str, float]) -> int:
        """`horizontal.go stabilizeRecommendationWithBehaviors`: min over the up window, max over the down window."""
        up_cutoff = now - self.upscale_stabilization_s
        down_cutoff = now - self.downscale_stabilization_s
        up_rec = down_rec = proposal
        for t, rec in self._recommendations:
            if t > up_cutoff:
                up_rec = min(up_rec, rec)
            if t > down_cutoff:
                down_rec = max(down_rec, rec)
        recommendation = current
        if recommendation < up_rec:
            recommendation = up_rec
        if recommendation > down_rec:
            recommendation = down_rec
        # Record the unstabilised proposal; entries older than both windows are never read again.
        oldest = min(up_cutoff, down_cutoff)
        self._recommendations = [(t, r) for t, r in self._recommendations if t > oldest]
        self._recommendations.append((now, proposal))
        inputs.update(up_recommendation=up_rec, down_recommendation=down_rec, stabilized=recommendation)
        return recommendation

    def _rate_limit(self, now: float, current: int, desired: int, low: int, high: int,
                    inputs: dict[str, float]) -> int:
        """`horizontal.go convertDesiredReplicasWithBehaviorRate`."""
        if desired > current:
            limit = max(self._limit(self.scale_up, now, current, up=True), current)
            inputs["scale_up_limit"] = limit
            return min(desired, limit, high)
        if desired < current:
            limit = min(self._limit(self.scale_down, now, current, up=False), current)
            inputs["scale_down_limit"] = limit
            return max(desired, limit, low)
        return desired

    def _limit(self, rules: ScalingRules, now: float, current: int, *, up: bool) -> int:
        """`calculateScaleUpLimitWithScalingRules` (up) / `calculateScaleDownLimitWithBehaviors` (down)."""
        if rules.select == "Disabled":
            return current
        most_change = rules.select != "Min"
        pick = max if most_change == up else min
        result = (_INT32_MIN if pick is max else _INT32_MAX)
        for policy in rules.policies:
            cutoff = now - policy.period_s  # getReplicasChangePerPeriod: events strictly after the cutoff
            added = sum(change for t, change in self._up_events if t > cutoff)
            removed = sum(change for t, change in self._down_events if t > cutoff)
            start = current - added + removed
            if policy.kind == "Pods":
                proposed = start + policy.value if up else start - policy.value
            elif up:
                proposed = math.ceil(start * (1 + policy.value / 100))
            else:
                proposed = int(start * (1 - policy.value / 100))
            result = pick(result, proposed)
        return result

    def _store_event(self, now: float, previous: int, desired: int) -> None:
        """`horizontal.go storeScaleEvent` (events older than the longest policy period are dropped)."""
        cutoff = now - self._longest_period_s
        self._up_events = [e for e in self._up_events if e[0] > cutoff]
        self._down_events = [e for e in self._down_events if e[0] > cutoff]
        if desired > previous:
            self._up_events.append((now, desired - previous))
        else:
            self._down_events.append((now, previous - desired))

"""Knative Pod Autoscaler (KPA) on concurrency, with the `config.go` defaults (reference §a.2).

Every `tick_s` (2 s) the decider (`scaling/autoscaler.go Scale`) averages the per-second concurrency over
the stable (60 s) and panic (6 s) windows (`metrics/collector.go StableAndPanicConcurrency`), bounds the
pod counts to [ready / max-scale-down-rate, ready × max-scale-up-rate], enters panic when the panic pod
count is at least 2× the ready pods, and while panicking only ever raises the count (`maxPanicPods`); it
leaves panic once a stable window has passed since the last over-threshold tick. The reconciler side
(`reconciler/autoscaling/kpa/scaler.go handleScaleToZero`, `applyBounds`) keeps the last pod for the
scale-to-zero grace period and clamps to min/max scale. A request arriving while scaled to zero pokes the
decider (`multiscaler.go Poke`), which here means: from zero, a waiting or arriving request gives ≥ 1 at once.
The metric is `Sample.demand` (what the queue-proxies and the activator report, summed over pods).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from berth.autoscaler.signals import Bounds, Decision, Sample, ScaleState, mean, since


class KPA:
    """The KPA decider plus its scale-to-zero grace; `container_concurrency` 0 means unlimited (target 100 × 0.7)."""

    def __init__(self, container_concurrency: int, *, target_utilization: float = 0.7, stable_window_s: float = 60.0,
                 panic_window_pct: float = 10.0, panic_threshold: float = 2.0, max_scale_up_rate: float = 1000.0,
                 max_scale_down_rate: float = 2.0, scale_down_delay_s: float = 0.0,
                 scale_to_zero_grace_s: float = 30.0, tick_s: float = 2.0,
                 container_concurrency_target_default: float = 100.0, name: str = "kpa") -> None:
        self.name = name
        self.period_s = tick_s
        # resources.ResolveMetricTarget: target = max(TargetMin 0.01, (CC or the default) × utilisation).
        self.total = float(container_concurrency) if container_concurrency > 0 else container_concurrency_target_default
        self.target = max(0.01, self.total * target_utilization)
        self.stable_window_s = stable_window_s
        self.panic_window_s = stable_window_s * panic_window_pct / 100.0
        self.panic_threshold = panic_threshold
        self.max_scale_up_rate = max_scale_up_rate
        self.max_scale_down_rate = max_scale_down_rate
        self.scale_down_delay_s = scale_down_delay_s
        self.scale_to_zero_grace_s = scale_to_zero_grace_s
        self.cycle = 0
        self.panic_time: float | None = None
        self.max_panic_pods = 0
        self._delay_window: list[tuple[float, int]] = []  # (t, desired) for scale-down-delay
        self._zero_since: float | None = None  # first tick at which the stable average was 0

    def decide(self, now: float, samples: Sequence[Sample], state: ScaleState, bounds: Bounds) -> Decision:
        self.cycle += 1
        low, high = bounds.replica_range(state.concurrency)
        current = state.desired
        latest = samples[-1] if samples else None
        inputs: dict[str, float] = {"current": current, "target": self.target, "min": low, "max": high}

        def decision(desired: int, reason: str) -> Decision:
            axis = "zero" if (desired == 0) != (current == 0) else "horizontal"
            return Decision(t=now, policy=self.name, desired=desired, concurrency=state.concurrency, previous=current,
                            previous_concurrency=state.concurrency, reason=reason, axis=axis, cycle=self.cycle,
                            inputs=inputs)

        if latest is None:  # metrics.ErrNoData -> invalid scale result: nothing changes
            return decision(min(max(current, low), high), "No data to scale on yet.")

        desired, stable = self._scale(now, samples, latest, inputs)
        poke = current == 0 and (latest.queued > 0 or latest.arrived > 0)
        inputs["poke"] = float(poke)
        if stable == 0 and not poke:
            if self._zero_since is None:
                self._zero_since = now
        else:  # traffic, or a poke (the revision is activated again): the grace restarts
            self._zero_since = None
        if poke:
            desired = max(1, desired)
            reason = f"Poked at zero by a waiting request: scale to {desired}."
        elif desired == 0 and bounds.scale_to_zero:
            idle_for = now - self._zero_since if self._zero_since is not None else 0.0
            inputs["idle_for_s"] = idle_for
            if current == 0 or idle_for >= self.scale_to_zero_grace_s:
                reason = "The stable average has been 0 for the scale-to-zero grace period: scale to zero."
            else:  # handleScaleToZero: keep one pod for the rest of the grace period
                desired = 1
                reason = (f"The stable average is 0; keep 1 pod for the rest of the "
                          f"{self.scale_to_zero_grace_s:g} s grace period.")
        elif self.panic_time is not None:
            reason = (f"Panic mode (panic average {inputs['panic']:.2f}, {inputs['dppc']:.0f} pods wanted): "
                      f"hold the panic maximum {self.max_panic_pods}.")
        else:
            reason = (f"Stable mode: the {self.stable_window_s:g} s average {stable:.2f} over target "
                      f"{self.target:g} wants {inputs['dspc']:.0f} pods, bounded to {desired}.")
        clamped = min(max(desired, low), high)  # scaler.go applyBounds (min-scale, max-scale)
        if clamped != desired:
            reason += f" Clamped to the bounds [{low}, {high}]."
        return decision(clamped, reason)

    def _scale(self, now: float, samples: Sequence[Sample], latest: Sample,
               inputs: dict[str, float]) -> tuple[int, float]:
        """`autoscaler.go Scale`: the decider's desired pod count, and the stable average."""
        anchor = latest.t  # windows end at the newest (possibly delayed) sample
        stable = mean([s.demand for s in since(samples, anchor - self.stable_window_s)])
        panic = mean([s.demand for s in since(samples, anchor - self.panic_window_s)])
        ready = max(1.0, float(latest.ready))  # "use 1 if there are zero current pods"
        max_up = math.ceil(self.max_scale_up_rate * ready)
        max_down = math.floor(ready / self.max_scale_down_rate)  # the revision is reachable
        dspc = math.ceil(stable / self.target)
        dppc = math.ceil(panic / self.target)
        desired_stable = int(min(max(dspc, max_down), max_up))
        desired_panic = int(min(max(dppc, max_down), max_up))
        over_panic = dppc / ready >= self.panic_threshold
        if over_panic:  # begin or extend panicking
            self.panic_time = now
        elif self.panic_time is not None and self.panic_time + self.stable_window_s < now:
            self.panic_time = None  # un-panic: the surge has made its way into the stable metric
            self.max_panic_pods = 0
        desired = desired_stable
        if self.panic_time is not None:  # never scale down while panicking
            desired = max(desired, desired_panic)
            self.max_panic_pods = max(self.max_panic_pods, desired)
            desired = self.max_panic_pods
        if self.scale_down_delay_s > 0:  # delayWindow (max.TimeWindow): the max over the last scale-down-delay
            self._delay_window = [(t, d) for t, d in self._delay_window if t > now - self.scale_down_delay_s]
            self._delay_window.append((now, desired))
            desired = max(d for _, d in self._delay_window)
        inputs.update(stable=stable, panic=panic, ready=ready, max_scale_up=max_up, max_scale_down=max_down,
                      dspc=dspc, dppc=dppc, desired_stable=desired_stable, desired_panic=desired_panic,
                      over_panic=float(over_panic), panicking=float(self.panic_time is not None),
                      max_panic_pods=self.max_panic_pods, decider=desired)
        return desired, stable

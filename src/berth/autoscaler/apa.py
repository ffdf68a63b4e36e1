"""Berth's autoscaler: horizontal on concurrent demand, vertical on what the model shows.

`Autoscaler.decide` is called every scale-up period with the samples so far. Each call:
1. from zero, a waiting request (or the forecast) brings the entity back at once;
2. every vertical period, the per-replica concurrency may change (`vertical.py`); the replica
   count is first converted so that provisioned concurrency stays where it was;
3. the horizontal recommendation (`horizontal.py`) grows it, or after a stable window shrinks it;
4. the predictive minimum (`forecast.py`) and the bounds clamp it; after the idle period with
   scale to zero on, it goes to zero.
Between cycles, `Autoscaler.surge` is called at every sample: a jump in demand that needs twice the
replicas is acted on at once rather than up to a cycle later (Knative's panic, without its freeze).
The class keeps only what the decisions need to remember (recent window means, the vertical
streak, the learned uncontended latency, the last activity); it reads no clock and does no I/O.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

from berth.autoscaler import horizontal, vertical
from berth.autoscaler.forecast import Forecaster, predicted_minimum
from berth.autoscaler.settings import AutoscalerSettings
from berth.autoscaler.signals import Bounds, Decision, Sample, ScaleState, since


class Autoscaler:
    """The full two-axis policy (`vertical=False` freezes per-replica concurrency)."""

    def __init__(self, settings: AutoscalerSettings | None = None, *, vertical: bool = True,
                 forecast: Forecaster | None = None, name: str | None = None) -> None:
        self.settings = settings or AutoscalerSettings()
        self.vertical = vertical
        self.forecast = forecast
        self.name = name or ("apa-full" if vertical else "apa-horizontal")
        if forecast is not None and name is None:
            self.name += "+forecast"
        self.period_s = self.settings.up_period_s
        self.cycle = 0
        self._means: deque[tuple[float, float]] = deque()  # (t, recent load) per cycle, for scale-down
        self._last_seen: float | None = None  # newest sample already taken into account
        self._last_down: float | None = None
        self._first: float | None = None  # the first decision: scale-down waits for a full window of history
        self._last_vertical: float | None = None
        self._streak = ("steady", 0)
        self._raised_from: int | None = None  # the concurrency before the last raise (one period ago)
        self._cap: int | None = None  # a raise that hurt latency: never above this again
        self.uncontended_s: float | None = None
        self.latency_s: float | None = None  # recent mean replica latency (EWMA)
        self.last_active: float | None = None

    def decide(self, now: float, samples: Sequence[Sample], state: ScaleState, bounds: Bounds) -> Decision:
        s = self.settings
        self.cycle += 1
        if self._first is None:
            self._first = now
        fresh = since(samples, self._last_seen) if self._last_seen is not None else samples
        self._absorb(now, fresh)
        latest = samples[-1] if samples else None
        conc, current = max(1, state.concurrency), state.desired
        inputs: dict[str, float] = {}

        def decision(desired: int, concurrency: int, reason: str, axis: str = "horizontal") -> Decision:
            return Decision(t=now, policy=self.name, desired=desired, concurrency=concurrency, previous=state.desired,
                            previous_concurrency=state.concurrency, reason=reason, axis=axis, cycle=self.cycle,
                            inputs=inputs)

        predicted = self._predicted(now, conc, inputs)
        if current == 0:
            waiting = latest is not None and (latest.queued > 0 or latest.arrived > 0 or latest.in_flight > 0)
            if waiting or predicted > 0:
                low, high = bounds.replica_range(conc)
                need = horizontal.replicas_for(latest.demand if latest else 0.0, conc, s)
                desired = min(high, max(1, low, need, predicted))
                why = "a request is waiting" if waiting else f"the forecast needs {predicted} replica(s) soon"
                return decision(desired, conc, f"Scale up from zero: {why}.", "zero")
            return decision(0, conc, "At zero, no request waiting.", "none")

        reasons: list[str] = []
        if self.vertical and (self._last_vertical is None or now - self._last_vertical >= s.vertical_period_s - 1e-9):
            new_conc, why = self._vertical(now, samples, conc, current, bounds, inputs)
            if new_conc != conc:
                current = min(math.ceil(current * conc / new_conc), bounds.replica_range(new_conc)[1])
                conc = new_conc
                reasons.append(why)
        target = horizontal.per_replica_target(conc, s)
        demand = horizontal.recent(samples, now, s, lambda x: x.demand)
        latest_demand = latest.demand if latest else 0.0
        self._means.append((now, horizontal.recent(samples, now, s, lambda x: x.load)))
        while self._means and self._means[0][0] <= now - s.down_window_s:
            self._means.popleft()
        inputs.update(demand=round(demand, 3), latest_demand=round(latest_demand, 3), target=round(target, 3),
                      concurrency=conc, ready=latest.ready if latest else 0)
        desired = current
        up = horizontal.scale_up(current, demand, latest_demand, conc, s)
        if up > current:
            desired = up
            need = horizontal.replicas_for(demand, conc, s)
            reasons.append(f"demand {demand:.1f} over {s.up_window_s:g} s needs {need} replica(s) at {target:.1f} each;"
                           f" up to {up}")
        elif (now - self._first >= s.down_window_s - 1e-9
              and (self._last_down is None or now - self._last_down >= s.down_period_s - 1e-9)):
            self._last_down = now
            peak = horizontal.stabilised_load(self._means, now, s.down_window_s)
            down = horizontal.scale_down(current, [horizontal.replicas_for(peak, conc, s)])
            inputs["window_peak"] = round(peak, 3)
            if down < current:
                desired = down
                reasons.append(f"load over the last {s.down_window_s:g} s (older cycles weighted less) peaks at "
                               f"{peak:.1f}; down to {down}")

        low, high = bounds.replica_range(conc)
        low = max(low, 1)
        if predicted > desired:
            reasons.append(f"the forecast raises the minimum to {predicted}")
            desired = predicted
        clamped = min(high, max(low, desired))
        if clamped != desired:
            reasons.append(f"bounds {low}..{high}")
            desired = clamped
        idle_for = now - self.last_active if self.last_active is not None else 0.0
        inputs["idle_s"] = round(idle_for, 3)
        if bounds.scale_to_zero and predicted == 0 and idle_for >= s.scale_to_zero_idle_s:
            return decision(0, conc, f"No request for {idle_for:.0f} s: scale to zero.", "zero")
        if not reasons:
            reasons.append(f"demand {demand:.1f} fits {desired} replica(s) at {target:.1f} each")
        axis = ("vertical" if conc != state.concurrency
                else "horizontal" if desired != state.desired else "none")
        return decision(desired, conc, "; ".join(reasons) + ".", axis)

    def surge(self, now: float, samples: Sequence[Sample], state: ScaleState, bounds: Bounds) -> Decision | None:
        """Checked at every sample between cycles: a scale-up decision now if the latest sample needs at
        least `surge_ratio` × the replicas, else None (nothing to record). The surge's load joins the
        scale-down window, so the next cycles keep the capacity it added."""
        s = self.settings
        latest = samples[-1] if samples else None
        conc, current = max(1, state.concurrency), state.desired
        if latest is None or current <= 0 or self._first is None:
            return None
        up = min(horizontal.surge(current, latest.demand, conc, s), bounds.replica_range(conc)[1])
        if up <= current:
            return None
        self._means.append((now, latest.load))
        need = horizontal.replicas_for(latest.demand, conc, s)
        demand = round(latest.demand, 3)
        inputs = {"demand": demand, "latest_demand": demand, "concurrency": conc, "ready": latest.ready,
                  "target": round(horizontal.per_replica_target(conc, s), 3)}
        return Decision(t=now, policy=self.name, desired=up, concurrency=conc, previous=current,
                        previous_concurrency=conc, axis="horizontal", cycle=self.cycle, inputs=inputs,
                        reason=f"surge between cycles: demand {latest.demand:.1f} in the last sample needs {need} "
                               f"replica(s), ≥ {s.surge_ratio:g}× the {current} provisioned; up to {up}.")

    def woken(self) -> None:
        """The entity was brought back from zero outside a decision (a request was waiting)."""
        self.last_active = None

    def _absorb(self, now: float, fresh: Sequence[Sample]) -> None:
        if self.last_active is None:
            self.last_active = now  # a new entity gets a full idle period
        for sample in fresh:
            if sample.arrived or sample.in_flight or sample.queued:
                self.last_active = sample.t
            if sample.latency_s is not None and sample.completed:
                self.latency_s = sample.latency_s if self.latency_s is None else (
                    0.8 * self.latency_s + 0.2 * sample.latency_s)
            if self.forecast is not None:
                self.forecast.observe(sample.t, sample.arrived)
        if fresh:
            self._last_seen = fresh[-1].t

    def _vertical(self, now: float, samples: Sequence[Sample], conc: int, replicas: int, bounds: Bounds,
                  inputs: dict[str, float]) -> tuple[int, str]:
        s = self.settings
        start = self._last_vertical if self._last_vertical is not None else now - s.vertical_period_s
        self._last_vertical = now
        period = since(samples, start)
        self.uncontended_s = vertical.uncontended(self.uncontended_s, period, s)
        sig = vertical.signals(period, self.uncontended_s)
        verdict = vertical.classify(sig, s)
        streak = self._streak[1] + 1 if self._streak[0] == verdict else 1
        self._streak = (verdict, streak)
        floor, ceiling = vertical.concurrency_range(bounds, max(1, replicas))
        if self._cap is not None:
            ceiling = min(ceiling, self._cap)
        raised_from, self._raised_from = self._raised_from, None
        ratio = sig.latency_ratio
        if (raised_from is not None and verdict != "relaxed" and ratio is not None
                and ratio > s.relaxed_latency_ratio):
            # The last raise made the model slower: undo it and raise no higher from now on.
            self._cap = raised_from = min(max(raised_from, floor), max(floor, ceiling))
            inputs.update(latency_ratio=round(ratio, 3), streak=streak)
            return raised_from, (f"latency {ratio:.2f}× uncontended after the raise to {conc}: per-replica "
                                 f"concurrency back to {raised_from}, and no higher")
        new = vertical.next_concurrency(conc, verdict, streak, floor, ceiling, s)
        if new > conc:
            self._raised_from = conc
        inputs.update(latency_ratio=round(ratio, 3) if ratio is not None else -1.0,
                      cpu=round(sig.cpu, 3) if sig.cpu is not None else -1.0,
                      memory=round(sig.memory, 3) if sig.memory is not None else -1.0,
                      utilisation=round(sig.utilisation, 3), streak=streak)
        if new < conc:
            if sig.memory is not None and sig.memory >= s.stress_memory:
                cause = f"memory at {sig.memory:.0%} of the limit"
            else:
                cause = f"latency {ratio:.1f}× the uncontended {self.uncontended_s * 1e3:.1f} ms"  # type: ignore[operator]
            return new, f"stressed ({cause}): per-replica concurrency {conc} → {new}"
        if new > conc:
            return new, (f"relaxed for {streak} periods (latency {ratio:.2f}× uncontended, in use): "
                         f"per-replica concurrency {conc} → {new}")
        return conc, ""

    def _predicted(self, now: float, conc: int, inputs: dict[str, float]) -> int:
        if self.forecast is None:
            return 0
        s = self.settings
        rate = self.forecast.peak_rate(now, now + s.scaled("forecast_lead"))
        need = predicted_minimum(rate, self.latency_s, horizontal.per_replica_target(conc, s))
        inputs["forecast_rate"] = round(rate, 3) if rate is not None else -1.0
        inputs["forecast_min"] = need
        return need
